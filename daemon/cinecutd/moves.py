"""Work dirs following their films: renames, moves across watches, names taken over, files hiding.

Every move of a work dir goes through :meth:`Moves.migrate`, so one ownership check (``cinecut.ownership``)
guards them all. The class keeps what a move waits for between events: moves held by a pipeline's lock
(one :class:`PendingMove` each) and renamed films whose subtitles have yet to follow. Two memories by
inode are owned next door: the halves of moves across roots (:class:`cinecutd.sightings.Sightings`) and
names taken over, with results parked for the file that left (:class:`cinecutd.parking.Parking`). It
judges nothing itself: once a work dir has followed, the film is handed to the judge
(:class:`cinecutd.judge.Judge`), the one owner of revalidation.
"""

from __future__ import annotations

import enum
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import structlog

from cinecut.locks import LockBusy, is_work_dir_locked
from cinecut.ownership import Identity, Owner, judge, read_evidence, real
from cinecut.paths import same_film_path
from cinecut.stamp import SourceStamp
from cinecut.stamps import read_stamps
from cinecut.workdir import WorkDir
from cinecutd.config import Config, LibraryConfig
from cinecutd.memory import trim_heap
from cinecutd.migrate import MigrationError, is_parked_name, migrate_work_dir
from cinecutd.parking import Parking, identity_of
from cinecutd.registry import FilmState, Registry
from cinecutd.sightings import GONE_MEMORY_S, Sightings
from cinecutd.states import Trigger

if TYPE_CHECKING:
    from cinecutd.judge import Judge

log = structlog.get_logger("cinecutd")

#: How long the results under a film's previous, never-registered name may take to show their commit mark
#: (our stamps sidecar) before the daemon stops waiting to carry them along. A pipeline holding the work
#: dir's lock is waited for as long as it holds it; this bounds only the unlocked, unmarked case (a
#: pipeline between creating the work dir and locking it).
UNCONFIRMED_WAIT_S = 1.0
#: How soon a rescan follows a move that met a stale path (so the folder rename's own events come first).
CATCH_UP_DELAY_S = 0.5


class MoveHost(Protocol):
    """What moves need of the engine: the registry, the config, and where a path belongs."""

    reg: Registry
    config: Config

    def library_for(self, path: Path) -> LibraryConfig | None: ...
    def later(self, due: float, fn: Callable[[], None]) -> None: ...
    def request_reconcile(self, reason: str) -> None: ...


class Arrivals(Protocol):
    """A film under a new name, and a later look at its subtitles (:class:`cinecutd.intake.Intake`)."""

    def register(self, film: Path, lib: LibraryConfig) -> FilmState: ...
    def recheck_subtitles_later(self, film: Path) -> None: ...


@dataclass(frozen=True, slots=True)
class PendingMove:
    """A work-dir move waiting for a pipeline's lock (or for the results' commit mark)."""

    old_film: Path
    with_folder: bool
    src_dir: Path | None = None  # a parked work dir, instead of ``old_film``'s
    identity: Identity | None = None  # the moving file's (device, inode)
    deadline: float | None = None  # set while the results are not known to be this file's


class Results(enum.StrEnum):
    """Whose results a previous name's work dir holds."""

    MINE = "mine"
    THEIRS = "theirs"
    UNKNOWN = "unknown"


class Migration(enum.StrEnum):
    """What :meth:`Moves.migrate` did with a work dir."""

    MOVED = "moved"
    DEFERRED = "deferred"  # a pipeline holds a work dir: retried with the pending films
    REFUSED = "refused"  # another film's results, or nowhere to put them: they stay where they are


class Resume(enum.StrEnum):
    """What a pending film's retry should do next (:meth:`Moves.resume`)."""

    GO = "go"  # nothing of its move is left: judge it
    WAIT = "wait"  # a pipeline still holds the results, or their commit mark is not there yet
    HELD = "held"  # the move met a lock again and deferred the film once more


