"""Revalidation: decide whether a film's inputs changed since its work dir was last verified, and act.

The single place that compares stamps. The daemon calls it on every event and at every rescan; the
``cinecut`` CLI calls it before trusting a checkpoint. Witnesses, from strongest to weakest:

1. the cache's metadata stamp vs the film's stat (upstream's own rule),
2. our sidecar (``cinecut_stamps.json``): the stamps the completed stages are consistent with,
3. on first sight of a work dir without a sidecar: a proxy older than the film.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cinecut import faults, safefs
from cinecut.checkpoint import CheckpointRead, read_checkpoint_at
from cinecut.inference.cache import CacheMetadata, metadata_from_fd
from cinecut.locks import work_dir_lock
from cinecut.stages import Input, InvalidationReport, downstream, invalidate_at
from cinecut.stamps import FORMAT as STAMPS_FORMAT
from cinecut.stamps import MAX_STAMPS_BYTES, InputStamps, current_stamps, read_stamps_at, write_stamps_at
from cinecut.workdir import STAMPS_NAME, WorkDir


@dataclass(slots=True)
class Revalidation:
    """Outcome of one revalidation of a film's work dir."""

    film: str
    work_dir: str
    exists: bool = False
    film_present: bool = True
    changed: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    report: InvalidationReport | None = None
    stamps: InputStamps | None = None
    cache: CacheMetadata | None = None
    checkpoint: CheckpointRead | None = None
    refused: str | None = None


def _cache_metadata_at(dir_fd: int, name: str) -> CacheMetadata | None:
    try:
        fd = safefs.open_regular(dir_fd, name)
    except OSError:
        return None
    try:
        return metadata_from_fd(fd)
    finally:
        os.close(fd)


def detect_changes(
    dir_fd: int,
    wd: WorkDir,
    current: InputStamps,
    recorded: InputStamps | None,
    meta: CacheMetadata | None,
    checkpoint: CheckpointRead | None,
) -> tuple[set[Input], list[str]]:
    """Which inputs changed, with a human-readable reason for each finding."""
    changed: set[Input] = set()
    reasons: list[str] = []
    video = current.video
    if meta is not None and meta.stamp != video:
        changed.add(Input.VIDEO)
        reasons.append("cache stamp does not match the film")
    if recorded is not None:
        if recorded.video != video:
            changed.add(Input.VIDEO)
            reasons.append("film changed since its stages were recorded")
        if recorded.subtitles != current.subtitles:
            changed.add(Input.SUBTITLE)
            reasons.append("subtitles changed")
    else:
        if checkpoint is None:
            checkpoint = read_checkpoint_at(dir_fd)
        ckpt = checkpoint.checkpoint
        if not (ckpt is not None and "proxy" in ckpt.stages_complete and video):
            return changed, reasons
        proxy = safefs.lstat_in(dir_fd, wd.proxy_name)
        if proxy is not None and stat.S_ISREG(proxy.st_mode) and proxy.st_mtime < video.mtime:
            changed.add(Input.VIDEO)
            reasons.append("film is newer than its proxy")
    return changed, reasons


def revalidate(
    film: str | os.PathLike[str],
    subtitles: list[Path] | tuple[Path, ...] = (),
    *,
    lock_timeout: float | None = 0.0,
    locked_fd: int | None = None,
) -> Revalidation:
    """Compare a film's inputs with its work dir and invalidate what they made stale.

    Raises LockBusy if a pipeline holds the work dir (``lock_timeout=0``), so the caller can defer. A
    film that vanished is not invalidated here: its work dir becomes an orphan, which is reported, not
    deleted. The stamps sidecar is written last, as the commit mark of the verification.
    """
    wd = WorkDir.for_film(film)
    result = Revalidation(str(wd.film), str(wd.path))
    if locked_fd is not None:
        _revalidate_at(locked_fd, wd, subtitles, result)
        return result
    try:
        with safefs.work_dir_fd(wd.path) as fd:
            lock = work_dir_lock(wd, purpose="revalidate", dir_fd=fd)
            if not lock.try_acquire():
                lock.acquire(lock_timeout)
            try:
                _revalidate_at(fd, wd, subtitles, result)
            finally:
                lock.release()
    except FileNotFoundError:
        result.film_present = os.path.exists(wd.film)
    except safefs.SymlinkRefused as exc:
        result.exists = True
        result.refused = f"{exc.filename}: {exc.strerror}"
    return result


