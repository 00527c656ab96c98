"""The daemon's engine: turns filesystem events and rescans into revalidations, on one thread.

Watcher threads and the control socket only post work to the engine's queue; the engine thread alone
touches the registry and the disk, so there is no locking inside the daemon and the order of events is
the order of effects. Invalidation is eager (the first event of a burst acts at once); later events of
the same burst cost one ``stat``; one final revalidation runs when the burst has been quiet for
``settle_seconds``.
"""

from __future__ import annotations

import heapq
import itertools
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import structlog

from cinecut import safefs
from cinecut.locks import work_dir_lock
from cinecut.ownership import Identity
from cinecut.revalidate import Revalidation, probe
from cinecut.stamp import SourceStamp
from cinecut.stamps import read_stamps
from cinecut.workdir import (
    WORK_DIR_SUFFIX,
    WorkDir,
    subtitle_stems,
)
from cinecutd import queries
from cinecutd.config import Config, LibraryConfig
from cinecutd.cookies import Cookies
from cinecutd.discovery import ScanResult, in_work_dir, is_film_name, iter_scan_tree
from cinecutd.health import Health, access_problems
from cinecutd.judge import Judge, note_verification, owns_work_dir
from cinecutd.migrate import (
    is_parked_name,
)
from cinecutd.moves import Moves, owner_twin, owners_first
from cinecutd.reconcile import SLICE_S, ReconcileJob
from cinecutd.registry import FilmState, Registry
from cinecutd.states import Bus, EventKind, FilmJudged, RootChanged, RootStatus
from cinecutd.tallies import Tallies
from cinecutd.upstream_orphans import orphans_by_cache_stamp

