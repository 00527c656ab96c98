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
from typing import Any, NamedTuple

import structlog

from cinecut import __version__, safefs
from cinecut.inference.cache import read_cache_metadata
from cinecut.inference.salvage import read_salvage
from cinecut.locks import LockBusy, is_work_dir_locked, work_dir_lock
from cinecut.ownership import Evidence, Identity, Owner, judge, read_evidence, real
from cinecut.paths import same_film_path
from cinecut.problems import Problem
from cinecut.revalidate import Revalidation, probe, revalidate
from cinecut.stages import Input, invalidate
from cinecut.stamp import SourceStamp
from cinecut.stamps import InputStamps, read_stamps
from cinecut.workdir import (
    WORK_DIR_SUFFIX,
    WorkDir,
    subtitle_stems,
)
from cinecutd.config import Config, LibraryConfig
from cinecutd.cookies import Cookies
from cinecutd.discovery import ScanResult, in_work_dir, is_film_name, iter_scan_tree
from cinecutd.health import Health, access_problems, older_than_film, remedy
from cinecutd.memory import trim_heap
from cinecutd.migrate import (
    MigrationError,
    is_parked_name,
    migrate_work_dir,
    park_work_dir,
)
from cinecutd.reconcile import SLICE_S, ReconcileJob
from cinecutd.registry import FilmState, Registry
from cinecutd.tallies import Tallies
from cinecutd.upstream_orphans import orphans_by_cache_stamp

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


class _Move(NamedTuple):
    """A work-dir move waiting for a pipeline's lock (or for the results' commit mark)."""

    old_film: Path
    with_folder: bool
    src_dir: Path | None = None  # a parked work dir, instead of ``old_film``'s
    identity: Identity | None = None  # the moving file's (device, inode)


