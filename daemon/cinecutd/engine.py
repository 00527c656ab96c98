"""The daemon's engine: turns filesystem events and rescans into revalidations, on one thread.

Watcher threads and the control socket only post work to the engine's queue; the engine thread alone
touches the registry and the disk, so there is no locking inside the daemon and the order of events is
the order of effects. Invalidation is eager (the first event of a burst acts at once); later events of
the same burst cost one ``stat``; one final revalidation runs when the burst has been quiet for
``settle_seconds``.
"""

from __future__ import annotations

import heapq
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from cinecut import __version__, faults, safefs
from cinecut.inference.cache import read_cache_metadata
from cinecut.locks import LockBusy, is_work_dir_locked, work_dir_lock
from cinecut.revalidate import Revalidation, probe, revalidate
from cinecut.stamp import SourceStamp
from cinecut.stamps import read_stamps
from cinecut.workdir import (
    WorkDir,
    is_work_dir_name,
    subtitle_belongs_to,
)
from cinecutd.config import Config, LibraryConfig
from cinecutd.discovery import ScanResult, in_work_dir, is_film_name, scan_folder, scan_root
from cinecutd.gc import collect_orphans
from cinecutd.memory import trim_heap
from cinecutd.migrate import JOURNAL_NAME, MigrationError, migrate_work_dir, resume_migration
from cinecutd.registry import FilmState, Registry, RootState

log = structlog.get_logger("cinecutd")

#: How long a vanished film is remembered by inode, to recognise a move across roots (delete + create).
GONE_MEMORY_S = 600.0
PENDING_RETRY_S = 0.25
#: How long the results under a film's previous, never-registered name may take to show their commit mark
#: (our stamps sidecar) before the daemon stops waiting to carry them along. A pipeline holding the work
#: dir's lock is waited for as long as it holds it; this bounds only the unlocked, unmarked case (a
#: pipeline between creating the work dir and locking it).
UNCONFIRMED_WAIT_S = 1.0
OVERFLOW_RESCAN_GAP_S = 5.0


@dataclass(slots=True)
class FsEvent:
    """A filesystem event as the watcher saw it, stamped with when the daemon received it."""

    kind: str  # created | modified | closed | moved | deleted | overflow
    src: str
    dest: str | None
    is_dir: bool
    t0: float