def sidecars_left(old_film: Path, lib: LibraryConfig) -> bool:
    from cinecutd.discovery import subtitles_of

    return bool(subtitles_of(old_film, lib.subtitle_extensions))


def results_of(old_film: Path, state: FilmState) -> Results:
    """Whose results the work dir of ``old_film`` (a name ``state`` was renamed from) holds: ``mine``
    (our commit mark, or else upstream's cache, names this very file), ``theirs`` (another file's, or
    nothing to carry), or ``unknown`` (a pipeline holds it, or it has no commit mark yet)."""
    old = WorkDir.for_film(old_film)
    if not os.path.lexists(old.path) or os.path.lexists(state.work_dir):
        return Results.THEIRS
    if is_work_dir_locked(old.path):
        return Results.UNKNOWN  # a pipeline is writing it: its commit mark, once written, decides
    ev = read_evidence(old.path, old_film.stem)
    if ev is None or ev.named is None:
        return Results.UNKNOWN
    if ev.identity is None:
        # No commit mark of ours: results of an upstream run count if their cache names this file's
        # stamp under the old name; anything else may still be a pipeline's unfinished work.
        if judge(ev, old_film) is Owner.MINE and ev.cache_stamp == state.stamp:
            return Results.MINE
        return Results.UNKNOWN
    if judge(ev, old_film, identity_of(state)) is not Owner.MINE or ev.stamp != state.stamp:
        return Results.THEIRS
    return Results.MINE


def owners_first(reg: Registry, films: list[Path], src: Path, dest: Path) -> list[Path]:
    """Films of a moved folder, each work dir's owner before its same-stem twins: a twin handled first
    would find nobody at the new place to share the work dir with, and be judged against its results."""
    shared: dict[Path, int] = {}
    for f in films:
        shared[reg.films[f].work_dir] = shared.get(reg.films[f].work_dir, 0) + 1
    if all(n < 2 for n in shared.values()):
        return films

    def rank(f: Path) -> int:
        wd = reg.films[f].work_dir
        if shared[wd] < 2:
            return 0
        return 0 if judge(read_evidence(dest / wd.relative_to(src), f.stem), f) is Owner.MINE else 1

    return sorted(films, key=rank)


def drop_conflict(reg: Registry, film: Path, wd: Path) -> None:
    """``film`` no longer claims ``wd``: a twin left alone is no longer in conflict."""
    claim = reg.conflicts.get(wd)
    if claim is None:
        return
    rest = [f for f in claim if f != film and f in reg.films]
    if len(rest) > 1:
        reg.conflicts[wd] = rest
    else:
        del reg.conflicts[wd]
        for f in rest:
            reg.films[f].conflict = False


def owner_twin(reg: Registry, state: FilmState) -> Path | None:
    """A new film whose work dir names a same-stem sibling that is on disk but not registered yet (a folder
    with twins that arrived from another root, listed in any order): the owner, to register first, so this
    twin is marked in conflict and never judged against the owner's results."""
    ev = read_evidence(state.work_dir, state.film.stem)
    if ev is None or ev.named is None or ev.named == real(state.film):
        return None
    owner = state.film.with_name(Path(ev.named).name)
    if owner.stem != state.film.stem or owner in reg.films or not os.path.isfile(owner):
        return None
    return owner


def unseen_renames(reg: Registry, wd: Path) -> list[tuple[Path, FilmState]]:
    """A folder listed on arrival holds a work dir ``wd`` no film claims and films without one: a film may
    have been renamed before the folder's watch existed (a new folder's watch is added only once its
    creation is reported), so no rename event ever comes. Its (old name, film) pairs; the results' evidence
    (or, while a pipeline still writes them, its commit mark) then decides whether they are the film's.
    Costs nothing when every work dir found has its film."""
    from cinecut.workdir import stem_of_work_dir

    films = reg.films_in(wd.parent)
    if not films or is_parked_name(wd.name) or any(reg.films[f].work_dir == wd for f in films):
        return []
    homeless = [reg.films[f] for f in sorted(films) if not os.path.lexists(reg.films[f].work_dir)]
    if not homeless:
        return []
    stem = stem_of_work_dir(wd.name)
    ev = read_evidence(wd, stem)
    named = Path(ev.named).name if ev is not None and ev.named and Path(ev.named).stem == stem else None
    return [(wd.parent / (named or stem + state.film.suffix), state) for state in homeless]