class _Call:
    __slots__ = ("done", "error", "fn", "on_done", "result")

    def __init__(self, fn: Callable[[], Any],
                 on_done: Callable[[Any, BaseException | None], None] | None = None) -> None:
        self.fn = fn
        self.on_done = on_done
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
        self._migrations: dict[Path, _Move] = {}
        # Work dirs moved out of the way of a film that took their name (``mv A.mkv .swap; mv B.mkv A.mkv``),
        # by the (device, inode) of the file whose results they hold: handed back when it reappears.
        self._parked: dict[Identity, tuple[Path, Path, float]] = {}
        # Films renamed to a name the scan ignores inside a library (``.swap``, ``.part``): still there, by
        # (device, inode) -> (hidden path, when). Their results are parked, never judged, if another file
        # lands on their old name meanwhile.
        self._hiding: dict[Identity, tuple[Path, float]] = {}
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
        self.health = Health()  # blocked films: problems that stopped an invalidation, retried with backoff
        self.tallies = Tallies()  # latency and rescan-duration histograms, for the metrics
        # The rescan in progress (run in slices between queue items) and the one asked for meanwhile.
        self._job: ReconcileJob | None = None
        self._job_next: ReconcileJob | None = None
        self._loops_warned: set[Path] = set()
        # Folders a new-folder scan listed during the current burst of events: the created/moved events
        # watchdog adds for every sub-folder of a folder that arrived would otherwise each scan their
        # subtree again (quadratic in the depth of a moved-in chain). Forgotten when the queue runs dry
        # and whenever one of them is deleted or moved away.
        self._fresh_folders: set[Path] = set()
        self.cookies = Cookies()  # `sync` requests waiting for their cookie's event (cinecutd.cookies)
        self._schedule_rescan()

    # ----------------------------------------------------------------- inputs from other threads
    def post_event(self, kind: str, src: str, dest: str | None = None, is_dir: bool = False) -> None:
        """Called by watcher threads; cheap and non-blocking."""
        self.queue.put(FsEvent(kind, src, dest, is_dir, time.monotonic()))

    def post_hint(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the engine thread between queued events, without waiting for it (Radarr/Sonarr
        hints, ``cinecutd.hints``: ``fn`` turns them into the events inotify would have posted)."""
        self.queue.put(_Call(fn))

    def submit(self, fn: Callable[[], Any], on_done: Callable[[Any, BaseException | None], None]) -> None:
        """Run ``fn`` on the engine thread; ``on_done(result, error)`` is called there once it returns.
        Nothing waits: the control socket's completion callback wakes its own loop to send the answer."""
        self.queue.put(_Call(fn, on_done))

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
        """Process one queued item (or wait up to ``max_wait``), then due timers, then one slice of a
        rescan in progress: queued events never wait for more than a slice of it."""
        now = time.monotonic()
        wait = max_wait
        if self._timers:
            wait = max(0.0, min(wait, self._timers[0][0] - now))
        if self._job is not None or self._job_next is not None:
            wait = 0.0
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
                    self._fresh_folders.clear()
                    break
        self._run_timers()
        self._step_rescan()
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
            if item.on_done is not None:
                try:
                    item.on_done(item.result, item.error)
                except Exception as exc:  # a caller's callback must never stop the engine
                    log.error("callback_failed", error=repr(exc))

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
                    self.request_reconcile("inotify overflow")
                elif what == "blocked":
                    self._retry_blocked(film)
                elif what == "subs":
                    state = self.reg.films.get(film)
                    self._renaming.pop(film, None)
                    if state is not None:
                        self._subtitles_changed(state, "deleted", now)
            except Exception as exc:
                log.error("timer_failed", film=str(film), what=what, error=repr(exc))
        if self.next_rescan is not None and now >= self.next_rescan:
            self.next_rescan = None  # scheduled again when this rescan ends
            self.request_reconcile("periodic")

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
        if self._job is not None:  # it scans the old roots: start over on the new ones
            self._job.cancel()
            self._job_next = ReconcileJob(self, self._job.reason, self._job.waiters + (
                self._job_next.waiters if self._job_next is not None else []))
            self._job = None
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
        if self.cookies.intercept(ev.kind, ev.src, ev.dest):  # `sync`: proves what came before was handled
            return
        c = self.reg.counters
        c["events"] += 1
        if self._job is not None:
            self._job.mark(ev.src, ev.dest, ev.is_dir or ev.kind == "resync")
        if ev.kind == "resync":
            # A watch died and was replaced: whatever happened meanwhile was not reported. Look again.
            self.request_reconcile("watch restarted")
            return
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
        if self._in_work_dir(src) and (dest is None or self._in_work_dir(dest)):
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
        if lib is None or in_work_dir(path, lib.path):
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
        if self._hiding:  # a film hiding under an ignored name was deleted there: no longer anyone's to wait for
            self._hiding = {k: v for k, v in self._hiding.items() if v[0] != path}
        lib, what = self._classify(path)
        if what == "film":
            self._film_gone(path)
        elif what == "subtitle" and lib is not None:
            # A vanished subtitle is often half of a rename (Radarr renames film and subtitles one by one):
            # look again once things are quiet instead of wiping results mid-rename.
            for film in self._films_for_subtitle(path, lib):
                self._push_timer(time.monotonic() + max(self.config.daemon.settle_seconds, 0.5), "subs", film)

    def _in_work_dir(self, path: Path) -> bool:
        """The one work-dir rule (:func:`cinecut.workdir.in_work_dir`), below the path's library root."""
        lib = self.library_for(path)
        return in_work_dir(path, lib.path if lib is not None else None)

    def _films_for_subtitle(self, sub: Path, lib: LibraryConfig) -> list[Path]:
        """Registered films a subtitle belongs to, by its possible stems (never by listing the folder's films:
        a flat folder of 10,000 would make every subtitle event cost 10,000 comparisons)."""
        exts = frozenset(lib.subtitle_extensions)
        out: list[Path] = []
        for stem in subtitle_stems(sub.name, exts):
            for film in self.reg.claimants(sub.parent / f"{stem}{WORK_DIR_SUFFIX}"):
                if film.parent == sub.parent and film.stem == stem and film not in out:
                    out.append(film)
        return sorted(out)

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
                if dest_lib is not None and src_state is not None:
                    self._hidden(src_state, dest)
                self._film_gone(src)
            elif src_kind == "subtitle":
                self._path_gone(src, t0)
            if dest_kind == "subtitle" and dest_lib is not None:
                self._path_changed(dest, "moved", t0)

    def _dir_event(self, ev: FsEvent, src: Path, dest: Path | None) -> None:
        if ev.kind in ("deleted", "moved") and src in self._fresh_folders:
            self._fresh_folders.clear()
        if ev.kind == "deleted" or (ev.kind == "moved" and dest is not None and self.library_for(dest) is None):
            for film in self.reg.films_under(src):
                self._film_gone(film)
            if self.reg.root_of(src) == src:
                self._root_missing(src)
        if ev.kind == "moved" and dest is not None and self.library_for(dest) is not None:
            moved = self._owners_first(self.reg.films_under(src), src, dest)
            for film in moved:
                state = self.reg.films[film]
                new_film = dest / film.relative_to(src)
                self._film_renamed(state, new_film, self.library_for(new_film), ev.t0, dir_moved=True)
            self._scan_new_folder(dest, ev.t0)
        elif ev.kind == "created":
            self._scan_new_folder(src, ev.t0)

    def _scan_new_folder(self, folder: Path, t0: float) -> None:
        lib = self.library_for(folder)
        if lib is None or in_work_dir(folder, lib.path):
            return
        if folder in self._fresh_folders:
            self.reg.counters["folder_scans_skipped"] += 1
            return  # listed moments ago with the folder it arrived in; its watch reports what came since
        result = ScanResult(lib.path)
        for _ in iter_scan_tree(folder, lib.video_extensions, lib.subtitle_extensions, result,
                                visited=self._fresh_folders):
            pass  # iterative, no depth limit, each folder once (a bind-mount loop ends its branch)
        for film, subs in result.films.items():
            if film not in self.reg.films:
                state = self._film_touched(film, lib, "created", t0)
                if state is not None:
                    state.subtitles = subs
        self._follow_unseen_renames(result.work_dirs, t0)

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
        claim = sorted(self.reg.claimants(wd.path))
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
        if new and state.wd is not None and os.path.lexists(state.work_dir):
            self._meet_owner_twin(state, lib, kind, t0)
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
        self._drop_conflict(film, wd)
        still_claimed = bool(self.reg.claimants(wd))
        if not still_claimed and os.path.lexists(wd):
            self.reg.orphans.setdefault(wd, time.time())
            log.info("orphaned", film=str(film), work_dir=str(wd), reason="film deleted or moved out")

    def _drop_conflict(self, film: Path, wd: Path) -> None:
        """``film`` no longer claims ``wd``: a twin left alone is no longer in conflict."""
        claim = self.reg.conflicts.get(wd)
        if claim is None:
            return
        rest = [f for f in claim if f != film and f in self.reg.films]
        if len(rest) > 1:
            self.reg.conflicts[wd] = rest
        else:
            del self.reg.conflicts[wd]
            for f in rest:
                self.reg.films[f].conflict = False

    def _owners_first(self, films: list[Path], src: Path, dest: Path) -> list[Path]:
        """Films of a moved folder, each work dir's owner before its same-stem twins: a twin handled first
        would find nobody at the new place to share the work dir with, and be judged against its results."""
        shared: dict[Path, int] = {}
        for f in films:
            shared[self.reg.films[f].work_dir] = shared.get(self.reg.films[f].work_dir, 0) + 1
        if all(n < 2 for n in shared.values()):
            return films

        def rank(f: Path) -> int:
            wd = self.reg.films[f].work_dir
            if shared[wd] < 2:
                return 0
            return 0 if judge(read_evidence(dest / wd.relative_to(src), f.stem), f) is Owner.MINE else 1

        return sorted(films, key=rank)

    def _film_renamed(
        self, state: FilmState, new_film: Path, lib: LibraryConfig | None, t0: float, *, dir_moved: bool = False
    ) -> None:
        """Same inode, same content, new name: carry the work dir along instead of recomputing."""
        old_film = state.film
        self.reg.remove(old_film)
        self._drop_conflict(old_film, state.work_dir)
        waiting = self._migrations.pop(old_film, None)
        unconfirmed = self._unconfirmed.pop(old_film, None)
        if lib is None:
            return
        identity = self._identity(state)
        src_dir = None
        if waiting is not None and not dir_moved:  # renamed again before its work dir could follow
            old_film, src_dir = waiting.old_film, waiting.src_dir
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
        if src_dir is not None or os.path.lexists(old_wd) or os.path.lexists(new_state.work_dir):
            self._migrate(old_film, new_film, t0, moved_with_folder=dir_moved, identity=identity, src_dir=src_dir)
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
            self._migrate(src, state.film, t0, identity=self._identity(state))
        else:
            self._await_results(src, state, time.monotonic() + UNCONFIRMED_WAIT_S)
        self._judge_after_move(src, state, self._lib_of(state), t0, "renamed")

    def _follow_unseen_renames(self, work_dirs: set[Path], t0: float) -> None:
        """A folder listed on arrival holds a work dir no film claims and a film without one: the film may
        have been renamed before the folder's watch existed (a new folder's watch is added only once its
        creation is reported), so no rename event ever comes. Follow it as a rename from an unknown name:
        the results' evidence (or, while a pipeline still writes them, its commit mark) decides whether they
        are this file's. Costs nothing when every work dir found has its film."""
        from cinecut.workdir import stem_of_work_dir

        for wd in work_dirs:
            films = self.reg.films_in(wd.parent)
            if not films or is_parked_name(wd.name) or any(self.reg.films[f].work_dir == wd for f in films):
                continue
            homeless = [self.reg.films[f] for f in sorted(films) if not os.path.lexists(self.reg.films[f].work_dir)]
            if not homeless:
                continue
            stem = stem_of_work_dir(wd.name)
            ev = read_evidence(wd, stem)
            named = Path(ev.named).name if ev is not None and ev.named and Path(ev.named).stem == stem else None
            for state in homeless:
                old = wd.parent / (named or stem + state.film.suffix)
                if old != state.film and not os.path.lexists(old) and state.film not in self._migrations:
                    self._follow_unknown_rename(old, state, t0)
                if not os.path.lexists(wd):
                    break

    def _results_of(self, old_film: Path, state: FilmState) -> str:
        """Whose results the work dir of ``old_film`` (a name ``state`` was renamed from) holds: ``mine``
        (our commit mark, or else upstream's cache, names this very file), ``theirs`` (another file's, or
        nothing to carry), or ``unknown`` (a pipeline holds it, or it has no commit mark yet)."""
        old = WorkDir.for_film(old_film)
        if not os.path.lexists(old.path) or os.path.lexists(state.work_dir):
            return "theirs"
        if is_work_dir_locked(old.path):
            return "unknown"  # a pipeline is writing it: its commit mark, once written, decides
        ev = read_evidence(old.path, old_film.stem)
        if ev is None or ev.named is None:
            return "unknown"
        if ev.identity is None:
            # No commit mark of ours: results of an upstream run count if their cache names this file's
            # stamp under the old name; anything else may still be a pipeline's unfinished work.
            if judge(ev, old_film) is Owner.MINE and ev.cache_stamp == state.stamp:
                return "mine"
            return "unknown"
        if judge(ev, old_film, self._identity(state)) is not Owner.MINE or ev.stamp != state.stamp:
            return "theirs"
        return "mine"

    @staticmethod
    def _identity(state: FilmState) -> Identity | None:
        return (state.device, state.inode) if state.device is not None and state.inode is not None else None

    def _await_results(self, old_film: Path, state: FilmState, deadline: float) -> None:
        """Hold the move of ``old_film``'s work dir to ``state`` (and its judgement) until its results are
        known to be this film's; retried with the pending invalidations."""
        self._migrations[state.film] = _Move(old_film, False, None, self._identity(state))
        self._unconfirmed[state.film] = deadline
        log.info("migration_deferred", film=str(state.film), old_film=str(old_film),
                 reason="results under the old name not committed yet")
        self._defer(state, "renamed", LockBusy(WorkDir.for_film(old_film).lock_path))

    def _sidecars_left(self, old_film: Path, lib: LibraryConfig) -> bool:
        from cinecutd.discovery import subtitles_of

        return bool(subtitles_of(old_film, lib.subtitle_extensions))

    def _migrate(self, old_film: Path, new_film: Path, t0: float, *, moved_with_folder: bool = False,
                 identity: Identity | None = None, src_dir: Path | None = None) -> str:
        """Carry the work dir of ``old_film`` (at ``src_dir`` when parked) to ``new_film``, if its results
        are that file's (``identity``). Every move of a work dir goes through here, so one ownership check
        guards them all. Returns ``moved``, ``deferred`` (a pipeline holds a work dir; retried) or
        ``refused`` (another film's results, or nowhere to put them: they stay where they are)."""
        new_wd = WorkDir.for_film(new_film).path
        src = src_dir if src_dir is not None else new_wd if moved_with_folder else WorkDir.for_film(old_film).path
        parked = self._parked.get(identity) if identity is not None and src_dir is None else None
        if parked is not None and os.path.lexists(parked[0]) and (
                not os.path.lexists(src) or judge(read_evidence(src, old_film.stem), old_film, identity) is not Owner.MINE):
            # Its results were parked meanwhile (another film took its old name first): take them from there.
            old_film, src_dir, src, moved_with_folder = parked[1], parked[0], parked[0], False
        try:
            if not os.path.lexists(src):
                if os.path.lexists(new_wd) and not moved_with_folder:
                    self._make_room(new_wd, new_film, identity)  # other results are never judged against it
                return "refused"
            ev = read_evidence(src, old_film.stem)
            verdict = judge(ev, old_film, identity)
            if verdict is Owner.THEIRS or (verdict is Owner.UNKNOWN and self._claimed_by_other(src, new_film)):
                log.info("migration_refused", film=str(new_film), old_film=str(old_film), work_dir=str(src),
                         reason="its results are another film's")
                return "refused"
            if verdict is Owner.MINE and ev is not None and ev.named is not None and ev.named != real(old_film) \
                    and src_dir is None and not moved_with_folder and src != new_wd:
                # This very file made them under a name of its own the daemon never saw (its folder moved in
                # already renamed): the stored paths speak of that name.
                old_film, src_dir = Path(ev.named), src
            if src != new_wd and os.path.lexists(new_wd) and not self._make_room(new_wd, new_film, identity):
                raise MigrationError(f"{new_wd} holds results that are not this film's; keeping both work dirs")
            report = migrate_work_dir(old_film, new_film, moved_with_folder=moved_with_folder, src_dir=src_dir)
            trim_heap()
        except LockBusy:
            log.info("migration_deferred", film=str(new_film), reason="work dir locked by a pipeline")
            self._migrations[new_film] = _Move(old_film, moved_with_folder, src_dir, identity)
            state = self.reg.films.get(new_film)
            if state is not None:
                self._defer(state, "renamed", LockBusy(src / "cinecut.lock"))
            return "deferred"
        except (MigrationError, OSError) as exc:
            log.warning("migration_skipped", film=str(new_film), old_film=str(old_film), reason=str(exc))
            if os.path.lexists(src) and src != new_wd:
                self.reg.orphans.setdefault(src, time.time())
            return "refused"
        self.reg.orphans.pop(src, None)
        if src_dir is not None:
            self._parked = {k: v for k, v in self._parked.items() if v[0] != src_dir}
        self.reg.counters["migrations"] += 1
        log.info(
            "migrated",
            film=str(new_film),
            old_film=str(old_film),
            work_dir=report.new_work_dir,
            rewritten=report.rewritten,
            latency_ms=round((time.monotonic() - t0) * 1000, 3),
        )
        self._return_parked()
        return "moved"

    def _return_parked(self) -> None:
        """Hand parked results back to their file once it is registered under a name whose work dir is
        free (a move that just vacated that name, or a park made after the file arrived). Each hand-back
        removes one parked entry, so this ends."""
        if not self._parked:
            return
        by_identity = {self._identity(s): s for s in self.reg.films.values() if s.inode is not None}
        for key, (parked, old_film, _) in list(self._parked.items()):
            state = by_identity.get(key)
            if state is None or key not in self._parked or os.path.lexists(state.work_dir):
                continue
            if not os.path.lexists(parked):
                del self._parked[key]
                continue
            now = time.monotonic()
            if self._migrate(old_film, state.film, now, identity=key, src_dir=parked) == "moved":
                self._judge_after_move(old_film, state, self._lib_of(state), now, "moved")

    def _claimed_by_other(self, wd: Path, film: Path) -> bool:
        """Another registered film (a same-stem twin) maps to ``wd``."""
        return any(f != film for f in self.reg.claimants(wd))

    def _owner_present(self, ev: Evidence, wd: Path, film: Path) -> bool:
        """The film that ``wd``'s results name is still there under that name (a twin of ``film``)."""
        for f in self.reg.films_in(wd.parent):
            other = self.reg.films[f]
            if f == film or other.work_dir != wd or real(f) != ev.named:
                continue
            if ev.identity is None or ev.identity == self._identity(other):
                return True
        return False

    def _make_room(self, wd: Path, film: Path, identity: Identity | None) -> bool:
        """``film`` (``identity``) took a name whose work dir ``wd`` holds other results. If their file left
        the name (deleted, moved, or hiding under a name the scan ignores), park them instead of judging
        them against the newcomer: they go back to their file if it reappears. False (nothing moved) when
        their owner is still there (a same-stem twin), when they may be this very file's, or when nothing in
        them says whose they are. Raises LockBusy while a pipeline holds ``wd``."""
        ev = read_evidence(wd, film.stem)
        if ev is None or ev.named is None or (identity is not None and ev.identity == identity):
            return False
        if self._owner_present(ev, wd, film):
            return False
        owner = ev.identity
        if owner is None:  # no commit mark: the file the daemon last saw under the named path, if any
            owner = next((k for k, v in self._gone.items() if real(v[0]) == ev.named), None)
        if owner is None:
            return False
        try:
            parked = park_work_dir(wd, owner)
        except (MigrationError, OSError) as exc:
            log.warning("park_failed", work_dir=str(wd), error=str(exc))
            return False
        self._parked[owner] = (parked, Path(ev.named), time.monotonic())
        self.reg.orphans.pop(wd, None)
        self.reg.orphans.setdefault(parked, time.time())
        self.reg.counters["parked"] += 1
        log.info("parked", work_dir=str(wd), parked=str(parked), results_of=ev.named, film=str(film),
                 reason="the file that made them left the name")
        return True

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
        if self._migrate(gone.film, state.film, now, identity=self._identity(gone)) == "refused":
            return False
        self._judge_after_move(gone.film, state, self._lib_of(state), now, "moved")
        return True

    def _adopt_moved_results(self, state: FilmState) -> bool:
        """A new film that is a recently vanished one (same device and inode, same stamp): a move across
        watches. Carry its work dir along."""
        key = (state.device or 0, state.inode or 0)
        gone = self._gone.pop(key, None)
        parked = self._parked.pop(key, None)
        now = time.monotonic()
        self._gone = {k: v for k, v in self._gone.items() if now - v[2] < GONE_MEMORY_S}
        self._fresh = {k: v for k, v in self._fresh.items() if now - v[2] < GONE_MEMORY_S}
        self._hiding.pop(key, None)
        self._hiding = {k: v for k, v in self._hiding.items() if now - v[1] < GONE_MEMORY_S}
        if parked is not None and os.path.lexists(parked[0]):
            # Its results were parked when another film took its old name: hand them back.
            if self._migrate(parked[1], state.film, now, identity=key, src_dir=parked[0]) != "refused":
                self._judge_after_move(parked[1], state, self._lib_of(state), now, "moved")
                return True
        if gone is not None and gone[1] == state.stamp and os.path.lexists(WorkDir.for_film(gone[0]).path):
            if self._migrate(gone[0], state.film, now, identity=key) != "refused":
                self._judge_after_move(gone[0], state, self._lib_of(state), now, "moved")
                return True
        # No usable memory (or a stale one: the same file moved on again since): the work dir may have
        # travelled with the film's folder, or may still follow when the old path's deletion arrives.
        self._park_for_hiding(state)
        if state.stamp is not None and not os.path.lexists(state.work_dir):
            self._fresh[key] = (state.film, state.stamp, now)
            return False
        return self._adopt_travelled_work_dir(state, now)

    def _meet_owner_twin(self, state: FilmState, lib: LibraryConfig, kind: str, t0: float) -> None:
        """A new film whose work dir names a same-stem sibling that is on disk but not registered yet (a
        folder with twins that arrived from another root, listed in any order): register the owner first,
        so this twin is marked in conflict and never judged against the owner's results."""
        ev = read_evidence(state.work_dir, state.film.stem)
        if ev is None or ev.named is None or ev.named == real(state.film):
            return
        owner = state.film.with_name(Path(ev.named).name)
        if owner.stem != state.film.stem or owner in self.reg.films or not os.path.isfile(owner):
            return
        self._film_touched(owner, lib, kind, t0)

    def _hidden(self, state: FilmState, dest: Path) -> None:
        """A film renamed to a name the scan ignores, inside a library: remember where it hides."""
        identity = self._identity(state)
        if identity is not None:
            self._hiding[identity] = (dest, time.monotonic())

    def _park_for_hiding(self, state: FilmState) -> None:
        """A new file landed on a name whose work dir holds the results of a film that is hiding under an
        ignored name (``mv A.mkv .swap; mv B.mkv A.mkv`` seen as a creation: B came from another root).
        Park them for their file's return instead of judging them against the newcomer."""
        if not (self._hiding or self._migrations) or not os.path.lexists(state.work_dir):
            return
        ev = read_evidence(state.work_dir, state.film.stem)
        if ev is None or ev.named is None:
            return
        owner = ev.identity or next((k for k, v in self._gone.items() if real(v[0]) == ev.named), None)
        # Still hiding, or moved on from there (its next move may still be queued, or waiting for a lock to
        # carry these very results): either way they are no newcomer's. A hidden file seen deleted is
        # forgotten (``_path_gone``).
        if owner is None or owner == self._identity(state):
            return
        if owner not in self._hiding and not any(m.identity == owner for m in self._migrations.values()):
            return
        try:
            if self._make_room(state.work_dir, state.film, self._identity(state)):
                self._return_parked()
        except LockBusy:
            return  # a pipeline is writing them: retried (deferred) before this film is judged

    def _adopt_travelled_work_dir(self, state: FilmState, now: float) -> bool:
        """A new film whose folder arrived with its work dir (a folder moved across roots: one watch sees it
        leave, the other sees it appear, in no useful order). Our sidecar names the film the results belong
        to; if that is this very file (same device and inode) under its old path, which is gone, only the
        stored paths need rewriting."""
        recorded = read_stamps(state.work_dir)
        if recorded is None or same_film_path(recorded.source_file, state.film) or recorded.inode is None:
            return False
        old_film = Path(recorded.source_file)
        if (recorded.device, recorded.inode) != (state.device, state.inode) or os.path.lexists(old_film):
            return False
        if WorkDir.for_film(old_film).path.name != state.work_dir.name:
            return False
        if self._migrate(old_film, state.film, now, moved_with_folder=True,
                         identity=self._identity(state)) == "refused":
            return False
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
            res = revalidate(state.film, state.subtitles, baseline=state.baseline)
        except LockBusy as exc:
            self._defer(state, trigger, exc)
            return None
        except (OSError, ValueError) as exc:  # ValueError: e.g. a name that cannot be encoded; never fatal
            log.error("revalidation_failed", film=str(state.film), error=str(exc))
            self.reg.counters["errors"] += 1
            if isinstance(exc, OSError):
                wd = WorkDir.for_film(state.film)
                where = os.fsdecode(exc.filename) if exc.filename else str(wd.path)
                if not os.path.isabs(where):
                    where = str(wd.path / where)
                failed = Problem.from_exc(where, exc, "revalidation failed; nothing changed")
                self._set_problems(state, [failed, *(p for p in access_problems(wd) if p.path != where)])
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
        held = state.work_dir if waiting is None or waiting.with_folder else (
            waiting.src_dir or WorkDir.for_film(waiting.old_film).path)
        if is_work_dir_locked(held):
            self._pending.add(film)
            self._push_timer(time.monotonic() + PENDING_RETRY_S, "pending", film)
            return
        deadline = self._unconfirmed.get(film)
        if waiting is not None and deadline is not None:
            verdict = self._results_of(waiting.old_film, state)
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
            self._migrate(waiting.old_film, film, time.monotonic(), moved_with_folder=waiting.with_folder,
                          identity=waiting.identity, src_dir=waiting.src_dir)
            if film in self._migrations:  # locked again meanwhile: deferred once more
                return
        if is_work_dir_locked(state.work_dir):
            self._pending.add(film)
            self._push_timer(time.monotonic() + PENDING_RETRY_S, "pending", film)
            return
        now = time.monotonic()
        if self._adopt_travelled_work_dir(state, now):
            return  # its folder moved while a pipeline held the work dir: paths rewritten, then judged
        self._park_for_hiding(state)  # a hiding film's results, locked when this file landed on its name
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
        self._note_verification(state, res.verification, res.stamps, res.report is None and res.exists)
        state.refused = res.refused
        if res.refused:
            log.warning("refused", film=str(state.film), reason=res.refused)
        if res.cache is not None:
            state.cache = "valid" if res.cache.stamp == state.stamp else "stale"
        elif res.exists:
            state.cache = "missing" if not os.path.lexists(WorkDir.for_film(state.film).cache_path) else "corrupt"
        else:
            state.cache = "missing"
        self._check_health(state, res, trigger)
        rep = res.report
        if rep is None or not rep.changed_anything:
            return
        latency = (time.monotonic() - t0) * 1000
        state.stale_fixed += 1
        c = self.reg.counters
        c["invalidations"] += 1
        c["bytes_reclaimed"] += rep.bytes_reclaimed
        self.tallies.invalidation_latency.observe(latency / 1000)
        record = {
            "film": str(state.film),
            "reason": rep.reason,
            "trigger": trigger,
            "stages": rep.stages_reset,
            "files_removed": len(rep.files_removed),
            "bytes_reclaimed": rep.bytes_reclaimed,
            "salvaged": rep.salvaged,
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
            problems=len(rep.problems) or None,  # each one is also a "blocked" warning with path and errno
            salvaged=f"salvaged {rep.salvaged} of {rep.salvaged_of} frames" if rep.salvaged else None,
            salvage_error=rep.salvage_error,
            latency_ms=round(latency, 3),
        )
        if self.on_film_changed is not None:
            self.on_film_changed(state)

    # ----------------------------------------------------------------- blocked films
    def _check_health(self, state: FilmState, res: Revalidation, trigger: str) -> None:
        """Collect what kept this revalidation from doing its whole job, and what keeps the next one from it.

        With the checkpoint unreadable (upstream's 0600 file under another owner) the revalidation has no
        witness; a proxy or cache older than the film is then enough to invalidate, which makes upstream
        unable to resume the stale stages (``cinecut.problems``).
        """
        blocked = self.health.get(state.film)
        if blocked is not None and blocked.pending:
            done = res.report is not None and not res.report.errors and set(blocked.pending) <= set(res.report.changed)
            # A fresh look finds nothing after a half-done invalidation (its stages are reset already), so
            # the film stays blocked until the invalidation itself went through.
            if not done and not self._reapply(state, blocked.pending):
                return
        problems = list(res.report.problems) if res.report is not None else []
        if res.refused:
            problems.append(Problem(res.work_dir, None, f"work dir refused: {res.refused}"))
        if res.exists and res.film_present and not res.refused:
            wd = WorkDir.for_film(state.film)
            access = access_problems(wd)
            if res.report is None and state.stamp is not None and any(
                p.path == str(wd.checkpoint_path) for p in access
            ):
                older = older_than_film(wd, state.stamp.mtime)
                if older is not None:
                    try:
                        res.report = invalidate(wd, [Input.VIDEO], reason=f"checkpoint unreadable and {older} "
                                                "is older than the film")
                    except LockBusy as exc:
                        self._defer(state, trigger, exc)
                    except OSError as exc:  # not even the lock can be taken: reported, retried
                        where = os.fsdecode(exc.filename) if exc.filename else str(wd.path)
                        where = where if os.path.isabs(where) else str(wd.path / where)
                        problems.append(Problem.from_exc(where, exc, "the film changed; nothing could be reset"))
                    else:
                        problems += res.report.problems
                        access = access_problems(wd)
            seen = {p.path for p in problems}
            problems += [p for p in access if p.path not in seen]
        self._set_problems(state, problems)
        blocked = self.health.get(state.film)
        if blocked is not None and res.report is not None and res.report.errors:
            blocked.pending = sorted(set(blocked.pending) | set(res.report.changed))

    def _set_problems(self, state: FilmState, problems: list[Problem]) -> None:
        """Record a film's current problems: each new one is logged once at warning level and counted."""
        was_blocked = state.film in self.health.blocked
        new, resolved = self.health.update(state.film, problems)
        for p in new:
            self.reg.counters["problems"] += 1
            log.warning("blocked", film=str(state.film), path=p.path, errno=p.errno_name or None, reason=p.reason,
                        action=p.action or None, remedy=remedy(p))
        if resolved:
            log.info("unblocked", film=str(state.film))
        elif problems and not was_blocked:
            self._push_timer(time.monotonic() + (self.health.next_retry(state.film) or 1.0), "blocked", state.film)

    def _retry_blocked(self, film: Path) -> None:
        state = self.reg.films.get(film)
        if state is None:
            self.health.forget(film)
            return
        if film not in self.health.blocked:
            return
        self._revalidate(state, time.monotonic(), "retry")  # re-applies a half-done invalidation first
        delay = self.health.next_retry(film)
        if delay is not None:
            self._push_timer(time.monotonic() + delay, "blocked", film)

    def _reapply(self, state: FilmState, inputs: list[str]) -> bool:
        """Apply again an invalidation that met errors; True once it went through without any."""
        wd = WorkDir.for_film(state.film)
        try:
            rep = invalidate(wd, inputs, reason="retry of an invalidation that met errors")
        except LockBusy:
            return False  # a pipeline holds the work dir: the next retry
        except OSError as exc:
            where = os.fsdecode(exc.filename) if exc.filename else str(wd.path)
            where = where if os.path.isabs(where) else str(wd.path / where)
            self._set_problems(state, [Problem.from_exc(where, exc, "retry failed; nothing changed"),
                                       *(p for p in access_problems(wd) if p.path != where)])
            return False
        if rep.errors:
            seen = {p.path for p in rep.problems}
            self._set_problems(state, [*rep.problems, *(p for p in access_problems(wd) if p.path not in seen)])
            return False
        blocked = self.health.get(state.film)
        if blocked is not None:
            blocked.pending = []
        if rep.changed_anything:
            self.reg.counters["invalidations"] += 1
            self.reg.counters["bytes_reclaimed"] += rep.bytes_reclaimed
            log.info("invalidated", film=str(state.film), reason=rep.reason, trigger="retry", stages=rep.stages_reset,
                     files_removed=len(rep.files_removed), bytes_reclaimed=rep.bytes_reclaimed)
        return True

    def _owns_work_dir(self, state: FilmState) -> bool:
        """For same-stem conflicts: the film the work dir's checkpoint or cache names is its owner."""
        # An unreadable checkpoint names nobody; realpaths compared (upstream records the film's realpath).
        return judge(read_evidence(state.work_dir, state.film.stem), state.film) is Owner.MINE

    # ----------------------------------------------------------------- reconcile
    def reconcile(self, reason: str) -> dict[str, Any]:
        """A full rescan of every root, run to its end now (startup: READY means caught up).

        A rescan in progress is dropped for this one (its waiters are answered by this one)."""
        waiters: list[Callable[[dict[str, Any]], None]] = []
        for job in (self._job, self._job_next):
            if job is not None:
                job.cancel()
                waiters += job.waiters
        self._job = self._job_next = None
        job = ReconcileJob(self, reason, waiters)
        self._job = job
        try:
            job.step(None)
        finally:
            self._job = None
        return self._rescan_done(job)

    def request_reconcile(self, reason: str, on_done: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Start a rescan that runs in slices between queued events (a periodic rescan, an overflow, a
        client's request). One already running started before this request and may have passed folders
        that changed since: a second one follows it (requests made meanwhile share it)."""
        waiters = [on_done] if on_done is not None else []
        if self._job is None:
            self._job = ReconcileJob(self, reason, waiters)
        elif self._job_next is None:
            self._job_next = ReconcileJob(self, reason, waiters)
        else:
            self._job_next.waiters.extend(waiters)

    @property
    def rescanning(self) -> bool:
        """A rescan is in progress (or asked for)."""
        return self._job is not None or self._job_next is not None

    def _step_rescan(self) -> None:
        """One slice of the rescan in progress (a few ms); the next one starts when it ends."""
        if self._job is None:
            if self._job_next is None:
                return
            self._job, self._job_next = self._job_next, None
        job = self._job
        try:
            finished = job.step(SLICE_S)
        except Exception as exc:  # never fatal: the next rescan tries again
            log.error("rescan_failed", reason=job.reason, error=repr(exc))
            self.reg.counters["errors"] += 1
            self._job = None
            self._schedule_rescan()
            job.finish({"reason": job.reason, "error": repr(exc)})
            return
        if finished:
            self._job = None
            self._rescan_done(job)

    def _rescan_done(self, job: ReconcileJob) -> dict[str, Any]:
        summary = job.summary or {"reason": job.reason}
        if isinstance(summary.get("duration_s"), int | float):
            self.tallies.rescan_duration.observe(summary["duration_s"])
        self._schedule_rescan()
        if self.on_reconciled is not None:
            self.on_reconciled()
        job.finish(summary)
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
        p = probe(state.film, state.subtitles, wd=state.wd, st=st, baseline=state.baseline)
        state.has_work_dir = p.exists
        self._note_verification(state, p.verification, p.stamps, not p.recorded)
        if p.needs_revalidation and p.exists and self._adopt_travelled_work_dir(state, t0):
            return  # its folder was renamed while nobody watched: paths rewritten, then revalidated
        if p.needs_revalidation or state.film in self.health.blocked:
            self._revalidate(state, t0, "rescan")  # a blocked film is retried at every rescan too
            return
        if p.cache is not None:
            state.cache = "valid" if p.cache.stamp == stamp else "stale"
        else:
            state.cache = "missing" if not p.exists or not os.path.lexists(state.wd.cache_path) else "corrupt"
        if p.exists and access_problems(state.wd or WorkDir.for_film(state.film)):
            # Upstream files it cannot read (or a work dir it cannot write): judged in full, and shown as
            # blocked before any change comes.
            self._revalidate(state, t0, "rescan")

    @staticmethod
    def _note_verification(
        state: FilmState, verification: str | None, stamps: InputStamps | None, unrecorded: bool
    ) -> None:
        """Remember what proves a film's stages, and the first stamps seen of a work dir with no sidecar of
        ours: held in memory only (nothing is written into a work dir nothing changed), and used only to
        notice a subtitle that changes or vanishes later, never to certify a stage."""
        state.verification = None if verification is None else str(verification)
        if verification == "recorded" or verification is None:
            state.baseline = None
        elif unrecorded and stamps is not None and stamps.video is not None:
            if state.baseline is None or verification == "nothing":  # no stage yet: nothing to compare
                state.baseline = stamps

    def _adopt_orphans(self, homeless: list[FilmState], orphaned: set[Path], work_dirs: set[Path]) -> None:
        """Films renamed or moved while nobody watched: an orphaned work dir whose stamps sidecar records
        this very file (device, inode, stamp) under a path that is gone follows it to its new name; one
        without a sidecar follows the film whose stamp its cache names (:mod:`cinecutd.upstream_orphans`)."""
        by_inode: dict[tuple[int | None, int], tuple[Path, Path | None]] = {}
        for wd in orphaned:
            rec = read_stamps(wd)
            if rec is None or rec.inode is None or rec.video is None:
                continue
            old = Path(rec.source_file)
            if is_parked_name(wd.name):  # parked when another film took its name: its file may be back
                by_inode[(rec.device, rec.inode)] = (old, wd)
            elif WorkDir.for_film(old).path == wd and not os.path.lexists(old):
                by_inode[(rec.device, rec.inode)] = (old, None)
        by_stamp = orphans_by_cache_stamp(orphaned)  # upstream's work dirs: no sidecar, the cache names it
        for state in homeless if by_inode or by_stamp else ():
            try:
                st = os.stat(state.film)
            except OSError:
                continue
            found = by_inode.pop((st.st_dev, st.st_ino), None)
            src_dir: Path | None = None
            identity: Identity | None = None
            if found is not None:
                old_film, src_dir = found
                rec = read_stamps(src_dir or WorkDir.for_film(old_film).path)
                if rec is None or rec.video != SourceStamp.from_stat(st):
                    continue
                identity = (st.st_dev, st.st_ino)
            else:
                old_film = by_stamp.pop(SourceStamp.from_stat(st), None)
                if old_film is None:
                    continue
            old_wd = src_dir or WorkDir.for_film(old_film).path
            self._migrate(old_film, state.film, time.monotonic(), identity=identity, src_dir=src_dir)
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
                "unverified": sum(1 for s in films if s.verification == "unverified"),
                "copying": sum(1 for s in films if not s.settled(now, settle)),
                "blocked": sum(1 for f in self.health.blocked if f in reg.films),
            },
            "conflicts": [{"work_dir": str(w), "films": [str(f) for f in fs]} for w, fs in reg.conflicts.items()],
            "orphans": [{"work_dir": str(w), "since": t} for w, t in sorted(reg.orphans.items())],
            "pending": [
                {"film": str(s.film), "reason": s.pending, "since": s.pending_since} for s in films if s.pending
            ],
            "unreadable": [{"path": p, "reason": r} for p, r in reg.unreadable[:50]],
            "recent_invalidations": list(reg.recent)[:20],
            "blocked": [
                {"film": str(f), **b.to_dict()} for f, b in list(self.health.blocked.items())[:50] if f in reg.films
            ],
            "counters": dict(reg.counters),
        }

    def _film_health(self, film: Path) -> dict[str, Any]:
        b = self.health.get(film)
        return {"blocked": b.text if b else None, "blocked_since": b.since if b else None,
                "problems": [p.to_dict() for p in b.problems] if b else []}

    def find_film(self, query: str) -> FilmState:
        """A film by absolute path, by file name or by a unique substring of its path."""
        from cinecutd.errors import FilmAmbiguous, FilmNotFound

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
            raise FilmNotFound(query, f"no watched film matches {query!r}")
        names = sorted(str(s.film) for s in matches)
        raise FilmAmbiguous(query, f"{len(matches)} films match {query!r}: {', '.join(names[:5])}", names)

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
            **self._film_health(state.film),
            "verification": state.verification,
            "salvage": _salvage_status(wd, current),
        }


def _salvage_status(wd: WorkDir, current: SourceStamp | None) -> dict[str, Any] | None:
    """Descriptions kept across a subtitle change, waiting for the next run to take them."""
    store = read_salvage(wd.path)
    if store is None or not store.usable_for(current):
        return None
    return {"frames": len(store.frames), "of": store.of}


__all__ = ["Engine", "FsEvent"]
