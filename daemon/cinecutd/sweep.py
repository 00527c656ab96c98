"""Removing the temp files of our own atomic writes that a dead writer left behind, once, at startup.

Every writer of ours holds the work-dir lock from creating its temp file until it renames it, and flock
dies with its holder: a file named like ours (``safefs.OWN_TEMP_RE``) in a work dir whose lock we can take
is garbage. Upstream takes no lock and names its temp files differently; those keep the grace period of
``cinecut.stages.TEMP_FILE_GRACE_S``. Costs one listing per work dir.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import structlog

from cinecut import safefs
from cinecut.locks import work_dir_lock

log = structlog.get_logger("cinecutd")


def sweep_own_temp_files(work_dirs: Iterable[Path]) -> int:
    """Remove our dead writers' temp files from ``work_dirs``; returns how many were removed."""
    removed = 0
    for wd in work_dirs:
        try:
            fd = safefs.open_dir(wd)
        except OSError:
            continue
        try:
            removed += _sweep_one(wd, fd)
        except OSError as exc:
            log.warning("temp_sweep_failed", work_dir=str(wd), error=str(exc))
        finally:
            os.close(fd)
    if removed:
        log.info("temp_files_removed", count=removed, reason="left by a writer that died")
    return removed


def _sweep_one(wd: Path, fd: int) -> int:
    names = [n for n in os.listdir(fd) if safefs.OWN_TEMP_RE.match(n)]
    if not names:
        return 0
    lock = work_dir_lock(wd, purpose="temp sweep", dir_fd=fd)
    if not lock.try_acquire():
        return 0  # a live writer: its temp file may be in use
    removed = 0
    try:
        for name in names:
            try:
                if safefs.unlink_regular(fd, name) is not None:
                    removed += 1
            except safefs.SymlinkRefused:
                continue  # not a file we wrote: left alone
    finally:
        lock.release()
    return removed


__all__ = ["sweep_own_temp_files"]
