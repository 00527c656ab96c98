"""Where each pre-warm worker writes its log: ``<state_dir>/prewarm/<time>-<pid>.<n>-<stem>.log``.

A failure's reason points to its log, so the newest ``MAX_LOGS`` are kept; a state dir that cannot be
written falls back to a fresh private temp dir (never a predictable name in /tmp).
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Final

import structlog

log = structlog.get_logger("cinecutd")

MAX_LOGS: Final = 50


class JobLogs:
    """Names one log file per job and keeps the folder from growing."""

    def __init__(self, state_dir: Callable[[], Path]) -> None:
        self._state_dir = state_dir
        self._dir: Path | None = None
        self._started = 0

    def path_for(self, film: Path) -> Path:
        """A new log's path for a job on ``film``; the oldest logs beyond the limit are removed."""
        d = self._dir or self._pick_dir()
        stem = re.sub(r"[^A-Za-z0-9._()-]+", "_", film.stem)[:80] or "film"
        self._started += 1
        name = f"{datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}.{self._started}-{stem}.log"
        try:
            logs = sorted(p for p in d.iterdir() if p.suffix == ".log")
            for old in logs[: max(0, len(logs) - MAX_LOGS + 1)]:
                old.unlink(missing_ok=True)
        except OSError:
            pass
        return d / name

    def forget_dir(self) -> None:
        """Settings changed: pick the folder again for the next job."""
        self._dir = None

    def _pick_dir(self) -> Path:
        state_dir = self._state_dir()
        d = state_dir / "prewarm"
        try:
            d.mkdir(mode=0o750, parents=True, exist_ok=True)
            if d.is_dir() and not d.is_symlink() and os.access(d, os.W_OK):
                self._dir = d
                return d
        except OSError:
            pass
        d = Path(tempfile.mkdtemp(prefix="cinecutd-prewarm-"))
        log.warning("prewarm_log_dir", dir=str(d), reason=f"{state_dir} is not writable")
        self._dir = d
        return d
