"""sd_notify for cinecutd: READY/STATUS/RELOADING/STOPPING/WATCHDOG through systemd-python.

Why a wrapper: the daemon must behave identically with and without systemd (a no-op when
NOTIFY_SOCKET is unset), a notification must never take the daemon down (every failure is
swallowed and reported as False), and the text we put in STATUS= comes partly from film names,
which may contain newlines (a newline would let a file name inject READY=1 or WATCHDOG=1) or
undecodable bytes (surrogate escapes that cannot be encoded).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping

__all__ = ["Notifier", "clean_status"]

_STATUS_MAX = 512  # systemctl shows one line; keep the datagram small


def clean_status(text: object) -> str:
    """One printable line: no newline/control characters, undecodable bytes as \\xNN."""
    try:
        s = str(text)
    except Exception:  # a value whose __str__ raises must not break notifications
        s = "<unprintable status>"
    try:
        s = s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeError:
        s = s.encode("utf-8", "backslashreplace").decode("utf-8")
    s = "".join(ch if ch.isprintable() else " " for ch in s)
    if len(s) > _STATUS_MAX:
        s = s[: _STATUS_MAX - 1] + "…"
    return s


def _systemd_notify() -> Callable[[str], bool] | None:
    try:
        from systemd import daemon
    except Exception:
        return None
    return daemon.notify


class Notifier:
    """Talks to the service manager; every method returns True if a datagram was sent."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = os.environ if environ is None else environ
        self._send = _systemd_notify()

    @property
    def enabled(self) -> bool:
        """True when running under a service manager that listens (NOTIFY_SOCKET set)."""
        return bool(self._environ.get("NOTIFY_SOCKET")) and self._send is not None

    def _notify(self, *assignments: str) -> bool:
        if not self.enabled:
            return False
        try:
            # systemd-python reads NOTIFY_SOCKET from the process environment itself.
            return bool(self._send("\n".join(assignments)))  # type: ignore[misc]
        except Exception:
            return False

    def ready(self, status: str | None = None) -> bool:
        """Startup (or a reload) is complete: `systemctl start`/`reload` return now."""
        if status is None:
            return self._notify("READY=1")
        return self._notify("READY=1", "STATUS=" + clean_status(status))

    def status(self, text: str) -> bool:
        """The one-line STATUS= that `systemctl status` shows."""
        return self._notify("STATUS=" + clean_status(text))

    def reloading(self, status: str | None = "reloading configuration") -> bool:
        """RELOADING=1 with MONOTONIC_USEC (required by Type=notify-reload, systemd >= 253)."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        parts = ["RELOADING=1", f"MONOTONIC_USEC={usec}"]
        if status is not None:
            parts.append("STATUS=" + clean_status(status))
        return self._notify(*parts)

    def stopping(self, status: str | None = "stopping") -> bool:
        """STOPPING=1: a clean shutdown has begun."""
        if status is None:
            return self._notify("STOPPING=1")
        return self._notify("STOPPING=1", "STATUS=" + clean_status(status))

    def watchdog(self) -> bool:
        """WATCHDOG=1: send only from the main loop, and only while it is healthy."""
        return self._notify("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """EXTEND_TIMEOUT_USEC: a long startup scan (big or slow library) asks for more time."""
        usec = max(1, int(seconds * 1_000_000))
        return self._notify(f"EXTEND_TIMEOUT_USEC={usec}")

    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half of WatchdogSec=), None when no watchdog applies.

        WATCHDOG_PID, when set, names the process the watchdog is meant for: a child that
        inherited the environment (the pre-warm worker) must not ping on the daemon's behalf.
        """
        raw = self._environ.get("WATCHDOG_USEC")
        if not raw:
            return None
        pid = self._environ.get("WATCHDOG_PID")
        if pid:
            try:
                if int(pid) != os.getpid():
                    return None
            except ValueError:
                return None
        try:
            usec = int(raw)
        except ValueError:
            return None
        if usec <= 0:
            return None
        return usec / 2 / 1_000_000
