"""Which film next: the films waiting for a pre-warm, in run order, with the requests that reorder them
and the films put off because they were still open for writing.

The order itself is :mod:`.jobqueue` (pure functions); this is its state, shared by the local job and the
remote queue alike. The list is recomputed from the registry, never kept in step event by event: when
something changed (``mark_dirty``), when a film's settle time ends, and at least every
``QUEUE_REFRESH_S`` (a film whose cache a ``cinecut analyze`` wrote is only found on disk).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final

import structlog

from cinecut.inference.cache import CacheState, cache_state
from cinecutd.prewarm import jobqueue
from cinecutd.prewarm.jobqueue import Request
from cinecutd.prewarm.ledger import Ledger
from cinecutd.registry import FilmState

log = structlog.get_logger("cinecutd")

#: A film found open for writing is looked at again after this long (or its settle time, if longer).
WRITER_RETRY_S: Final = 30.0
#: The queue is recomputed when something changed, when a film's settle time ends, and at least this often.
QUEUE_REFRESH_S: Final = 5.0


class Backlog:
    """The eligible films in run order (``ordered``), requests and put-off films; engine thread only."""

    def __init__(
        self,
        films: Callable[[], Mapping[Path, FilmState]],
        ledger: Ledger,
        settle_seconds: Callable[[], float],
    ) -> None:
        self._films = films
        self._ledger = ledger
        self._settle_seconds = settle_seconds
        self._requests: dict[Path, Request] = {}
        self._seq = 0
        self._skip_until: dict[Path, float] = {}
        self._cache: list[FilmState] = []
        self._at = -1e18
        self._dirty = True
        self._next_settle: float | None = None

    def mark_dirty(self) -> None:
        """Something the order depends on changed: recompute on the next look."""
        self._dirty = True

    def ordered(self, running: Path | None) -> list[FilmState]:
        """Eligible films in run order (``running``, the local job's film, left out)."""
        now = time.monotonic()
        due = self._dirty or now - self._at >= QUEUE_REFRESH_S
        if not due and self._next_settle is not None and now >= self._next_settle:
            due = True
        if not due:
            return self._cache
        films = self._films()
        settle = self._settle_seconds()
        self._ledger.forgive_outdated(films)  # the source changed (an event the hooks did not see: a rescan)
        eligible = [state for film, state in films.items()
                    if film != running and self._why_not(state, now, settle) is None]
        self._cache = jobqueue.order(eligible, self._requests)
        self._next_settle = jobqueue.next_settle(films.values(), now, settle)
        self._at = now
        self._dirty = False
        for table in (self._requests, self._skip_until):
            for film in [f for f in table if f not in films]:
                del table[film]
        self._ledger.forget_gone(films)
        return self._cache

    def why_not(self, state: FilmState) -> str | None:
        """None if the film waits for its turn, else why it does not (``jobqueue.why_not``)."""
        return self._why_not(state, time.monotonic(), self._settle_seconds())

    def _why_not(self, state: FilmState, now: float, settle: float) -> str | None:
        return jobqueue.why_not(state, now=now, settle_seconds=settle, failure=self._ledger.failure(state.film),
                                skip_until=self._skip_until.get(state.film))

    # ------------------------------------------------------------------------------ requests
    def request(self, film: Path, now: bool) -> None:
        """``cinecutd prewarm FILM [--now]``: before the night's backlog, in the order asked."""
        self._seq += 1
        self._requests[film] = Request(self._seq, now)
        self._dirty = True

    def requested(self, film: Path) -> Request | None:
        return self._requests.get(film)

    def drop_request(self, film: Path) -> None:
        """The request was answered (warm, or failed: a failure is retried only when asked again)."""
        self._requests.pop(film, None)

    # ------------------------------------------------------------------------------ put off
    def defer_writing(self, film: Path) -> None:
        """``film`` is still open for writing: a job now would read a file still being copied."""
        self._skip_until[film] = time.monotonic() + max(WRITER_RETRY_S, self._settle_seconds())
        self._dirty = True
        log.info("prewarm_deferred", film=str(film), reason="the file is still open for writing")

    def changed(self, film: Path) -> None:
        """The engine judged ``film`` after a change: look at it afresh."""
        self._skip_until.pop(film, None)
        self._dirty = True

    def already_warm(self, state: FilmState) -> bool:
        """The engine ignores work-dir events, so a cache a ``cinecut analyze`` just wrote is only seen on
        disk: one header read before a job is started for nothing."""
        try:
            cs, _ = cache_state(state.film, state.work_dir, stamp=state.stamp)
        except OSError:
            return False
        if cs is CacheState.VALID:
            state.cache = CacheState.VALID
            self._dirty = True
            return True
        return False