def travelled_from(state: FilmState) -> Path | None:
    """The old path of a film whose work dir travelled with its folder: our sidecar in it names this very
    file (device and inode) under a path that is gone, with the same work-dir name."""
    recorded = read_stamps(state.work_dir)
    if recorded is None or same_film_path(recorded.source_file, state.film) or recorded.inode is None:
        return None
    old_film = Path(recorded.source_file)
    if (recorded.device, recorded.inode) != (state.device, state.inode) or os.path.lexists(old_film):
        return None
    if WorkDir.for_film(old_film).path.name != state.work_dir.name:
        return None
    return old_film


class Moves:
    """Carries work dirs after their films; remembers what a move still waits for."""

    def __init__(self, host: MoveHost, judge: Judge) -> None:
        self.host = host
        self.judge = judge
        self.intake: Arrivals | None = None  # set by the engine
        self._catch_up_due = False
        self.seen = Sightings()  # films that vanished, or arrived without a work dir, by inode
        # Renamed films whose subtitle sidecars still carry the old stem (Radarr renames them one by one
        # after the film): new film -> old film. Their subtitle check waits for the sidecars to follow.
        self.renaming: dict[Path, Path] = {}
        # Moves of a work dir that a pipeline's lock held up, by new film. Retried with the pending
        # invalidations, so a rename during an analysis keeps its results.
        self.pending: dict[Path, PendingMove] = {}
        self.parking = Parking(host.reg, self.seen)

    # ----------------------------------------------------------------- questions from the judge
    @property
    def _arrivals(self) -> Arrivals:
        assert self.intake is not None, "the engine wires the intake in"
        return self.intake

    def holds(self, film: Path) -> bool:
        """Its work dir has not followed it yet: judged once the move is done."""
        return film in self.pending

    def forget(self, film: Path) -> None:
        self.pending.pop(film, None)

    def waits_for_sidecars(self, film: Path, lib: LibraryConfig) -> bool:
        """A renamed film's subtitles are still on their way from the old name: judging them now would
        take the gap for a subtitle change."""
        old_film = self.renaming.get(film)
        if old_film is None:
            return False
        if sidecars_left(old_film, lib):
            return True
        del self.renaming[film]
        return False

    def resume(self, state: FilmState) -> Resume:
        """A pending film's retry: finish its move if the lock that held it is gone."""
        film = state.film
        waiting = self.pending.get(film)
        if waiting is None:
            return Resume.GO
        held = state.work_dir if waiting.with_folder else (waiting.src_dir or WorkDir.for_film(waiting.old_film).path)
        if is_work_dir_locked(held):
            return Resume.WAIT
        if waiting.deadline is not None:
            verdict = results_of(waiting.old_film, state)
            if verdict is Results.UNKNOWN and time.monotonic() < waiting.deadline:
                return Resume.WAIT
            if verdict is not Results.MINE:  # not this film's results after all: they stay where they are
                del self.pending[film]
                return Resume.GO
        del self.pending[film]
        self.migrate(waiting.old_film, film, time.monotonic(), moved_with_folder=waiting.with_folder,
                     identity=waiting.identity, src_dir=waiting.src_dir)
        return Resume.HELD if film in self.pending else Resume.GO  # locked again meanwhile: deferred once more

    def after_unlock(self, state: FilmState, now: float) -> bool:
        """Before a pending film is judged: its folder may have moved while a pipeline held the work dir
        (True: paths rewritten and judged), or a hiding film's results, locked when this file landed on its
        name, may be parked now."""
        if self.adopt_travelled_work_dir(state, now):
            return True
        self.park_for_hiding(state)
        return False

    # ----------------------------------------------------------------- films leaving
    def film_gone(self, film: Path) -> None:
        """A film vanished: follow it to a twin that already appeared, or remember it for a while."""
        reg = self.host.reg
        state = reg.remove(film)
        if state is None:
            return
        reg.counters["films_gone"] += 1
        if not os.path.isdir(film.parent) and not os.path.lexists(state.work_dir):
            # Its folder moved on before this event's turn: where its results went, only a look can say.
            self._catch_up("a film left a folder that was renamed or removed before its turn")
        if state.inode is not None and state.device is not None and state.stamp is not None:
            if self._follow_to_twin(state):
                return
            self.seen.vanished((state.device, state.inode), film, state.stamp, time.monotonic())
        wd = state.work_dir
        drop_conflict(reg, film, wd)
        still_claimed = bool(reg.claimants(wd))
        if not still_claimed and os.path.lexists(wd):
            reg.orphans.setdefault(wd, time.time())
            log.info("orphaned", film=str(film), work_dir=str(wd), reason="film deleted or moved out")

    def hidden(self, state: FilmState, dest: Path) -> None:
        """A film renamed to a name the scan ignores, inside a library: remember where it hides."""
        identity = identity_of(state)
        if identity is not None:
            self.parking.hidden(identity, dest)

    def path_gone(self, path: Path) -> None:
        self.parking.path_gone(path)

    # ----------------------------------------------------------------- renames
    def renamed(self, state: FilmState, new_film: Path, lib: LibraryConfig | None, t0: float, *,
                dir_moved: bool = False) -> None:
        """Same inode, same content, new name: carry the work dir along instead of recomputing."""
        reg = self.host.reg
        old_film = state.film
        reg.remove(old_film)
        drop_conflict(reg, old_film, state.work_dir)
        waiting = self.pending.pop(old_film, None)
        if lib is None:
            return
        identity = identity_of(state)
        src_dir = None
        if waiting is not None and not dir_moved:  # renamed again before its work dir could follow
            old_film, src_dir = waiting.old_film, waiting.src_dir
        new_state = self._arrivals.register(new_film, lib)
        new_state.stamp, new_state.inode, new_state.device = state.stamp, state.inode, state.device
        new_state.last_event = (Trigger.RENAMED, time.time())
        if waiting is not None and not dir_moved and waiting.deadline is not None:
            # Still waiting for a pipeline's commit mark under an older name: go on waiting, for the new one.
            self._await_results(old_film, new_state, waiting.deadline)
            self.judge_after_move(old_film, new_state, lib, t0, Trigger.RENAMED)
            return
        old_wd = WorkDir.for_film(old_film).path
        # Its folder moved (the polling observer may report the film's move before the folder's): the
        # work dir travelled along under the same name, so only the stored paths need rewriting.
        dir_moved = dir_moved or (
            old_wd.name == new_state.work_dir.name
            and not os.path.lexists(old_wd)
            and os.path.lexists(new_state.work_dir)
        )
        if dir_moved:
            old_wd = new_state.work_dir
        if src_dir is not None or os.path.lexists(old_wd) or os.path.lexists(new_state.work_dir):
            self.migrate(old_film, new_film, t0, moved_with_folder=dir_moved, identity=identity, src_dir=src_dir)
        elif not os.path.isdir(old_wd.parent):
            self._catch_up("the folder a film left was renamed before its move's turn")
        self.judge_after_move(old_film, new_state, lib, t0, Trigger.RENAMED)

    def judge_after_move(self, old_film: Path, new_state: FilmState, lib: LibraryConfig, t0: float,
                         trigger: str) -> None:
        """Hand a film that was renamed or moved to the judge, once its subtitle sidecars have followed it."""
        new_film = new_state.film
        if old_film != new_film and sidecars_left(old_film, lib):
            # The subtitles are being renamed or moved after the film (Radarr does them one by one):
            # judging them now would take the gap for a subtitle change and wipe the results. The last
            # sidecar's arrival (or a timer) revalidates.
            self.renaming[new_film] = old_film
            self._arrivals.recheck_subtitles_later(new_film)
            if SourceStamp.maybe(new_film) == new_state.stamp:
                return
        else:
            # The sidecars finished their moves while the work dir moved: list them again, or the
            # listing taken at registration (before their moves) would read as deleted subtitles.
            from cinecutd.discovery import subtitles_of

            new_state.subtitles = subtitles_of(new_film, lib.subtitle_extensions)
        self.judge.revalidate(new_state, t0, trigger)

    def follow_unknown_rename(self, src: Path, state: FilmState, t0: float) -> None:
        """A rename from a name the daemon never registered (the film arrived and was renamed within one
        burst of queued events). The old name's work dir belongs to this very file if our sidecar in it
        names its device and inode with the same stamp: carry it along.

        A pipeline may be writing that work dir right now (it started on the film under its old name, and
        the rename came while it ran): its commit mark is not there yet, or is an older run's. Then the
        move waits for the pipeline to finish, like a rename of a known film during an analysis, and
        follows once the commit mark names this file; otherwise the fresh results would stay behind under
        the old name, never attached to the film."""
        old_wd = WorkDir.for_film(src).path
        if old_wd == state.work_dir or os.path.lexists(state.work_dir) or not os.path.lexists(old_wd):
            return
        if os.path.lexists(src):
            return  # another file took the old name since: the work dir is its
        verdict = results_of(src, state)
        if verdict is Results.THEIRS:
            return
        if verdict is Results.MINE:
            self.migrate(src, state.film, t0, identity=identity_of(state))
        else:
            self._await_results(src, state, time.monotonic() + UNCONFIRMED_WAIT_S)
        self.judge_after_move(src, state, self._lib_of(state), t0, Trigger.RENAMED)

    def follow_unseen_renames(self, work_dirs: set[Path], t0: float) -> None:
        """Renames no event reported (:func:`unseen_renames`), followed as renames from an unknown name."""
        for wd in work_dirs:
            for old, state in unseen_renames(self.host.reg, wd):
                if old != state.film and not os.path.lexists(old) and state.film not in self.pending:
                    self.follow_unknown_rename(old, state, t0)
                if not os.path.lexists(wd):
                    break

    def _await_results(self, old_film: Path, state: FilmState, deadline: float) -> None:
        """Hold the move of ``old_film``'s work dir to ``state`` (and its judgement) until its results are
        known to be this film's; retried with the pending invalidations."""
        self.pending[state.film] = PendingMove(old_film, False, None, identity_of(state), deadline)
        log.info("migration_deferred", film=str(state.film), old_film=str(old_film),
                 reason="results under the old name not committed yet")
        self.judge.defer(state, Trigger.RENAMED, LockBusy(WorkDir.for_film(old_film).lock_path))

    # ----------------------------------------------------------------- the one move
    def _catch_up(self, why: str) -> None:
        """A move met a stale path: a folder on it was renamed after the event was queued. The film's later
        events carry the new names, but its results sit where the old ones pointed; a rescan soon (rather
        than the periodic one) reunites them by their own evidence (orphan adoption). One per burst."""
        if self._catch_up_due:
            return
        self._catch_up_due = True
        log.info("catch_up_rescan", reason=why, in_s=CATCH_UP_DELAY_S)

        def run() -> None:
            self._catch_up_due = False
            self.host.request_reconcile("catch-up after a stale move")

        self.host.later(time.monotonic() + CATCH_UP_DELAY_S, run)

    def migrate(self, old_film: Path, new_film: Path, t0: float, *, moved_with_folder: bool = False,
                identity: Identity | None = None, src_dir: Path | None = None) -> Migration:
        """Carry the work dir of ``old_film`` (at ``src_dir`` when parked) to ``new_film``, if its results
        are that file's (``identity``): :class:`Migration` says what became of them."""
        reg = self.host.reg
        new_wd = WorkDir.for_film(new_film).path
        src = src_dir if src_dir is not None else new_wd if moved_with_folder else WorkDir.for_film(old_film).path
        parked = self.parking.get(identity) if identity is not None and src_dir is None else None
        if parked is not None and os.path.lexists(parked.place) and (
                not os.path.lexists(src) or judge(read_evidence(src, old_film.stem), old_film, identity) is not Owner.MINE):
            # Its results were parked meanwhile (another film took its old name first): take them from there.
            old_film, src_dir, src, moved_with_folder = parked.named, parked.place, parked.place, False
        try:
            if not os.path.lexists(src):
                if os.path.lexists(new_wd) and not moved_with_folder:
                    self.parking.make_room(new_wd, new_film, identity)  # other results are never judged against it
                if not os.path.isdir(src.parent) or not os.path.isdir(new_film.parent):
                    self._catch_up("a folder on the path of a work-dir move was renamed before its turn")
                return Migration.REFUSED
            ev = read_evidence(src, old_film.stem)
            verdict = judge(ev, old_film, identity)
            if verdict is Owner.THEIRS or (
                    verdict is Owner.UNKNOWN and any(f != new_film for f in reg.claimants(src))):
                log.info("migration_refused", film=str(new_film), old_film=str(old_film), work_dir=str(src),
                         reason="its results are another film's")
                return Migration.REFUSED
            if verdict is Owner.MINE and ev is not None and ev.named is not None and ev.named != real(old_film) \
                    and src_dir is None and not moved_with_folder and src != new_wd:
                # This very file made them under a name of its own the daemon never saw (its folder moved in
                # already renamed): the stored paths speak of that name.
                old_film, src_dir = Path(ev.named), src
            if src != new_wd and os.path.lexists(new_wd) and not self.parking.make_room(new_wd, new_film, identity):
                raise MigrationError(f"{new_wd} holds results that are not this film's; keeping both work dirs")
            report = migrate_work_dir(old_film, new_film, moved_with_folder=moved_with_folder, src_dir=src_dir)
            trim_heap()
        except LockBusy:
            log.info("migration_deferred", film=str(new_film), reason="work dir locked by a pipeline")
            self.pending[new_film] = PendingMove(old_film, moved_with_folder, src_dir, identity)
            state = reg.films.get(new_film)
            if state is not None:
                self.judge.defer(state, Trigger.RENAMED, LockBusy(src / "cinecut.lock"))
            return Migration.DEFERRED
        except (MigrationError, OSError) as exc:
            log.warning("migration_skipped", film=str(new_film), old_film=str(old_film), reason=str(exc))
            if not os.path.isdir(new_film.parent) or not os.path.lexists(src):
                self._catch_up("a folder on the path of a work-dir move was renamed before its turn")
            if os.path.lexists(src) and src != new_wd:
                reg.orphans.setdefault(src, time.time())
            return Migration.REFUSED
        reg.orphans.pop(src, None)
        if src_dir is not None:
            self.parking.emptied(src_dir)
        reg.counters["migrations"] += 1
        log.info("migrated", film=str(new_film), old_film=str(old_film), work_dir=report.new_work_dir,
                 rewritten=report.rewritten, latency_ms=round((time.monotonic() - t0) * 1000, 3))
        self._return_parked()
        return Migration.MOVED

    def _carry(self, old_film: Path, state: FilmState, now: float, *, moved_with_folder: bool = False,
               identity: Identity | None = None, src_dir: Path | None = None) -> bool:
        """Migrate to ``state`` and judge it; False (nothing judged) when the move was refused."""
        if self.migrate(old_film, state.film, now, moved_with_folder=moved_with_folder, identity=identity,
                        src_dir=src_dir) is Migration.REFUSED:
            return False
        self.judge_after_move(old_film, state, self._lib_of(state), now, Trigger.MOVED)
        return True

    # ----------------------------------------------------------------- parked results
    def _return_parked(self) -> None:
        """Hand parked results back to their file once it is registered under a name whose work dir is
        free (:meth:`Parking.due`)."""
        for key, parked, state in self.parking.due():
            now = time.monotonic()
            if self.migrate(parked.named, state.film, now, identity=key, src_dir=parked.place) is Migration.MOVED:
                self.judge_after_move(parked.named, state, self._lib_of(state), now, Trigger.MOVED)

    def park_for_hiding(self, state: FilmState) -> None:
        """A newcomer on a name whose results are a hiding (or moving) film's: park them for that film
        (:meth:`Parking.for_newcomer`); a pipeline writing them is retried before this film is judged."""
        if not (self.parking.hiding or self.pending):
            return
        if self.parking.for_newcomer(state, lambda owner: any(m.identity == owner for m in self.pending.values())):
            self._return_parked()

    # ----------------------------------------------------------------- films arriving
    def _follow_to_twin(self, gone: FilmState) -> bool:
        """The vanished film already reappeared elsewhere (same inode and stamp, no work dir there yet):
        carry its work dir to it. True if it did."""
        now = time.monotonic()
        assert gone.stamp is not None, "only a film that was looked at is remembered"
        twin = self.seen.arrival_of((gone.device or 0, gone.inode or 0), gone.stamp, now)
        state = self.host.reg.films.get(twin) if twin is not None else None
        if state is None or os.path.lexists(state.work_dir) or not os.path.lexists(gone.work_dir):
            return False
        return self._carry(gone.film, state, now, identity=identity_of(gone))

    def adopt_moved_results(self, state: FilmState) -> bool:
        """A new film that is a recently vanished one (same device and inode, same stamp): a move across
        watches. Carry its work dir along."""
        key = (state.device or 0, state.inode or 0)
        now = time.monotonic()
        gone = self.seen.departure_of(key, now)
        parked = self.parking.take(key)
        self.parking.reappeared(key, now)
        # Its results were parked when another film took its old name: hand them back.
        if parked is not None and os.path.lexists(parked.place) and self._carry(
                parked.named, state, now, identity=key, src_dir=parked.place):
            return True
        if gone is not None and gone.stamp == state.stamp and os.path.lexists(WorkDir.for_film(gone.path).path) \
                and self._carry(gone.path, state, now, identity=key):
            return True
        # No usable memory (or a stale one: the same file moved on again since): the work dir may have
        # travelled with the film's folder, or may still follow when the old path's deletion arrives.
        self.park_for_hiding(state)
        if state.stamp is not None and not os.path.lexists(state.work_dir):
            self.seen.arrived(key, state.film, state.stamp, now)
            return False
        return self.adopt_travelled_work_dir(state, now)

    def adopt_travelled_work_dir(self, state: FilmState, now: float) -> bool:
        """A new film whose folder arrived with its work dir (a folder moved across roots: one watch sees it
        leave, the other sees it appear, in no useful order). Our sidecar names the film the results belong
        to; if that is this very file (same device and inode) under its old path, which is gone, only the
        stored paths need rewriting."""
        old_film = travelled_from(state)
        return old_film is not None and self._carry(old_film, state, now, moved_with_folder=True, identity=identity_of(state))

    def _lib_of(self, state: FilmState) -> LibraryConfig:
        lib = self.host.library_for(state.film)
        assert lib is not None, "a registered film is always inside a configured root"
        return lib


__all__ = [
    "GONE_MEMORY_S",
    "UNCONFIRMED_WAIT_S",
    "Migration",
    "MoveHost",
    "Moves",
    "PendingMove",
    "Results",
    "Resume",
    "identity_of",
    "owner_twin",
    "owners_first",
    "results_of",
]
