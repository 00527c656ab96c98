"""SIGINT dispositions for tests that rely on them, wherever the suite was started.

A shell starts a background job (``make test &``, ``nohup``) with SIGINT ignored, and an ignored signal
stays ignored across fork and exec: Python then never raises KeyboardInterrupt, in the test process or in
the programs it starts. A test that sends SIGINT states the disposition it relies on with these helpers.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager


def default_sigint() -> None:
    """``preexec_fn`` for a child that must react to SIGINT as if started from a terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextmanager
def sigint_raises() -> Iterator[None]:
    """In this process, SIGINT raises KeyboardInterrupt for the duration of the block."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