log = structlog.get_logger("cinecutd")

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
        # Timers: (due, sequence, callback); the sequence keeps equal deadlines in the order they were set.
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
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
        # The owners the engine hands films to: the judge (revalidation) and the moves (work dirs following
        # their films); what they decide is announced on the bus, once per change.
        self.bus = Bus()
        self.bus.subscribe(FilmJudged, self._film_judged)
        self.judge = Judge(self)
        self.moves = Moves(self, self.judge)
        self.judge.moves = self.moves
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

    def later(self, due: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the engine thread once the monotonic clock passes ``due``."""
        heapq.heappush(self._timers, (due, next(self._seq), fn))

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, fn = heapq.heappop(self._timers)
            try:
                fn()
            except Exception as exc:
                log.error("timer_failed", timer=repr(fn), error=repr(exc))
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
                self.later(due, self._overflow_rescan)
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

    def _overflow_rescan(self) -> None:
        self._overflow_due = None
        self._last_overflow_rescan = time.monotonic()
        self.request_reconcile("inotify overflow")

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
        self.moves.path_gone(path)
        lib, what = self._classify(path)
        if what == "film":
            self._film_gone(path)
        elif what == "subtitle" and lib is not None:
            # A vanished subtitle is often half of a rename (Radarr renames film and subtitles one by one):
            # look again once things are quiet instead of wiping results mid-rename.
            for film in self._films_for_subtitle(path, lib):
                self.recheck_subtitles_later(film)

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
                self.moves.renamed(src_state, dest, dest_lib, t0)
            else:
                if src_state is not None:
                    self._film_gone(src)
                state = self._film_touched(dest, dest_lib, "replaced", t0)
                if src_state is None and state is not None and src_kind == "film":
                    self.moves.follow_unknown_rename(src, state, t0)
        else:
            if src_kind == "film":
                if dest_lib is not None and src_state is not None:
                    self.moves.hidden(src_state, dest)
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
                self.root_missing(src)
        if ev.kind == "moved" and dest is not None and self.library_for(dest) is not None:
            moved = owners_first(self.reg, self.reg.films_under(src), src, dest)
            for film in moved:
                state = self.reg.films[film]
                new_film = dest / film.relative_to(src)
                self.moves.renamed(state, new_film, self.library_for(new_film), ev.t0, dir_moved=True)
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
        self.later(due, partial(self._settled, film, due))
        if in_burst:
            self.reg.counters["coalesced"] += 1
            return state
        if new and state.wd is not None and os.path.lexists(state.work_dir):
            owner = owner_twin(self.reg, state)  # register the owner first: this twin is then in conflict
            if owner is not None:
                self._film_touched(owner, lib, kind, t0)
        if new and self.moves.adopt_moved_results(state):
            return state
        self.judge.revalidate(state, t0, kind)
        return state

    def _settled(self, film: Path, due: float) -> None:
        state = self.reg.films.get(film)
        if state is not None and state.settle_due == due:
            state.settle_due = None
            self.judge.final_revalidation(state)

    def _subtitles_changed(self, state: FilmState, kind: str, t0: float) -> None:
        lib = self.library_for(state.film)
        if lib is None:
            return
        from cinecutd.discovery import subtitles_of

        if self.moves.waits_for_sidecars(state.film, lib):
            return  # the rest of a rename is on its way
        state.subtitles = subtitles_of(state.film, lib.subtitle_extensions)
        state.last_event = (f"subtitle {kind}", time.time())
        self.judge.revalidate(state, t0, f"subtitle {kind}")

    def recheck_subtitles_later(self, film: Path) -> None:
        """Look at a film's subtitles again once things are quiet (half of a rename may be on its way)."""
        due = time.monotonic() + max(self.config.daemon.settle_seconds, 0.5)
        self.later(due, partial(self._recheck_subtitles, film))

    def _recheck_subtitles(self, film: Path) -> None:
        self.moves.renaming.pop(film, None)
        state = self.reg.films.get(film)
        if state is not None:
            self._subtitles_changed(state, EventKind.DELETED, time.monotonic())

    # ----------------------------------------------------------------- handed to the moves and the judge
    def register(self, film: Path, lib: LibraryConfig) -> FilmState:
        """A film under a new name (the moves' renames)."""
        return self._register(film, lib)

    def film_gone(self, film: Path) -> None:
        self.moves.film_gone(film)

    _film_gone = film_gone  # the rescan's name for it (cinecutd.reconcile)

    def revalidate(self, state: FilmState, trigger: str) -> Revalidation | None:
        """Judge a film now (a pre-warm run finished): the one entry for code outside the engine."""
        return self.judge.revalidate(state, time.monotonic(), trigger)

    def _revalidate(self, state: FilmState, t0: float, trigger: str) -> Revalidation | None:
        return self.judge.revalidate(state, t0, trigger)

    def _adopt_travelled_work_dir(self, state: FilmState, now: float) -> bool:
        return self.moves.adopt_travelled_work_dir(state, now)

    def _follow_unseen_renames(self, work_dirs: set[Path], t0: float) -> None:
        self.moves.follow_unseen_renames(work_dirs, t0)

    _owns_work_dir = staticmethod(owns_work_dir)
    _note_verification = staticmethod(note_verification)

    def _film_judged(self, ev: FilmJudged) -> None:
        if self.on_film_changed is not None:
            self.on_film_changed(ev.state)

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
            self.moves.migrate(old_film, state.film, time.monotonic(), identity=identity, src_dir=src_dir)
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

    def root_missing(self, root: Path) -> None:
        """A root is gone (unmounted): forget its films, create no orphans."""
        state = self.reg.roots.get(root)
        if state is not None:
            state.state = RootStatus.MISSING
            state.films = 0
        for film in [f for f, s in self.reg.films.items() if s.root == root]:
            # An unmounted root is not a deletion: forget its films, create no orphans.
            self.reg.remove(film)
        self.reg.orphans = {w: t for w, t in self.reg.orphans.items() if not w.is_relative_to(root)}
        self.bus.publish(RootChanged(root, RootStatus.MISSING))

    _root_missing = root_missing  # the rescan's name for it (cinecutd.reconcile)

    # ----------------------------------------------------------------- queries
    def status(self) -> dict[str, Any]:
        return queries.status(self.reg, self.health, self.config)

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
        return queries.film_status(self.find_film(query), self.health)


__all__ = ["Engine", "FsEvent"]