class _Call:
    __slots__ = ("done", "error", "fn", "result")

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class Engine:
    """All of the daemon's decisions. Public methods other than ``post_*``/``call`` run on the engine thread."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.reg = Registry()
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._timers: list[tuple[float, str, Path]] = []
        self._gone: dict[tuple[int, int], tuple[Path, SourceStamp, float]] = {}
        # New films that arrived without a work dir, by inode: when a move's deletion half is reported
        # after its creation half (two roots, two observers), the vanished film's results still follow.
        self._fresh: dict[tuple[int, int], tuple[Path, SourceStamp, float]] = {}
        # Renamed films whose subtitle sidecars still carry the old stem (Radarr renames them one by one
        # after the film): new film -> old film. Their subtitle check waits for the sidecars to follow.
        self._renaming: dict[Path, Path] = {}
        self._pending: set[Path] = set()
        # Moves of a work dir that a pipeline's lock held up: new film -> (old film, moved with its folder).
        # Retried with the pending invalidations, so a rename during an analysis keeps its results.
        self._migrations: dict[Path, tuple[Path, bool]] = {}
        # Of those, the ones whose results are not yet known to be this film's (a rename from a name the
        # daemon never registered, while a pipeline wrote under that name): new film -> deadline. The move
        # happens once the pipeline's commit mark names this very file.
        self._unconfirmed: dict[Path, float] = {}
        self.next_rescan: float | None = None
        self._overflow_due: float | None = None
        self._last_overflow_rescan = -OVERFLOW_RESCAN_GAP_S
        self.last_loop = time.monotonic()
        self.on_film_changed: Callable[[FilmState], None] | None = None  # pre-warm scheduling hook
        self.on_reconciled: Callable[[], None] | None = None
        self._libraries: list[LibraryConfig] = list(config.libraries)
        self._schedule_rescan()

    # ----------------------------------------------------------------- inputs from other threads
    def post_event(self, kind: str, src: str, dest: str | None = None, is_dir: bool = False) -> None:
        """Called by watcher threads; cheap and non-blocking."""
        self.queue.put(FsEvent(kind, src, dest, is_dir, time.monotonic()))

    def call(self, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Run ``fn`` on the engine thread and wait for its result (used by the control socket)."""
        c = _Call(fn)
        self.queue.put(c)
        if not c.done.wait(timeout):
            raise TimeoutError("the daemon is busy; try again")
        if c.error is not None:
            raise c.error
        return c.result

    # ----------------------------------------------------------------- the loop body
    def run_once(self, max_wait: float) -> None:
        """Process one queued item (or wait up to ``max_wait``), then due timers."""
        now = time.monotonic()
        wait = max_wait
        if self._timers:
            wait = max(0.0, min(wait, self._timers[0][0] - now))
        try:
            item = self.queue.get(timeout=wait) if wait > 0 else self.queue.get_nowait()
        except queue.Empty:
            item = None
        if item is not None:
            self._dispatch(item)
            # Drain what is already queued so a storm is handled in one go.
            for _ in range(10_000):
                try:
                    self._dispatch(self.queue.get_nowait())
                except queue.Empty:
                    break
        self._run_timers()
        self.last_loop = time.monotonic()

    def _dispatch(self, item: Any) -> None:
        if isinstance(item, FsEvent):
            try:
                self.handle_event(item)
            except Exception as exc:  # one bad path must never stop the daemon
                log.error("event_failed", path=item.src, kind=item.kind, error=repr(exc))
                self.reg.counters["errors"] += 1
        elif isinstance(item, _Call):
            try:
                item.result = item.fn()
            except BaseException as exc:
                item.error = exc
            finally:
                item.done.set()

    def _push_timer(self, due: float, what: str, film: Path) -> None:
        heapq.heappush(self._timers, (due, what, film))

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            due, what, film = heapq.heappop(self._timers)
            try:
                if what == "settle":
                    state = self.reg.films.get(film)
                    if state is not None and state.settle_due == due:
                        state.settle_due = None
                        self._final_revalidation(state)
                elif what == "pending":
                    self._retry_pending(film)
                elif what == "overflow":
                    self._overflow_due = None
                    self._last_overflow_rescan = time.monotonic()
                    self.reconcile("inotify overflow")
                elif what == "subs":
                    state = self.reg.films.get(film)
                    self._renaming.pop(film, None)
                    if state is not None:
                        self._subtitles_changed(state, "deleted", now)
            except Exception as exc:
                log.error("timer_failed", film=str(film), what=what, error=repr(exc))
        if self.next_rescan is not None and now >= self.next_rescan:
            self.reconcile("periodic")

    def next_deadline(self) -> float | None:
        return self._timers[0][0] if self._timers else None

    def _schedule_rescan(self) -> None:
        interval = self.config.daemon.rescan_interval
        self.next_rescan = time.monotonic() + interval if interval > 0 else None

    # ----------------------------------------------------------------- libraries
    def library_for(self, path: Path) -> LibraryConfig | None:
        for lib in self._libraries:
            if path == lib.path or path.is_relative_to(lib.path):
                return lib
        return None

    def set_config(self, config: Config) -> None:
        """Apply a reloaded config: roots that left are forgotten (nothing on disk changes)."""
        old_roots = {lib.path for lib in self._libraries}
        self.config = config
        self._libraries = list(config.libraries)
        new_roots = {lib.path for lib in self._libraries}
        for root in old_roots - new_roots:
            for film in [f for f, s in self.reg.films.items() if s.root == root]:
                self.reg.remove(film)
            self.reg.roots.pop(root, None)
            self.reg.orphans = {w: t for w, t in self.reg.orphans.items() if not w.is_relative_to(root)}
        self._schedule_rescan()

    # ----------------------------------------------------------------- events
    def handle_event(self, ev: FsEvent) -> None:
        c = self.reg.counters
        c["events"] += 1
        if ev.kind == "overflow":
            c["overflows"] += 1
            # Coalesce: a flood can overflow the queue many times a second; one rescan per few seconds
            # catches everything the kernel dropped without turning the flood into a rescan loop.
            now = time.monotonic()
            due = max(now, self._last_overflow_rescan + OVERFLOW_RESCAN_GAP_S)
            if self._overflow_due is None:
                self._overflow_due = due
                log.warning("inotify_overflow", detail="events were lost; rescan scheduled",
                            in_s=round(due - now, 3))
                self._push_timer(due, "overflow", Path("/"))
            return
        src = Path(ev.src)
        dest = Path(ev.dest) if ev.dest else None
        if in_work_dir(src) and (dest is None or in_work_dir(dest)):
            c["work_dir_events"] += 1
            return
        if not ev.is_dir and ev.kind != "deleted" and not os.path.isdir((dest or src).parent):
            # A folder that moved out of a root keeps its inotify watches (they follow the inode), and
            # watchdog goes on reporting what happens in it under the old, vanished path. The root it
            # moved to reports the same events under the real path; these ghosts are dropped.
            c["stale_path_events"] += 1
            if ev.kind == "moved":
                self._path_gone(src, ev.t0)
            return
        if ev.is_dir:
            self._dir_event(ev, src, dest)
        elif ev.kind == "moved" and dest is not None:
            self._moved(src, dest, ev.t0)
        elif ev.kind == "deleted":
            self._path_gone(src, ev.t0)
        else:
            self._path_changed(src, ev.kind, ev.t0)

    def _classify(self, path: Path) -> tuple[LibraryConfig | None, str]:
        """('film' | 'subtitle' | 'other', with the library) for a file path."""
        lib = self.library_for(path)
        if lib is None or in_work_dir(path):
            return lib, "other"
        name = path.name
        if is_film_name(name, lib.video_extensions):
            return lib, "film"
        if os.path.splitext(name)[1].lower() in lib.subtitle_extensions and not name.startswith("."):
            return lib, "subtitle"
        return lib, "other"

    def _path_changed(self, path: Path, kind: str, t0: float) -> None:
        lib, what = self._classify(path)
        if what == "film" and lib is not None:
            self._film_touched(path, lib, kind, t0)
        elif what == "subtitle" and lib is not None:
            for film in self._films_for_subtitle(path, lib):
                self._subtitles_changed(self.reg.films[film], kind, t0)

    def _path_gone(self, path: Path, t0: float) -> None:
        lib, what = self._classify(path)
        if what == "film":
            self._film_gone(path)
        elif what == "subtitle" and lib is not None:
            # A vanished subtitle is often half of a rename (Radarr renames film and subtitles one by one):
            # look again once things are quiet instead of wiping results mid-rename.
            for film in self._films_for_subtitle(path, lib):
                self._push_timer(time.monotonic() + max(self.config.daemon.settle_seconds, 0.5), "subs", film)

    def _films_for_subtitle(self, sub: Path, lib: LibraryConfig) -> list[Path]:
        exts = frozenset(lib.subtitle_extensions)
        return [f for f in self.reg.films_in(sub.parent) if subtitle_belongs_to(sub.name, f.stem, exts)]

    def _moved(self, src: Path, dest: Path, t0: float) -> None:
        _, src_kind = self._classify(src)
        dest_lib, dest_kind = self._classify(dest)
        src_state = self.reg.films.get(src)
        if dest_kind == "film" and dest_lib is not None:
            if src_state is not None and dest not in self.reg.films:
                self._film_renamed(src_state, dest, dest_lib, t0)
            else:
                if src_state is not None:
                    self._film_gone(src)
                state = self._film_touched(dest, dest_lib, "replaced", t0)
                if src_state is None and state is not None and src_kind == "film":
                    self._follow_unknown_rename(src, state, t0)
        else:
            if src_kind == "film":
                self._film_gone(src)
            elif src_kind == "subtitle":
                self._path_gone(src, t0)
            if dest_kind == "subtitle" and dest_lib is not None:
                self._path_changed(dest, "moved", t0)

    def _dir_event(self, ev: FsEvent, src: Path, dest: Path | None) -> None:
        if ev.kind == "deleted" or (ev.kind == "moved" and dest is not None and self.library_for(dest) is None):
            for film in self.reg.films_under(src):
                self._film_gone(film)
            if self.reg.root_of(src) == src:
                self._root_missing(src)
        if ev.kind == "moved" and dest is not None and self.library_for(dest) is not None:
            moved = self.reg.films_under(src)
            for film in moved:
                state = self.reg.films[film]
                new_film = dest / film.relative_to(src)
                self._film_renamed(state, new_film, self.library_for(new_film), ev.t0, dir_moved=True)
            self._scan_new_folder(dest, ev.t0)
        elif ev.kind == "created":
            self._scan_new_folder(src, ev.t0)

    def _scan_new_folder(self, folder: Path, t0: float) -> None:
        lib = self.library_for(folder)
        if lib is None or in_work_dir(folder) or is_work_dir_name(folder.name):
            return
        result = ScanResult(lib.path)
        vexts, sexts = frozenset(lib.video_extensions), frozenset(lib.subtitle_extensions)
        stack = [folder]
        while stack:
            stack.extend(scan_folder(stack.pop(), vexts, sexts, result))
        for film, subs in result.films.items():
            if film not in self.reg.films:
                state = self._film_touched(film, lib, "created", t0)
                if state is not None:
                    state.subtitles = subs

    # ----------------------------------------------------------------- film lifecycle
    def _register(self, film: Path, lib: LibraryConfig, subtitles: tuple[Path, ...] | None = None) -> FilmState:
        from cinecutd.discovery import subtitles_of

        wd = WorkDir.for_film(film)
        subs = subtitles_of(film, lib.subtitle_extensions) if subtitles is None else subtitles
        state = FilmState(film, lib.path, wd.path, subs, wd=wd)
        self.reg.add(state)
        self.reg.orphans.pop(wd.path, None)
        # A same-stem twin appearing live (Heat.mp4 beside Heat.mkv) shares the work dir: mark the conflict
        # now, so the newcomer cannot invalidate its twin's results before the next rescan notices.
        siblings = self.reg.films_in(state.folder)
        if len(siblings) < 2:
            return state
        claim = sorted(f for f in siblings if self.reg.films[f].work_dir == wd.path)
        if len(claim) > 1:
            self.reg.conflicts[wd.path] = claim
            for f in claim:
                self.reg.films[f].conflict = True
        return state

    def _film_touched(self, film: Path, lib: LibraryConfig, kind: str, t0: float) -> FilmState | None:
        state = self.reg.films.get(film)
        new = state is None
        try:
            st = os.stat(film)
        except OSError:
            if not new:
                self._film_gone(film)
            return None  # an event that outlived its file (renamed or deleted since): nothing to register
        if state is None:
            state = self._register(film, lib)
        state.last_event = (kind, time.time())
        stamp = SourceStamp.from_stat(st)
        if stamp == state.stamp and not new:
            return state
        now = time.monotonic()
        in_burst = state.settle_due is not None
        state.stamp, state.inode, state.device = stamp, st.st_ino, st.st_dev
        state.last_change = now
        due = now + self.config.daemon.settle_seconds
        state.settle_due = due
        self._push_timer(due, "settle", film)
        if in_burst:
            self.reg.counters["coalesced"] += 1
            return state
        if new and self._adopt_moved_results(state):
            return state
        self._revalidate(state, t0, kind)
        return state

    def _subtitles_changed(self, state: FilmState, kind: str, t0: float) -> None:
        lib = self.library_for(state.film)
        if lib is None:
            return
        from cinecutd.discovery import subtitles_of

        old_film = self._renaming.get(state.film)
        if old_film is not None:
            if self._sidecars_left(old_film, lib):
                return  # the rest of a rename is on its way
            del self._renaming[state.film]
        state.subtitles = subtitles_of(state.film, lib.subtitle_extensions)
        state.last_event = (f"subtitle {kind}", time.time())
        self._revalidate(state, t0, f"subtitle {kind}")

    def _film_gone(self, film: Path) -> None:
        state = self.reg.remove(film)
        if state is None:
            return
        self.reg.counters["films_gone"] += 1
        if state.inode is not None and state.device is not None and state.stamp is not None:
            if self._follow_to_twin(state):
                return
            self._gone[(state.device, state.inode)] = (film, state.stamp, time.monotonic())
        wd = state.work_dir
        claim = self.reg.conflicts.get(wd)
        if claim is not None:
            rest = [f for f in claim if f != film and f in self.reg.films]
            if len(rest) > 1:
                self.reg.conflicts[wd] = rest
            else:
                del self.reg.conflicts[wd]
                for f in rest:
                    self.reg.films[f].conflict = False
        still_claimed = any(WorkDir.for_film(f).path == wd for f in self.reg.films_in(film.parent))
        if not still_claimed and os.path.lexists(wd):
            self.reg.orphans.setdefault(wd, time.time())
            log.info("orphaned", film=str(film), work_dir=str(wd), reason="film deleted or moved out")

    def _film_renamed(
        self, state: FilmState, new_film: Path, lib: LibraryConfig | None, t0: float, *, dir_moved: bool = False
    ) -> None:
        """Same inode, same content, new name: carry the work dir along instead of recomputing."""
        old_film = state.film
        self.reg.remove(old_film)
        waiting = self._migrations.pop(old_film, None)
        unconfirmed = self._unconfirmed.pop(old_film, None)
        if lib is None:
            return
        if waiting is not None and not dir_moved:  # renamed again before its work dir could follow
            old_film = waiting[0]
        new_state = self._register(new_film, lib)
        new_state.stamp, new_state.inode, new_state.device = state.stamp, state.inode, state.device
        new_state.last_event = ("renamed", time.time())
        if waiting is not None and not dir_moved and unconfirmed is not None:
            # Still waiting for a pipeline's commit mark under an older name: go on waiting, for the new one.
            self._await_results(old_film, new_state, unconfirmed)
            self._judge_after_move(old_film, new_state, lib, t0, "renamed")
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
        if os.path.lexists(old_wd) or os.path.lexists(new_state.work_dir):
            self._migrate(old_film, new_film, t0, moved_with_folder=dir_moved)
        self._judge_after_move(old_film, new_state, lib, t0, "renamed")

    def _judge_after_move(self, old_film: Path, new_state: FilmState, lib: LibraryConfig, t0: float,
                          trigger: str) -> None:
        """Revalidate a film that was renamed or moved, once its subtitle sidecars have followed it."""
        new_film = new_state.film
        if old_film != new_film and self._sidecars_left(old_film, lib):
            # The subtitles are being renamed or moved after the film (Radarr does them one by one):
            # judging them now would take the gap for a subtitle change and wipe the results. The last
            # sidecar's arrival (or a timer) revalidates.
            self._renaming[new_film] = old_film
            self._push_timer(time.monotonic() + max(self.config.daemon.settle_seconds, 0.5), "subs", new_film)
            if SourceStamp.maybe(new_film) == new_state.stamp:
                return
        else:
            # The sidecars finished their moves while the work dir moved: list them again, or the
            # listing taken at registration (before their moves) would read as deleted subtitles.
            from cinecutd.discovery import subtitles_of

            new_state.subtitles = subtitles_of(new_film, lib.subtitle_extensions)
        self._revalidate(new_state, t0, trigger)

    def _follow_unknown_rename(self, src: Path, state: FilmState, t0: float) -> None:
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
        verdict = self._results_of(src, state)
        if verdict == "theirs":
            return
        if verdict == "mine":
            self._migrate(src, state.film, t0)
        else:
            self._await_results(src, state, time.monotonic() + UNCONFIRMED_WAIT_S)
        self._judge_after_move(src, state, self._lib_of(state), t0, "renamed")

    def _results_of(self, old_film: Path, state: FilmState) -> str:
        """Whose results the work dir of ``old_film`` (a name ``state`` was renamed from) holds: ``mine``
        (our commit mark, or else upstream's cache, names this very file), ``theirs`` (another file's, or
        nothing to carry), or ``unknown`` (a pipeline holds it, or it has no commit mark yet)."""
        old = WorkDir.for_film(old_film)
        if not os.path.lexists(old.path) or os.path.lexists(state.work_dir):
            return "theirs"
        if is_work_dir_locked(old.path):
            return "unknown"  # a pipeline is writing it: its commit mark, once written, decides
        rec = read_stamps(old.path)
        if rec is None:
            meta = read_cache_metadata(old.cache_path)  # results of an upstream run carry no sidecar of ours
            if meta is not None and meta.source_file == str(old_film) and meta.stamp == state.stamp:
                return "mine"
            return "unknown"
        if (rec.device, rec.inode) != (state.device, state.inode) or rec.video != state.stamp:
            return "theirs"
        return "mine"

    def _await_results(self, old_film: Path, state: FilmState, deadline: float) -> None:
        """Hold the move of ``old_film``'s work dir to ``state`` (and its judgement) until its results are
        known to be this film's; retried with the pending invalidations."""
        self._migrations[state.film] = (old_film, False)
        self._unconfirmed[state.film] = deadline
        log.info("migration_deferred", film=str(state.film), old_film=str(old_film),
                 reason="results under the old name not committed yet")
        self._defer(state, "renamed", LockBusy(WorkDir.for_film(old_film).lock_path))

    def _sidecars_left(self, old_film: Path, lib: LibraryConfig) -> bool:
        from cinecutd.discovery import subtitles_of

        return bool(subtitles_of(old_film, lib.subtitle_extensions))

    def _migrate(self, old_film: Path, new_film: Path, t0: float, *, moved_with_folder: bool = False) -> None:
        try:
            report = migrate_work_dir(old_film, new_film, moved_with_folder=moved_with_folder)
            trim_heap()
        except LockBusy:
            log.info("migration_deferred", film=str(new_film), reason="work dir locked by a pipeline")
            self._migrations[new_film] = (old_film, moved_with_folder)
            state = self.reg.films.get(new_film)
            if state is not None:
                self._defer(state, "renamed", LockBusy(WorkDir.for_film(old_film).lock_path))
            return
        except (MigrationError, OSError) as exc:
            log.warning("migration_skipped", film=str(new_film), old_film=str(old_film), reason=str(exc))
            old_wd = WorkDir.for_film(old_film).path
            if os.path.lexists(old_wd):
                self.reg.orphans.setdefault(old_wd, time.time())
            return
        self.reg.orphans.pop(WorkDir.for_film(old_film).path, None)
        self.reg.counters["migrations"] += 1
        log.info(
            "migrated",
            film=str(new_film),
            old_film=str(old_film),
            work_dir=report.new_work_dir,
            rewritten=report.rewritten,
            latency_ms=round((time.monotonic() - t0) * 1000, 3),
        )

    def _follow_to_twin(self, gone: FilmState) -> bool:
        """The vanished film already reappeared elsewhere (same inode and stamp, no work dir there yet):
        carry its work dir to it. True if it did."""
        now = time.monotonic()
        twin = self._fresh.pop((gone.device or 0, gone.inode or 0), None)
        if twin is None or twin[1] != gone.stamp or now - twin[2] >= GONE_MEMORY_S:
            return False
        state = self.reg.films.get(twin[0])
        if state is None or os.path.lexists(state.work_dir) or not os.path.lexists(gone.work_dir):
            return False
        self._migrate(gone.film, state.film, now)
        self._judge_after_move(gone.film, state, self._lib_of(state), now, "moved")
        return True

    def _adopt_moved_results(self, state: FilmState) -> bool:
        """A new film that is a recently vanished one (same device and inode, same stamp): a move across
        watches. Carry its work dir along."""
        key = (state.device or 0, state.inode or 0)
        gone = self._gone.pop(key, None)
        now = time.monotonic()
        self._gone = {k: v for k, v in self._gone.items() if now - v[2] < GONE_MEMORY_S}
        self._fresh = {k: v for k, v in self._fresh.items() if now - v[2] < GONE_MEMORY_S}
        if gone is not None and gone[1] == state.stamp and os.path.lexists(WorkDir.for_film(gone[0]).path):
            self._migrate(gone[0], state.film, now)
            self._judge_after_move(gone[0], state, self._lib_of(state), now, "moved")
            return True
        # No usable memory (or a stale one: the same file moved on again since): the work dir may have
        # travelled with the film's folder, or may still follow when the old path's deletion arrives.
        if state.stamp is not None and not os.path.lexists(state.work_dir):
            self._fresh[key] = (state.film, state.stamp, now)
            return False
        return self._adopt_travelled_work_dir(state, now)

    def _adopt_travelled_work_dir(self, state: FilmState, now: float) -> bool:
        """A new film whose folder arrived with its work dir (a folder moved across roots: one watch sees it
        leave, the other sees it appear, in no useful order). Our sidecar names the film the results belong
        to; if that is this very file (same device and inode) under its old path, which is gone, only the
        stored paths need rewriting."""
        recorded = read_stamps(state.work_dir)
        if recorded is None or recorded.source_file == str(state.film) or recorded.inode is None:
            return False
        old_film = Path(recorded.source_file)
        if (recorded.device, recorded.inode) != (state.device, state.inode) or os.path.lexists(old_film):
            return False
        if WorkDir.for_film(old_film).path.name != state.work_dir.name:
            return False
        self._migrate(old_film, state.film, now, moved_with_folder=True)
        self._judge_after_move(old_film, state, self._lib_of(state), now, "moved")
        return True

    def _lib_of(self, state: FilmState) -> LibraryConfig:
        lib = self.library_for(state.film)
        assert lib is not None, "a registered film is always inside a configured root"
        return lib

    # ----------------------------------------------------------------- revalidation
    def _revalidate(self, state: FilmState, t0: float, trigger: str) -> Revalidation | None:
        if state.film in self._migrations:
            return None  # its work dir has not followed it yet; judged once the move is done
        if state.conflict and not self._owns_work_dir(state):
            return None
        self.reg.counters["revalidations"] += 1
        try:
            res = revalidate(state.film, state.subtitles)
        except LockBusy as exc:
            self._defer(state, trigger, exc)
            return None
        except (OSError, ValueError) as exc:  # ValueError: e.g. a name that cannot be encoded; never fatal
            log.error("revalidation_failed", film=str(state.film), error=str(exc))
            self.reg.counters["errors"] += 1
            return None
        if state.pending:
            log.info("pending_applied", film=str(state.film), reason=state.pending)
            self._pending.discard(state.film)
        state.pending, state.pending_since = None, None
        self._apply(state, res, t0, trigger)
        return res

    def _defer(self, state: FilmState, trigger: str, exc: LockBusy) -> None:
        if state.pending is None:
            state.pending = trigger
            state.pending_since = time.time()
            self.reg.counters["deferred"] += 1
            who = exc.holder or {}
            log.info("deferred", film=str(state.film), reason="work dir locked by a pipeline", holder=who.get("purpose"))
        if state.film not in self._pending:
            self._pending.add(state.film)
            self._push_timer(time.monotonic() + PENDING_RETRY_S, "pending", state.film)

    def _retry_pending(self, film: Path) -> None:
        self._pending.discard(film)
        state = self.reg.films.get(film)
        if state is None or state.pending is None:
            self._migrations.pop(film, None)
            self._unconfirmed.pop(film, None)
            return
        waiting = self._migrations.get(film)
        held = state.work_dir if waiting is None or waiting[1] else WorkDir.for_film(waiting[0]).path
        if is_work_dir_locked(held):
            self._pending.add(film)
            self._push_timer(time.monotonic() + PENDING_RETRY_S, "pending", film)
            return
        deadline = self._unconfirmed.get(film)
        if waiting is not None and deadline is not None:
            verdict = self._results_of(waiting[0], state)
            if verdict == "unknown" and time.monotonic() < deadline:
                self._pending.add(film)
                self._push_timer(time.monotonic() + PENDING_RETRY_S, "pending", film)
                return
            del self._unconfirmed[film]
            if verdict != "mine":  # not this film's results after all: they stay where they are
                del self._migrations[film]
                waiting = None
        if waiting is not None:
            del self._migrations[film]
            self._migrate(waiting[0], film, time.monotonic(), moved_with_folder=waiting[1])
            if film in self._migrations:  # locked again meanwhile: deferred once more
                return
        if is_work_dir_locked(state.work_dir):
            self._pending.add(film)
            self._push_timer(time.monotonic() + PENDING_RETRY_S, "pending", film)
            return
        now = time.monotonic()
        if self._adopt_travelled_work_dir(state, now):
            return  # its folder moved while a pipeline held the work dir: paths rewritten, then judged
        self._revalidate(state, now, state.pending)

    def _final_revalidation(self, state: FilmState) -> None:
        """After a burst went quiet: one last look, so the final state of the film is what counts."""
        try:
            st = os.stat(state.film)
        except OSError:
            self._film_gone(state.film)
            return
        state.stamp, state.inode, state.device = SourceStamp.from_stat(st), st.st_ino, st.st_dev
        if any(not os.path.lexists(sub) for sub in state.subtitles):
            # A sidecar listed for it is gone: most often half of a rename under way (Radarr renames the
            # subtitles first, then the film), whose events may still be on their way through the watcher.
            # Judged now, the gap would read as a deleted subtitle and wipe valid results; judged once things
            # are quiet, as any subtitle deletion is.
            self._push_timer(time.monotonic() + max(self.config.daemon.settle_seconds, 0.5), "subs", state.film)
        else:
            self._revalidate(state, time.monotonic(), "settled")
        if self.on_film_changed is not None:
            self.on_film_changed(state)

    def _apply(self, state: FilmState, res: Revalidation, t0: float, trigger: str) -> None:
        state.has_work_dir = res.exists
        state.refused = res.refused
        if res.refused:
            log.warning("refused", film=str(state.film), reason=res.refused)
        if res.cache is not None:
            state.cache = "valid" if res.cache.stamp == state.stamp else "stale"
        elif res.exists:
            state.cache = "missing" if not os.path.lexists(WorkDir.for_film(state.film).cache_path) else "corrupt"
        else:
            state.cache = "missing"
        rep = res.report
        if rep is None or not rep.changed_anything:
            return
        latency = (time.monotonic() - t0) * 1000
        state.stale_fixed += 1
        c = self.reg.counters
        c["invalidations"] += 1
        c["bytes_reclaimed"] += rep.bytes_reclaimed
        record = {
            "film": str(state.film),
            "reason": rep.reason,
            "trigger": trigger,
            "stages": rep.stages_reset,
            "files_removed": len(rep.files_removed),
            "bytes_reclaimed": rep.bytes_reclaimed,
            "latency_ms": round(latency, 3),
            "at": time.time(),
        }
        self.reg.recent.appendleft(record)
        log.info(
            "invalidated",
            film=str(state.film),
            reason=rep.reason,
            trigger=trigger,
            stages=rep.stages_reset,
            fields=rep.fields_nulled,
            files_removed=len(rep.files_removed),
            bytes_reclaimed=rep.bytes_reclaimed,
            refused=rep.refused or None,
            latency_ms=round(latency, 3),
        )
        if self.on_film_changed is not None:
            self.on_film_changed(state)

    def _owns_work_dir(self, state: FilmState) -> bool:
        """For same-stem conflicts: the film the work dir's checkpoint or cache names is its owner."""
        from cinecut.checkpoint import load_checkpoint

        wd = WorkDir.for_film(state.film)
        ckpt = load_checkpoint(wd.path)
        if ckpt is not None:
            return ckpt.source_file == str(state.film)
        meta = read_cache_metadata(wd.cache_path)
        return meta is not None and meta.source_file == str(state.film)

    # ----------------------------------------------------------------- reconcile
    def reconcile(self, reason: str) -> dict[str, Any]:
        """Full scan of every root: the safety net under lost events, and the startup catch-up."""
        faults.point("rescan")
        t0 = time.monotonic()
        c = self.reg.counters
        c["rescans"] += 1
        found: dict[Path, tuple[LibraryConfig, tuple[Path, ...]]] = {}
        work_dirs: set[Path] = set()
        scanned_roots: set[Path] = set()
        self.reg.unreadable = []
        for lib in self._libraries:
            res = scan_root(lib.path, lib.video_extensions, lib.subtitle_extensions)
            root_state = self.reg.roots.setdefault(lib.path, RootState(lib.path, lib.watch))
            if res.missing:
                if root_state.state != "missing":
                    log.warning("root_missing", root=str(lib.path), detail=res.unreadable[0][1] if res.unreadable else "")
                self._root_missing(lib.path)
                continue
            if root_state.state in ("missing", "unreadable"):
                root_state.state = "pending-watch"
            scanned_roots.add(lib.path)
            root_state.films = len(res.films)
            for path, why in res.unreadable:
                self.reg.unreadable.append((str(path), why))
            for film, subs in res.films.items():
                found[film] = (lib, subs)
            work_dirs |= res.work_dirs
        # Finish migrations a crash interrupted before trusting any work dir.
        for wd in [w for w in work_dirs if os.path.lexists(f"{w}/{JOURNAL_NAME}")]:
            try:
                rep = resume_migration(wd, within=lambda f: self.library_for(f) is not None)
            except (LockBusy, MigrationError, OSError, ValueError) as exc:
                # A pipeline holds it, or the journal names paths that make no sense here: never fatal;
                # the work dir stays as it is (the next reconcile tries again).
                log.warning("migration_resume_failed", work_dir=str(wd), error=str(exc))
                self.reg.counters["errors"] += 1
                continue
            if rep is not None:
                log.info("migration_resumed", film=rep.new_film, work_dir=rep.new_work_dir)
                work_dirs.discard(wd)
                work_dirs.add(Path(rep.new_work_dir))
        if reason == "startup":
            self._sweep_own_temp_files(work_dirs)
        states: list[FilmState] = []
        for film, (lib, subs) in found.items():
            state = self.reg.films.get(film)
            if state is None:
                state = self._register(film, lib, subs)
            state.subtitles = subs
            states.append(state)
        by_wd: dict[Path, list[Path]] = {}
        for state in states:
            by_wd.setdefault(state.work_dir, []).append(state.film)
        conflicts = {wd: sorted(fs) for wd, fs in by_wd.items() if len(fs) > 1}
        self.reg.conflicts = conflicts
        conflicted = {f for fs in conflicts.values() for f in fs}
        orphaned = work_dirs - by_wd.keys()
        if orphaned:
            homeless = [s for s in states if s.work_dir not in work_dirs and s.film not in conflicted]
            if homeless:
                self._adopt_orphans(homeless, orphaned, work_dirs)
        for state in states:
            state.conflict = state.film in conflicted
            self._reconcile_film(state, t0)
        for film in [f for f, s in self.reg.films.items() if s.root in scanned_roots and f not in found]:
            self._film_gone(film)
        film_work_dirs = set(by_wd)
        self.reg.orphans = {
            wd: self.reg.orphans.get(wd, time.time()) for wd in work_dirs if wd not in film_work_dirs
        }
        self._schedule_rescan()
        elapsed = time.monotonic() - t0
        summary = {
            "reason": reason,
            "films": len(found),
            "orphans": len(self.reg.orphans),
            "conflicts": len(conflicts),
            "duration_s": round(elapsed, 4),
        }
        log.info("reconciled", **summary)
        if self.config.daemon.orphans == "reclaim":
            collect_orphans(self.reg, apply=True, min_age_days=self.config.daemon.orphan_grace_days)
        if self.on_reconciled is not None:
            self.on_reconciled()
        return summary

    def _reconcile_film(self, state: FilmState, t0: float) -> None:
        try:
            st = os.stat(state.film)
        except OSError:
            return
        stamp = SourceStamp.from_stat(st)
        if stamp != state.stamp:
            state.last_change = time.monotonic() if state.stamp is not None else state.last_change
        state.stamp, state.inode, state.device = stamp, st.st_ino, st.st_dev
        if state.conflict and not self._owns_work_dir(state):
            return
        p = probe(state.film, state.subtitles, wd=state.wd, st=st)
        state.has_work_dir = p.exists
        if p.needs_revalidation and p.exists and self._adopt_travelled_work_dir(state, t0):
            return  # its folder was renamed while nobody watched: paths rewritten, then revalidated
        if p.needs_revalidation:
            self._revalidate(state, t0, "rescan")
        elif p.cache is not None:
            state.cache = "valid" if p.cache.stamp == stamp else "stale"
        else:
            state.cache = "missing" if not p.exists or not os.path.lexists(state.wd.cache_path) else "corrupt"

    def _adopt_orphans(self, homeless: list[FilmState], orphaned: set[Path], work_dirs: set[Path]) -> None:
        """Films renamed or moved while nobody watched: an orphaned work dir whose stamps sidecar records
        this very file (device, inode, stamp) under a path that is gone follows it to its new name."""
        by_inode: dict[tuple[int | None, int], Path] = {}
        for wd in orphaned:
            rec = read_stamps(wd)
            if rec is None or rec.inode is None or rec.video is None:
                continue
            old = Path(rec.source_file)
            if WorkDir.for_film(old).path == wd and not os.path.lexists(old):
                by_inode[(rec.device, rec.inode)] = old
        for state in homeless if by_inode else ():
            try:
                st = os.stat(state.film)
            except OSError:
                continue
            old_film = by_inode.pop((st.st_dev, st.st_ino), None)
            if old_film is None:
                continue
            old_wd = WorkDir.for_film(old_film).path
            rec = read_stamps(old_wd)
            if rec is None or rec.video != SourceStamp.from_stat(st):
                continue
            self._migrate(old_film, state.film, time.monotonic())
            if not os.path.lexists(old_wd):
                work_dirs.discard(old_wd)
                work_dirs.add(state.work_dir)

    def _sweep_own_temp_files(self, work_dirs: set[Path]) -> None:
        """Remove the temp files of OUR atomic writes that a dead writer left (this daemon SIGKILLed in the
        middle of a write, a crashed pipeline), once, at startup.

        Every writer of ours holds the work-dir lock from creating its temp file until it renames it, and
        flock dies with its holder: a file named like ours (``safefs.OWN_TEMP_RE``) in a work dir whose lock
        we can take is garbage. Upstream takes no lock and names its temp files differently; those keep the
        grace period of ``cinecut.stages.TEMP_FILE_GRACE_S``. Costs one listing per work dir, at startup.
        """
        removed = 0
        for wd in work_dirs:
            try:
                fd = safefs.open_dir(wd)
            except OSError:
                continue
            try:
                names = [n for n in os.listdir(fd) if safefs.OWN_TEMP_RE.match(n)]
                if not names:
                    continue
                lock = work_dir_lock(wd, purpose="temp sweep", dir_fd=fd)
                if not lock.try_acquire():
                    continue  # a live writer: its temp file may be in use
                try:
                    for name in names:
                        try:
                            if safefs.unlink_regular(fd, name) is not None:
                                removed += 1
                        except safefs.SymlinkRefused:
                            continue  # not a file we wrote: left alone
                finally:
                    lock.release()
            except OSError as exc:
                log.warning("temp_sweep_failed", work_dir=str(wd), error=str(exc))
            finally:
                os.close(fd)
        if removed:
            log.info("temp_files_removed", count=removed, reason="left by a writer that died")
            self.reg.counters["temp_files_removed"] += removed

    def _root_missing(self, root: Path) -> None:
        state = self.reg.roots.get(root)
        if state is not None:
            state.state = "missing"
            state.films = 0
        for film in [f for f, s in self.reg.films.items() if s.root == root]:
            # An unmounted root is not a deletion: forget its films, create no orphans.
            self.reg.remove(film)
        self.reg.orphans = {w: t for w, t in self.reg.orphans.items() if not w.is_relative_to(root)}

    # ----------------------------------------------------------------- queries
    def status(self) -> dict[str, Any]:
        reg = self.reg
        films = reg.films.values()
        now = time.monotonic()
        settle = self.config.prewarm.settle_seconds
        per_root: dict[Path, int] = {}
        for st in films:
            per_root[st.root] = per_root.get(st.root, 0) + 1
        return {
            "daemon": {
                "pid": os.getpid(),
                "version": __version__,
                "uptime_s": round(time.time() - reg.started_at, 1),
                "started_at": reg.started_at,
            },
            "roots": [
                {"path": str(r.path), "watch": r.watch, "state": r.state, "films": per_root.get(r.path, 0),
                 "detail": r.detail}
                for r in reg.roots.values()
            ],
            "films": {
                "total": len(reg.films),
                "warm": sum(1 for s in films if s.cache == "valid"),
                "cold": sum(1 for s in films if s.cache != "valid"),
                "stale_fixed": sum(1 for s in films if s.stale_fixed),
                "orphaned": len(reg.orphans),
                "conflicts": len(reg.conflicts),
                "copying": sum(1 for s in films if not s.settled(now, settle)),
            },
            "conflicts": [{"work_dir": str(w), "films": [str(f) for f in fs]} for w, fs in reg.conflicts.items()],
            "orphans": [{"work_dir": str(w), "since": t} for w, t in sorted(reg.orphans.items())],
            "pending": [
                {"film": str(s.film), "reason": s.pending, "since": s.pending_since} for s in films if s.pending
            ],
            "unreadable": [{"path": p, "reason": r} for p, r in reg.unreadable[:50]],
            "recent_invalidations": list(reg.recent)[:20],
            "counters": dict(reg.counters),
        }

    def find_film(self, query: str) -> FilmState:
        """A film by absolute path, by file name or by a unique substring of its path."""
        from cinecutd.control import ControlError

        p = Path(os.path.abspath(query))
        if p in self.reg.films:
            return self.reg.films[p]
        matches = [s for f, s in self.reg.films.items() if f.name == query or f.stem == query]
        if not matches:
            q = query.lower()
            matches = [s for f, s in self.reg.films.items() if q in str(f).lower()]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise ControlError("not_found", f"no watched film matches {query!r}")
        names = ", ".join(sorted(str(s.film) for s in matches)[:5])
        raise ControlError("ambiguous", f"{len(matches)} films match {query!r}: {names}")

    def film_status(self, query: str) -> dict[str, Any]:
        from cinecut.checkpoint import read_checkpoint

        state = self.find_film(query)
        wd = WorkDir.for_film(state.film)
        ck = read_checkpoint(wd.path)
        meta = read_cache_metadata(wd.cache_path)
        current = SourceStamp.maybe(state.film)
        cache: dict[str, Any] = {"state": "missing", "path": str(wd.cache_path)}
        if meta is not None:
            cache.update(
                state="valid" if meta.stamp == current else "stale",
                metadata={"source_file": meta.source_file, "mtime": meta.mtime, "size": meta.size},
            )
        elif os.path.lexists(wd.cache_path):
            cache["state"] = "corrupt"
        return {
            "film": str(state.film),
            "work_dir": str(wd.path),
            "work_dir_exists": os.path.isdir(wd.path) and not os.path.islink(wd.path),
            "stamp": current.to_dict() if current else None,
            "cache": cache,
            "checkpoint": ck.status.value,
            "checkpoint_reason": ck.reason,
            "stages_complete": ck.checkpoint.stages_complete if ck.checkpoint else [],
            "subtitles": [str(s) for s in state.subtitles],
            "last_event": {"kind": state.last_event[0], "at": state.last_event[1]} if state.last_event else None,
            "pending": {"reason": state.pending, "since": state.pending_since} if state.pending else None,
            "locked": is_work_dir_locked(wd.path) if os.path.isdir(wd.path) else False,
            "conflict": state.conflict,
            "refused": state.refused,
            "stale_fixed": state.stale_fixed,
        }


__all__ = ["Engine", "FsEvent"]
