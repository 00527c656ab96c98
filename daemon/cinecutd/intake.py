"""Intake: what the watchers (and Radarr/Sonarr hints) report, turned into the lifecycle of films.

One entry, :meth:`Intake.handle`, takes every :class:`FsEvent` the engine's queue delivers. It classifies
the paths (film, subtitle, work dir, folder), drops what concerns no film (our own work dirs, ghosts of a
folder that left its root), and hands each film to its owner: a rename or move to :class:`cinecutd.moves.Moves`,
a change to :class:`cinecutd.judge.Judge`, lost events to a rescan (:class:`cinecutd.reconciler.Reconciler`).
It registers films and declares them gone; it judges nothing itself.

Timing rules, where they live: the first event of a burst judges the film at once; later events of the
same burst cost one ``stat`` (the burst is "in progress" while ``FilmState.settle_due`` is set); one final
judgement runs when the burst has been quiet for ``settle_seconds``. Overflows are coalesced to one rescan
per :data:`OVERFLOW_RESCAN_GAP_S`.
"""

from __future__ import annotations

import enum
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import structlog

from cinecut.stamp import SourceStamp
from cinecut.workdir import WORK_DIR_SUFFIX, WorkDir, subtitle_stems
from cinecutd.config import Config, LibraryConfig
from cinecutd.cookies import Cookies
from cinecutd.discovery import ScanResult, in_work_dir, is_film_name, iter_scan_tree, subtitles_of
from cinecutd.moves import Moves, owner_twin, owners_first
from cinecutd.registry import FilmState, Registry
from cinecutd.states import EventKind

if TYPE_CHECKING:
    from cinecutd.judge import Judge
    from cinecutd.reconciler import Reconciler

log = structlog.get_logger("cinecutd")

#: The least time between two rescans an inotify overflow asks for.
OVERFLOW_RESCAN_GAP_S = 5.0


@dataclass(slots=True)
class FsEvent:
    """A filesystem event as the watcher saw it, stamped with when the daemon received it."""

    kind: str  # an EventKind value
    src: str
    dest: str | None
    is_dir: bool
    t0: float


class PathKind(enum.StrEnum):
    """What a file path is to the daemon."""

    FILM = "film"
    SUBTITLE = "subtitle"
    OTHER = "other"


class IntakeHost(Protocol):
    """What intake needs of the engine: the registry, the config, where a path belongs, and a timer."""

    reg: Registry
    config: Config
    cookies: Cookies

    def library_for(self, path: Path) -> LibraryConfig | None: ...
    def later(self, due: float, fn: Callable[[], None]) -> None: ...


