"""Poll until a condition holds: the one way tests and the soak wait for the daemon.

Waiting by polling a condition with a timeout (not by sleeping) keeps quick checks at milliseconds and
slow ones correct on shared, busy machines; a timeout fails with what was last seen. Where the daemon can
prove it has caught up, :meth:`tests.harness.runner.Daemon.sync` is exact and cheaper still.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from cinecutd.client import ClientError

T = TypeVar("T")
DEFAULT_WAIT_S = 10.0


def wait_for(
    predicate: Callable[[], T], timeout: float = DEFAULT_WAIT_S, *, interval: float = 0.01, what: str = ""
) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that; AssertionError on timeout.

    The interval grows from 10 ms to 100 ms, so a quick condition costs milliseconds and a slow one does
    not burn the shared CPU. Exceptions inside the predicate count as "not yet" (files come and go).
    """
    deadline = time.monotonic() + timeout
    delay = interval
    last: Any = None
    while True:
        try:
            last = predicate()
        except (OSError, ValueError, KeyError, ClientError) as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what or predicate!r}; last: {last!r}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.1)


def stays(predicate: Callable[[], Any], duration: float, *, interval: float = 0.05) -> bool:
    """True if ``predicate`` holds for the whole ``duration`` (for "nothing else happens" checks)."""
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        if not predicate():
            return False
        time.sleep(interval)
    return bool(predicate())
