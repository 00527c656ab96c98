"""Waiting for something held by another process (a flock, a busy GPU), without ever becoming deaf.

A blocking ``flock`` cannot be interrupted by a stop request or a deadline, so every wait of the pipeline
(the work dir's lock, the GPU before the first frame, the GPU after a yield) polls instead: try, and if
that fails, ask whether to stop, look at the clock, do the caller's between-tries work, sleep a little.
One helper does it so the order of those checks is the same everywhere.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from typing import Final

#: How long one wait between tries lasts: short against a frame's seconds, long against a syscall.
POLL_S: Final = 0.1


class Polled(enum.StrEnum):
    ACQUIRED = "acquired"
    STOPPED = "stopped"  # should_stop said so; nothing was acquired
    TIMED_OUT = "timed_out"  # the timeout passed; nothing was acquired


def _never() -> bool:
    return False


def poll_acquire(
    try_acquire: Callable[[], bool],
    *,
    timeout: float | None = None,
    should_stop: Callable[[], bool] = _never,
    on_wait: Callable[[int, float], None] | None = None,
    interval: float = POLL_S,
    max_interval: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Polled:
    """Call ``try_acquire`` until it returns True, a stop is asked for, or ``timeout`` seconds pass.

    Each failed try is followed, in this order, by ``should_stop`` (STOPPED), the deadline (TIMED_OUT;
    None: wait forever) and ``on_wait(tries_failed_before, seconds_waited)`` (0 on the first failure:
    announce the wait once; later calls can act on how long it has lasted), then a sleep of ``interval``.
    A try is always made first, so a free resource is taken even with ``timeout=0`` or a stop pending.
    ``max_interval``: the sleep doubles after each wait up to it (quick for a brief holder, cheap for a
    long one); None keeps it at ``interval``. No sleep outlasts the deadline.
    """
    start = clock()
    deadline = None if timeout is None else start + timeout
    failed = 0
    delay = interval
    while not try_acquire():
        if should_stop():
            return Polled.STOPPED
        now = clock()
        if deadline is not None and now >= deadline:
            return Polled.TIMED_OUT
        if on_wait is not None:
            on_wait(failed, now - start)
        failed += 1
        time.sleep(delay if deadline is None else max(0.0, min(delay, deadline - now)))
        if max_interval is not None:
            delay = min(delay * 2, max_interval)
    return Polled.ACQUIRED
