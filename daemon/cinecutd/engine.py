"""The daemon's engine: one thread, one queue, a timer heap; the owners it hands work to decide.

Watcher threads and the control socket only post work to the engine's queue; the engine thread alone
touches the registry and the disk, so there is no locking inside the daemon and the order of events is
the order of effects. Each queued event goes to intake (:class:`cinecutd.intake.Intake`), which hands
films to the moves (:class:`cinecutd.moves.Moves`) and the judge (:class:`cinecutd.judge.Judge`); lost
events and the periodic safety net are rescans (:class:`cinecutd.reconciler.Reconciler`), run in slices
between queue items; status answers are pure functions (:mod:`cinecutd.queries`). What the owners decide
is announced on the bus (:mod:`cinecutd.states`).
"""

from __future__ import annotations

import heapq
import itertools
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from cinecut.revalidate import Revalidation
from cinecutd import queries
from cinecutd.config import Config, LibraryConfig
from cinecutd.cookies import Cookies
from cinecutd.health import Health
from cinecutd.intake import FsEvent, Intake
from cinecutd.judge import Judge
from cinecutd.moves import Moves
from cinecutd.reconcile import Summary
from cinecutd.reconciler import Reconciler
from cinecutd.registry import FilmState, Registry
from cinecutd.states import Bus, FilmJudged, Reconciled
from cinecutd.tallies import Tallies

log = structlog.get_logger("cinecutd")


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
    """The loop and its owners. Public methods other than ``post_*``/``call``/``submit`` run on the engine
    thread."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.reg = Registry()
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        # Timers: (due, sequence, callback); the sequence keeps equal deadlines in the order they were set.
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self.last_loop = time.monotonic()
        self.on_film_changed: Callable[[FilmState], None] | None = None  # pre-warm scheduling hook
        self.on_reconciled: Callable[[], None] | None = None  # pre-warm: a rescan ended
        self._libraries: list[LibraryConfig] = list(config.libraries)
        self.health = Health()  # blocked films: problems that stopped an invalidation, retried with backoff
        self.tallies = Tallies()  # latency and rescan-duration histograms, for the metrics
        self.cookies = Cookies()  # `sync` requests waiting for their cookie's event (cinecutd.cookies)
        # The owners: intake (events -> film lifecycles), the judge (revalidation), the moves (work dirs
        # following their films), the reconciler (rescans and roots). What they decide is announced on the
        # bus, once per change.
        self.bus = Bus()
        self.bus.subscribe(FilmJudged, self._film_judged)
        self.bus.subscribe(Reconciled, self._reconciled)
        self.judge = Judge(self)
        self.moves = Moves(self, self.judge)
        self.intake = Intake(self, self.judge, self.moves)
        self.reconciler = Reconciler(self, self.intake, self.judge, self.moves)
        self.judge.moves = self.moves
        self.judge.intake = self.moves.intake = self.intake
        self.intake.reconciler = self.reconciler

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
    def run_once(self, max_wait: float, interrupted: Callable[[], bool] | None = None) -> None:
        """Process one queued item (or wait up to ``max_wait``), then due timers, then one slice of a
        rescan in progress: queued events never wait for more than a slice of it.

        ``interrupted`` (the service's stop request) is asked before each further queued item: a stop
        during a storm returns at once instead of after the storm; what is left queued is rebuilt by
        the next start's rescan, as after any stop."""
        now = time.monotonic()
        wait = max_wait
        if self._timers:
            wait = max(0.0, min(wait, self._timers[0][0] - now))
        if self.reconciler.rescanning:
            wait = 0.0
        try:
            item = self.queue.get(timeout=wait) if wait > 0 else self.queue.get_nowait()
        except queue.Empty:
            item = None
        if item is not None:
            self._dispatch(item)
            # Drain what is already queued so a storm is handled in one go.
            for _ in range(10_000):
                if interrupted is not None and interrupted():
                    return
                try:
                    self._dispatch(self.queue.get_nowait())
                except queue.Empty:
                    self.intake.burst_over()
                    break
        self._run_timers()
        self.reconciler.step()
        self.last_loop = time.monotonic()

    def _dispatch(self, item: Any) -> None:
        if isinstance(item, FsEvent):
            try:
                self.intake.handle(item)
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

    def next_deadline(self) -> float | None:
        return self._timers[0][0] if self._timers else None

    # ----------------------------------------------------------------- libraries
    @property
    def libraries(self) -> list[LibraryConfig]:
        """The configured library roots, in config order."""
        return self._libraries

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
        for root in old_roots - {lib.path for lib in self._libraries}:
            for film in [f for f, s in self.reg.films.items() if s.root == root]:
                self.reg.remove(film)
            self.reg.roots.pop(root, None)
            self.reg.orphans = {w: t for w, t in self.reg.orphans.items() if not w.is_relative_to(root)}
        self.reconciler.restart()

    # ----------------------------------------------------------------- entry points for service/control/prewarm
    def revalidate(self, state: FilmState, trigger: str) -> Revalidation | None:
        """Judge a film now (a pre-warm run finished): the one entry for code outside the engine."""
        return self.judge.revalidate(state, time.monotonic(), trigger)

    def root_missing(self, root: Path) -> None:
        """A root is gone (unmounted): forget its films, create no orphans."""
        self.reconciler.root_missing(root)

    def reconcile(self, reason: str) -> Summary:
        """A full rescan of every root, run to its end now (startup: READY means caught up)."""
        return self.reconciler.reconcile(reason)

    def request_reconcile(self, reason: str, on_done: Callable[[Summary], None] | None = None) -> None:
        """A rescan run in slices between queued events; ``on_done(summary)`` once it ends."""
        self.reconciler.request(reason, on_done)

    @property
    def rescanning(self) -> bool:
        """A rescan is in progress (or asked for)."""
        return self.reconciler.rescanning

    def _film_judged(self, ev: FilmJudged) -> None:
        if self.on_film_changed is not None:
            self.on_film_changed(ev.state)

    def _reconciled(self, ev: Reconciled) -> None:
        if self.on_reconciled is not None:
            self.on_reconciled()

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