def _revalidate_at(fd: int, wd: WorkDir, subtitles: list[Path] | tuple[Path, ...], result: Revalidation) -> None:
    result.exists = True
    current = current_stamps(wd.film, list(subtitles))
    result.stamps = current
    if current.video is None:
        result.film_present = False
        return
    recorded = read_stamps_at(fd)
    meta = _cache_metadata_at(fd, wd.cache_name)
    ckpt = read_checkpoint_at(fd)
    result.cache, result.checkpoint = meta, ckpt
    changed, reasons = detect_changes(fd, wd, current, recorded, meta, ckpt)
    result.changed = sorted(changed)
    result.reasons = reasons
    if changed:
        report = InvalidationReport(str(wd.path), result.changed, "; ".join(reasons))
        invalidate_at(fd, wd, downstream(changed), report)
        result.report = report
        if Input.VIDEO in changed:
            result.cache = None
    if recorded is None or changed or _differs(recorded, current):
        faults.point("revalidate.before_stamps")
        write_stamps_at(fd, current)


def _differs(a: InputStamps, b: InputStamps) -> bool:
    return (a.source_file, a.video, a.subtitles, a.inode, a.device) != (
        b.source_file,
        b.video,
        b.subtitles,
        b.inode,
        b.device,
    )


@dataclass(frozen=True, slots=True)
class Probe:
    """A lock-free, write-free look at a work dir: does it need a (locked) revalidation?"""

    exists: bool
    needs_revalidation: bool
    cache: CacheMetadata | None = None
    stamps: InputStamps | None = None


def probe(
    film: str | os.PathLike[str],
    subtitles: list[Path] | tuple[Path, ...] = (),
    *,
    wd: WorkDir | None = None,
    st: os.stat_result | None = None,
) -> Probe:
    """Cheap check used by rescans: read the sidecar and the cache header, take no lock, write nothing.

    ``needs_revalidation`` is True when anything is off (changed inputs, no sidecar yet, stamps to update,
    a symlinked work dir to report); the caller then runs :func:`revalidate` under the lock.
    """
    wd = wd if wd is not None else WorkDir.for_film(film)
    try:
        with safefs.work_dir_fd(wd.path) as fd:
            if st is not None and not subtitles:
                fast = _fast_probe(fd, wd, st)
                if fast is not None:
                    return fast
            current = current_stamps(wd.film, subtitles, st=st)
            if current.video is None:
                return Probe(True, False, stamps=current)
            recorded = read_stamps_at(fd)
            meta = _cache_metadata_at(fd, wd.cache_name)
            if recorded is None:
                return Probe(True, True, meta, current)
            changed, _ = detect_changes(fd, wd, current, recorded, meta, None)
            return Probe(True, bool(changed) or _differs(recorded, current), meta, current)
    except FileNotFoundError:
        return Probe(False, False)
    except OSError:
        return Probe(True, True)


def _fast_probe(fd: int, wd: WorkDir, st: os.stat_result) -> Probe | None:
    """The rescan's common case, decided on the raw sidecar: everything matches, nothing to do.

    A library rescan probes every film; most are unchanged since the last look. Comparing the decoded
    JSON with the film's ``stat`` directly skips building and validating objects. Any doubt (a field
    that is off, an unusual sidecar) returns None and the full path decides.
    """
    try:
        raw = json.loads(safefs.read_bounded(fd, STAMPS_NAME, MAX_STAMPS_BYTES))
    except (OSError, ValueError, RecursionError):
        return None
    if not (
        type(raw) is dict
        and raw.get("format") == STAMPS_FORMAT
        and raw.get("subtitles") == []
        and raw.get("video") == {"mtime": st.st_mtime, "size": st.st_size}
        and raw.get("inode") == st.st_ino
        and raw.get("device") == st.st_dev
        and raw.get("source_file") == str(wd.film)
    ):
        return None
    meta = _cache_metadata_at(fd, wd.cache_name)
    if meta is not None and (meta.mtime != st.st_mtime or meta.size != st.st_size):
        return None
    return Probe(True, False, meta, None)