class Intake:
    """Classifies events and keeps each film's lifecycle: registered, touched, settled, gone."""

    def __init__(self, host: IntakeHost, judge: Judge, moves: Moves) -> None:
        self.host = host
        self.judge = judge
        self.moves = moves
        self.reconciler: Reconciler | None = None  # set by the engine (lost events ask for a rescan)
        self._overflow_due: float | None = None
        self._last_overflow_rescan = -OVERFLOW_RESCAN_GAP_S
        # Folders a new-folder scan listed during the current burst of events: the created/moved events
        # watchdog adds for every sub-folder of a folder that arrived would otherwise each scan their
        # subtree again (quadratic in the depth of a moved-in chain). Forgotten when the queue runs dry
        # (:meth:`burst_over`) and whenever one of them is deleted or moved away.
        self._fresh_folders: set[Path] = set()

    @property
    def _rescans(self) -> Reconciler:
        assert self.reconciler is not None, "the engine wires the reconciler in"
        return self.reconciler

    def burst_over(self) -> None:
        """The engine's queue ran dry: the next folder event may list anew."""
        self._fresh_folders.clear()

    # ----------------------------------------------------------------- the one entry
    def handle(self, ev: FsEvent) -> None:
        """Act on one event (watcher or hint)."""
        host = self.host
        if host.cookies.intercept(ev.kind, ev.src, ev.dest):  # `sync`: proves what came before was handled
            return
        c = host.reg.counters
        c["events"] += 1
        self._rescans.mark(ev.src, ev.dest, ev.is_dir or ev.kind == EventKind.RESYNC)
        if ev.kind == EventKind.RESYNC:
            # A watch died and was replaced: whatever happened meanwhile was not reported. Look again.
            self._rescans.request("watch restarted")
            return
        if ev.kind == EventKind.OVERFLOW:
            c["overflows"] += 1
            self._overflowed()
            return
        src = Path(ev.src)
        dest = Path(ev.dest) if ev.dest else None
        if self._in_work_dir(src) and (dest is None or self._in_work_dir(dest)):
            c["work_dir_events"] += 1
            return
        if not ev.is_dir and ev.kind != EventKind.DELETED and not os.path.isdir((dest or src).parent):
            # A folder that moved out of a root keeps its inotify watches (they follow the inode), and
            # watchdog goes on reporting what happens in it under the old, vanished path. The root it
            # moved to reports the same events under the real path; these ghosts are dropped.
            c["stale_path_events"] += 1
            if ev.kind == EventKind.MOVED:
                self._path_gone(src, ev.t0)
            return
        if ev.is_dir:
            self._dir_event(ev, src, dest)
        elif ev.kind == EventKind.MOVED and dest is not None:
            self._moved(src, dest, ev.t0)
        elif ev.kind == EventKind.DELETED:
            self._path_gone(src, ev.t0)
        else:
            self._path_changed(src, ev.kind, ev.t0)

    def _overflowed(self) -> None:
        # Coalesce: a flood can overflow the queue many times a second; one rescan per few seconds
        # catches everything the kernel dropped without turning the flood into a rescan loop.
        now = time.monotonic()
        due = max(now, self._last_overflow_rescan + OVERFLOW_RESCAN_GAP_S)
        if self._overflow_due is None:
            self._overflow_due = due
            log.warning("inotify_overflow", detail="events were lost; rescan scheduled", in_s=round(due - now, 3))
            self.host.later(due, self._overflow_rescan)

    def _overflow_rescan(self) -> None:
        self._overflow_due = None
        self._last_overflow_rescan = time.monotonic()
        self._rescans.request("inotify overflow")

    # ----------------------------------------------------------------- classification
    def classify(self, path: Path) -> tuple[LibraryConfig | None, PathKind]:
        """What a file path is, with its library."""
        lib = self.host.library_for(path)
        if lib is None or in_work_dir(path, lib.path):
            return lib, PathKind.OTHER
        name = path.name
        if is_film_name(name, lib.video_extensions):
            return lib, PathKind.FILM
        if os.path.splitext(name)[1].lower() in lib.subtitle_extensions and not name.startswith("."):
            return lib, PathKind.SUBTITLE
        return lib, PathKind.OTHER

    def _in_work_dir(self, path: Path) -> bool:
        """The one work-dir rule (:func:`cinecut.workdir.in_work_dir`), below the path's library root."""
        lib = self.host.library_for(path)
        return in_work_dir(path, lib.path if lib is not None else None)

    def films_for_subtitle(self, sub: Path, lib: LibraryConfig) -> list[Path]:
        """Registered films a subtitle belongs to, by its possible stems (never by listing the folder's films:
        a flat folder of 10,000 would make every subtitle event cost 10,000 comparisons)."""
        exts = frozenset(lib.subtitle_extensions)
        out: list[Path] = []
        for stem in subtitle_stems(sub.name, exts):
            for film in self.host.reg.claimants(sub.parent / f"{stem}{WORK_DIR_SUFFIX}"):
                if film.parent == sub.parent and film.stem == stem and film not in out:
                    out.append(film)
        return sorted(out)

    # ----------------------------------------------------------------- file events
    def _path_changed(self, path: Path, kind: str, t0: float) -> None:
        lib, what = self.classify(path)
        if lib is None:
            return
        if what == PathKind.FILM:
            self.film_touched(path, lib, kind, t0)
        elif what == PathKind.SUBTITLE:
            for film in self.films_for_subtitle(path, lib):
                self._subtitles_changed(self.host.reg.films[film], kind, t0)

    def _path_gone(self, path: Path, t0: float) -> None:
        self.moves.path_gone(path)
        lib, what = self.classify(path)
        if what == PathKind.FILM:
            self.film_gone(path)
        elif what == PathKind.SUBTITLE and lib is not None:
            # A vanished subtitle is often half of a rename (Radarr renames film and subtitles one by one):
            # look again once things are quiet instead of wiping results mid-rename.
            for film in self.films_for_subtitle(path, lib):
                self.recheck_subtitles_later(film)

    def _moved(self, src: Path, dest: Path, t0: float) -> None:
        reg = self.host.reg
        _, src_kind = self.classify(src)
        dest_lib, dest_kind = self.classify(dest)
        src_state = reg.films.get(src)
        if dest_kind == PathKind.FILM and dest_lib is not None:
            if src_state is not None and dest not in reg.films:
                self.moves.renamed(src_state, dest, dest_lib, t0)
            else:
                if src_state is not None:
                    self.film_gone(src)
                state = self.film_touched(dest, dest_lib, EventKind.REPLACED, t0)
                if src_state is None and state is not None and src_kind == PathKind.FILM:
                    self.moves.follow_unknown_rename(src, state, t0)
            return
        if src_kind == PathKind.FILM:
            if dest_lib is not None and src_state is not None:
                self.moves.hidden(src_state, dest)
            self.film_gone(src)
        elif src_kind == PathKind.SUBTITLE:
            self._path_gone(src, t0)
        if dest_kind == PathKind.SUBTITLE and dest_lib is not None:
            self._path_changed(dest, EventKind.MOVED, t0)

    # ----------------------------------------------------------------- folder events
    def _dir_event(self, ev: FsEvent, src: Path, dest: Path | None) -> None:
        reg, library_for = self.host.reg, self.host.library_for
        if ev.kind in (EventKind.DELETED, EventKind.MOVED) and src in self._fresh_folders:
            self._fresh_folders.clear()
        dest_lib = library_for(dest) if dest is not None else None
        if ev.kind == EventKind.DELETED or (ev.kind == EventKind.MOVED and dest is not None and dest_lib is None):
            for film in reg.films_under(src):
                self.film_gone(film)
            if reg.root_of(src) == src:
                self._rescans.root_missing(src)
        if ev.kind == EventKind.MOVED and dest is not None and dest_lib is not None:
            for film in owners_first(reg, reg.films_under(src), src, dest):
                new_film = dest / film.relative_to(src)
                self.moves.renamed(reg.films[film], new_film, library_for(new_film), ev.t0, dir_moved=True)
            self._scan_new_folder(dest, ev.t0)
        elif ev.kind == EventKind.CREATED:
            self._scan_new_folder(src, ev.t0)

    def _scan_new_folder(self, folder: Path, t0: float) -> None:
        reg = self.host.reg
        lib = self.host.library_for(folder)
        if lib is None or in_work_dir(folder, lib.path):
            return
        if folder in self._fresh_folders:
            reg.counters["folder_scans_skipped"] += 1
            return  # listed moments ago with the folder it arrived in; its watch reports what came since
        result = ScanResult(lib.path)
        for _ in iter_scan_tree(folder, lib.video_extensions, lib.subtitle_extensions, result,
                                visited=self._fresh_folders):
            pass  # iterative, no depth limit, each folder once (a bind-mount loop ends its branch)
        for film, subs in result.films.items():
            if film not in reg.films:
                state = self.film_touched(film, lib, EventKind.CREATED, t0)
                if state is not None:
                    state.subtitles = subs
        self.moves.follow_unseen_renames(result.work_dirs, t0)

    # ----------------------------------------------------------------- film lifecycle
    def register(self, film: Path, lib: LibraryConfig, subtitles: tuple[Path, ...] | None = None) -> FilmState:
        """Start tracking a film (found by a scan, an event, or a rename)."""
        reg = self.host.reg
        wd = WorkDir.for_film(film)
        subs = subtitles_of(film, lib.subtitle_extensions) if subtitles is None else subtitles
        state = FilmState(film, lib.path, wd.path, subs, wd=wd)
        reg.add(state)
        reg.orphans.pop(wd.path, None)
        # A same-stem twin appearing live (Heat.mp4 beside Heat.mkv) shares the work dir: mark the conflict
        # now, so the newcomer cannot invalidate its twin's results before the next rescan notices.
        claim = sorted(reg.claimants(wd.path))
        if len(claim) > 1:
            reg.conflicts[wd.path] = claim
            for f in claim:
                reg.films[f].conflict = True
        return state

    def film_gone(self, film: Path) -> None:
        """A film left its name (deleted, renamed away, moved out): the moves remember it, then forget it."""
        self.moves.film_gone(film)

    def film_touched(self, film: Path, lib: LibraryConfig, kind: str, t0: float) -> FilmState | None:
        """A film's file was created or changed: judge the first event of a burst, coalesce the rest."""
        reg = self.host.reg
        state = reg.films.get(film)
        new = state is None
        try:
            st = os.stat(film)
        except OSError:
            if not new:
                self.film_gone(film)
            return None  # an event that outlived its file (renamed or deleted since): nothing to register
        if state is None:
            state = self.register(film, lib)
        state.last_event = (kind, time.time())
        stamp = SourceStamp.from_stat(st)
        if stamp == state.stamp and not new:
            return state
        now = time.monotonic()
        in_burst = state.settle_due is not None
        state.stamp, state.inode, state.device = stamp, st.st_ino, st.st_dev
        state.last_change = now
        due = now + self.host.config.daemon.settle_seconds
        state.settle_due = due
        self.host.later(due, partial(self._settled, film, due))
        if in_burst:
            reg.counters["coalesced"] += 1
            return state
        if new and state.wd is not None and os.path.lexists(state.work_dir):
            owner = owner_twin(reg, state)  # register the owner first: this twin is then in conflict
            if owner is not None:
                self.film_touched(owner, lib, kind, t0)
        if new and self.moves.adopt_moved_results(state):
            return state
        self.judge.revalidate(state, t0, kind)
        return state

    def _settled(self, film: Path, due: float) -> None:
        state = self.host.reg.films.get(film)
        if state is not None and state.settle_due == due:
            state.settle_due = None
            self.judge.final_revalidation(state)

    def _subtitles_changed(self, state: FilmState, kind: str, t0: float) -> None:
        lib = self.host.library_for(state.film)
        if lib is None:
            return
        if self.moves.waits_for_sidecars(state.film, lib):
            return  # the rest of a rename is on its way
        state.subtitles = subtitles_of(state.film, lib.subtitle_extensions)
        state.last_event = (f"subtitle {kind}", time.time())
        self.judge.revalidate(state, t0, f"subtitle {kind}")

    def recheck_subtitles_later(self, film: Path) -> None:
        """Look at a film's subtitles again once things are quiet (half of a rename may be on its way)."""
        due = time.monotonic() + max(self.host.config.daemon.settle_seconds, 0.5)
        self.host.later(due, partial(self._recheck_subtitles, film))

    def _recheck_subtitles(self, film: Path) -> None:
        self.moves.renaming.pop(film, None)
        state = self.host.reg.films.get(film)
        if state is not None:
            self._subtitles_changed(state, EventKind.DELETED, time.monotonic())


__all__ = ["OVERFLOW_RESCAN_GAP_S", "FsEvent", "Intake", "IntakeHost", "PathKind"]
