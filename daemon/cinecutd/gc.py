"""Orphaned work dirs: what is ours to reclaim in them, and reclaiming it (dry run by default).

A work dir whose film was deleted or moved out of the libraries is kept and reported. ``cinecutd gc``
lists the regenerable data in it (cache, partial, proxy, keyframes, timestamps, our sidecars and temp
files); ``--apply`` deletes exactly that, through the stage graph's symlink-proof code, and removes the
directory only if nothing else (a manifest the user edited, an unknown file) is left in it.

Only a folder that is provably a work dir is ever touched: one with a valid upstream checkpoint, a valid
SceneDescription cache, or our stamps sidecar naming a film ``<parent>/<stem>.<ext>`` that matches the
folder's name. A user's own folder that merely looks like one (``Holiday_cinecut_work/`` holding
``Holiday_proxy.mp4`` and a ``keyframes/`` folder) is listed as not recognised and never touched.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from cinecut import safefs
from cinecut.checkpoint import read_checkpoint_at
from cinecut.inference.cache import MAX_CACHE_BYTES, decode_cache
from cinecut.locks import HOLDER_SUFFIX, LockBusy, work_dir_lock
from cinecut.stages import STAGES, ArtifactKind, InvalidationReport, invalidate_at
from cinecut.stamps import read_stamps_at
from cinecut.workdir import (
    KEYFRAME_RE,
    KEYFRAMES_DIR_NAME,
    LOCK_NAME,
    STAMPS_NAME,
    WorkDir,
    stem_of_work_dir,
)
from cinecutd.registry import Registry

log = structlog.get_logger("cinecutd")

_OUR_FILES = (STAMPS_NAME, "cinecut_migration.json", LOCK_NAME + HOLDER_SUFFIX)
NOT_RECOGNISED = "not recognised as a work dir (no valid checkpoint, cache or stamps sidecar): never touched"
_TEMP_SUFFIXES = (".ckpt.tmp", ".cache.tmp", ".stamps.tmp", ".journal.tmp", ".holder.tmp")


@dataclass(slots=True)
class OrphanReport:
    work_dir: str
    reclaimable: list[str] = field(default_factory=list)
    bytes: int = 0
    kept: list[str] = field(default_factory=list)
    removed_dir: bool = False
    error: str | None = None
    recognised: bool = True  # False: not provably a work dir, so nothing in it is ours to delete
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "work_dir": self.work_dir,
            "recognised": self.recognised,
            "note": self.note,
            "reclaimable": self.reclaimable,
            "bytes": self.bytes,
            "kept": self.kept,
            "removed_dir": self.removed_dir,
            "error": self.error,
        }


def _survey(fd: int, wd: WorkDir, report: OrphanReport) -> None:
    names = {a.resolve(wd) for s in STAGES for a in s.artifacts if a.kind is ArtifactKind.FILE}
    for entry in os.scandir(fd):
        name = entry.name
        if entry.is_symlink():
            report.kept.append(name)
            continue
        if name == KEYFRAMES_DIR_NAME and entry.is_dir(follow_symlinks=False):
            kfd = safefs.open_subdir(fd, name)
            try:
                for k in os.scandir(kfd):
                    if KEYFRAME_RE.match(k.name) and k.is_file(follow_symlinks=False):
                        report.reclaimable.append(f"{name}/{k.name}")
                        report.bytes += k.stat(follow_symlinks=False).st_size
                    else:
                        report.kept.append(f"{name}/{k.name}")
            finally:
                os.close(kfd)
        elif entry.is_file(follow_symlinks=False) and (
            name in names or name in _OUR_FILES or name == LOCK_NAME or name.endswith(_TEMP_SUFFIXES)
        ):
            report.reclaimable.append(name)
            report.bytes += entry.stat(follow_symlinks=False).st_size
        else:
            report.kept.append(name)


def why_ours(fd: int, wd: WorkDir) -> str | None:
    """What proves the folder open at ``fd`` is a work dir (upstream's or ours); None if nothing does."""
    if read_checkpoint_at(fd).checkpoint is not None:
        return "upstream checkpoint"
    try:
        decode_cache(safefs.read_bounded(fd, wd.cache_name, MAX_CACHE_BYTES))
        return "SceneDescription cache"
    except (OSError, ValueError):
        pass
    stamps = read_stamps_at(fd)
    if stamps is not None:
        film = Path(stamps.source_file)
        if film.is_absolute() and film.parent == wd.path.parent and film.stem == wd.stem and film.suffix:
            return "stamps sidecar"
    return None


def collect_orphan(work_dir: Path, *, apply: bool) -> OrphanReport:
    """Survey (and with ``apply``, reclaim) one orphaned work dir; a folder not provably one is left alone."""
    # The film is gone; any extension gives the right stem (a bare stem would lose everything after a dot).
    wd = WorkDir(work_dir.parent / f"{stem_of_work_dir(work_dir.name)}.gone", work_dir)
    report = OrphanReport(str(work_dir))
    try:
        with safefs.work_dir_fd(work_dir) as fd:
            if why_ours(fd, wd) is None:
                report.recognised, report.note = False, NOT_RECOGNISED
                return report
            _survey(fd, wd, report)
            if not apply:
                return report
            lock = work_dir_lock(wd, purpose="gc", dir_fd=fd)
            lock.acquire(0.0)
            try:
                inv = InvalidationReport(str(work_dir), ["video"], "orphaned work dir reclaimed")
                invalidate_at(fd, wd, list(STAGES), inv)
                for name in [*_OUR_FILES, *(e.name for e in os.scandir(fd) if e.name.endswith(_TEMP_SUFFIXES))]:
                    try:
                        safefs.unlink_regular(fd, name)
                    except OSError:
                        pass
                remaining = [e.name for e in os.scandir(fd) if e.name != LOCK_NAME]
                if not remaining:
                    safefs.unlink_regular(fd, LOCK_NAME)
            finally:
                lock.release()
        if apply:
            try:
                os.rmdir(work_dir)
                report.removed_dir = True
            except OSError:
                pass
    except LockBusy as exc:
        report.error = str(exc)
    except safefs.SymlinkRefused:
        report.error = "work dir is a symlink: refused"
    except OSError as exc:
        report.error = exc.strerror or str(exc)
    return report


def collect_orphans(reg: Registry, *, apply: bool, min_age_days: float = 0.0) -> list[OrphanReport]:
    """Survey or reclaim every orphan the registry knows (optionally only those orphaned long enough)."""
    now = time.time()
    out = []
    for work_dir, since in sorted(reg.orphans.items()):
        if now - since < min_age_days * 86400:
            continue
        rep = collect_orphan(work_dir, apply=apply)
        out.append(rep)
        if not rep.recognised:
            log.debug("orphan_not_recognised", work_dir=str(work_dir))
        elif apply and rep.error is None:
            reg.counters["bytes_reclaimed"] += rep.bytes
            log.info("orphan_reclaimed", work_dir=str(work_dir), bytes_reclaimed=rep.bytes, kept=rep.kept or None)
            if rep.removed_dir:
                reg.orphans.pop(work_dir, None)
    return out
