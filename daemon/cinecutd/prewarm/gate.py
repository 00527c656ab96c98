"""Whether a pre-warm job may run now: enabled, paused, the overnight window, and the wait after a problem.

A problem that stops every job alike (no VRAM, a missing model, failures in a row) is not a film's
failure: it *blocks* the scheduler under a named state that status shows, and the next look is timed
(``retry_s``) instead of made every tick. What ends a block early (``resume``, a reload, a request) is
written where it happens, in the methods below.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import Final

import structlog

from cinecutd.config import PrewarmConfig

log = structlog.get_logger("cinecutd")

#: How often a blocked scheduler looks again: free VRAM changes when another program exits.
VRAM_RETRY_S: Final = 30.0
#: A missing model file, a broken worker interpreter or a CPU-only llama.cpp build is fixed by a person:
#: look again now and then (and at once after a reload or ``resume``).
SETUP_RETRY_S: Final = 600.0
#: After this many failures in a row the problem is probably the setup, not the films: slow down.
FAILURES_BEFORE_BACKOFF: Final = 3
BACKOFF_S: Final = 900.0


class Gate:
    """The run/stop conditions shared by the local job and the remote queue; engine thread only."""

    def __init__(self, pw: Callable[[], PrewarmConfig], clock: Callable[[], datetime]) -> None:
        self._pw = pw
        self.clock = clock
        self._paused = False
        self._blocked: tuple[str, str] | None = None  # (state, note) while no job can start
        self._retry_at = 0.0

    # ------------------------------------------------------------------------------ run or stop
    @property
    def enabled(self) -> bool:
        return self._pw().enabled

    @property
    def paused(self) -> bool:
        return self._paused

    def in_window(self, at: datetime | None = None) -> bool:
        return self._pw().window.contains(self.clock() if at is None else at)

    def halted(self) -> str | None:
        """Why no job may run at all now (disabled, paused), else None."""
        if not self.enabled:
            return "pre-warm was disabled"
        if self._paused:
            return "paused"
        return None

    def why_stop(self, *, forced: bool) -> str | None:
        """Why a running job must stop now (``forced``: ``--now``, which ignores the window), else None."""
        why = self.halted()
        if why is None and not forced and not self.in_window():
            why = "the window closed"
        return why

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> bool:
        """``cinecutd resume``: look again now; a block clears, except a missing GPU build (a person fixes
        that; the next probe finds out). Returns whether it was paused."""
        was, self._paused = self._paused, False
        self._retry_at = 0.0
        if self._blocked is not None and self._blocked[0] != "gpu-build-missing":
            self._blocked = None
        return was

    # ------------------------------------------------------------------------------ blocks
    @property
    def blocked(self) -> tuple[str, str] | None:
        """``(state, note)`` while a problem stops every job, else None."""
        return self._blocked

    @property
    def state(self) -> str | None:
        return self._blocked[0] if self._blocked is not None else None

    def block(self, state: str, note: str, retry_s: float) -> None:
        """No job can start: say why (logged once per new reason) and look again in ``retry_s``."""
        if self._blocked != (state, note):
            log.warning("prewarm_waiting", state=state, reason=note, retry_s=retry_s)
        self._blocked = (state, note)
        self._retry_at = time.monotonic() + retry_s

    def show(self, state: str, note: str) -> None:
        """A passing state (the GPU probe runs): shown in status, no timer, not logged."""
        self._blocked = (state, note)

    def clear(self, *states: str) -> None:
        """The block ends (only if it is one of ``states``, when given); its timer is left as it is."""
        if self._blocked is not None and (not states or self._blocked[0] in states):
            self._blocked = None

    def due(self) -> bool:
        """The timer of the last block has run out."""
        return time.monotonic() >= self._retry_at

    def wake(self) -> None:
        """A new request: look at once, unless a backoff after failures in a row holds."""
        if self.state != "backoff":
            self._retry_at = 0.0

    def end_backoff(self) -> None:
        """``--retry``: the person asking has looked at the failures."""
        if self.state == "backoff":
            self._blocked, self._retry_at = None, 0.0

    def reset(self) -> None:
        """New settings (a reload): whatever blocked may be fixed; look again now."""
        self._blocked, self._retry_at = None, 0.0
