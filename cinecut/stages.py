"""The stage graph: one declarative description of what depends on what, and invalidation through it.

Every caller that resets stages (the daemon on a changed film, ``cinecut analyze`` on a stale cache,
``cinecutd gc``) goes through :func:`invalidate`, so the rules live in one table:

    video ──> proxy ──┬──> keyframes ──> inference (cache) ──> narrative ──> assembly ──> music
    subtitle ─> subtitles ┘                                   ^
    proxy, subtitles ──────────────────────────> structural ──┘

A change of the video makes every stage stale (the format page says so; subtitles included); a change of
the subtitles makes ``subtitles`` and everything after it stale. Only regenerable artifacts that the
format page names as ours are deleted; manifests, later-stage outputs and unknown files stay, and their
stages are reset in the checkpoint so the pipeline regenerates them.
"""

from __future__ import annotations

import enum
import errno
import os
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from cinecut import faults, safefs
from cinecut.checkpoint import CheckpointStatus, read_checkpoint_at, save_checkpoint_at
from cinecut.inference.salvage import SALVAGE_NAME, salvage_before_removal
from cinecut.locks import LockBusy, work_dir_lock
from cinecut.problems import Problem, neutralize_unreadable_checkpoint, unreadable_checkpoint_errno
from cinecut.workdir import (
    CACHE_TMP_SUFFIX,
    CKPT_TMP_SUFFIX,
    KEYFRAME_RE,
    KEYFRAMES_DIR_NAME,
    TIMESTAMPS_NAME,
    WorkDir,
    as_work_dir,
)


class Input(enum.StrEnum):
    """What the pipeline reads from outside the work dir."""

    VIDEO = "video"
    SUBTITLE = "subtitle"


class ArtifactKind(enum.Enum):
    FILE = "file"  # a named file in the work dir
    KEYFRAMES = "keyframes"  # keyframes/frame_<ms>.jpg
    TEMP = "temp"  # leftovers of interrupted atomic writes, matched by suffix


@dataclass(frozen=True, slots=True)
class Artifact:
    """A regenerable file (or family of files) a stage owns; ``name`` may contain ``{stem}``."""

    kind: ArtifactKind
    name: str = ""

    def resolve(self, wd: WorkDir) -> str:
        return self.name.format(stem=wd.stem)


@dataclass(frozen=True, slots=True)
class Stage:
    """A pipeline stage: what it consumes, the checkpoint fields it sets, the artifacts it owns.

    ``recorded`` is False for inference, which upstream records by fields and the cache file, not by name.
    """

    name: str
    consumes: frozenset[str]
    fields: tuple[str, ...] = ()
    artifacts: tuple[Artifact, ...] = ()
    recorded: bool = True


def _file(name: str) -> Artifact:
    return Artifact(ArtifactKind.FILE, name)


STAGES: Final[tuple[Stage, ...]] = (
    Stage(
        "proxy",
        frozenset({Input.VIDEO}),
        ("proxy_path", "proxy_duration_s"),
        # The salvage store holds descriptions of this video's frames: it is stale exactly when the proxy is.
        (_file("{stem}_proxy.mp4"), Artifact(ArtifactKind.TEMP, ".proxy.tmp"), _file(SALVAGE_NAME)),
    ),
    Stage("subtitles", frozenset({Input.SUBTITLE, Input.VIDEO}), ("dialogue_event_count",)),
    Stage(
        "keyframes",
        frozenset({"proxy", "subtitles"}),
        ("keyframe_count",),
        (_file(TIMESTAMPS_NAME), Artifact(ArtifactKind.KEYFRAMES)),
    ),
    Stage(
        "inference",
        frozenset({"keyframes"}),
        ("inference_complete", "cache_hit"),
        (
            _file("{stem}.scenedesc.msgpack"),
            _file("{stem}.scenedesc.partial"),
            Artifact(ArtifactKind.TEMP, CACHE_TMP_SUFFIX),
        ),
        recorded=False,
    ),
    Stage("structural", frozenset({"proxy", "subtitles"}), ("structural_anchors",)),
    Stage("narrative", frozenset({"inference", "structural"}), ("manifest_path",)),
    Stage("assembly", frozenset({"narrative"}), ("assembly_manifest_path",)),
    Stage("music", frozenset({"assembly"})),
)
STAGE_BY_NAME: Final = {s.name: s for s in STAGES}

#: Temp files younger than this may belong to a writer that is still running (upstream takes no lock).
TEMP_FILE_GRACE_S: Final = 600.0


def downstream(changed: Iterable[str]) -> list[Stage]:
    """Every stage that (transitively) consumes something in ``changed``, in pipeline order."""
    dirty = {str(c) for c in changed}
    out: list[Stage] = []
    for stage in STAGES:  # STAGES is topologically ordered
        if stage.consumes & dirty:
            dirty.add(stage.name)
            out.append(stage)
    return out


@dataclass(slots=True)
class InvalidationReport:
    """What an invalidation did: enough for a log line, a status entry and a test assertion."""

    work_dir: str
    changed: list[str]
    reason: str = ""
    stages_reset: list[str] = field(default_factory=list)
    fields_nulled: list[str] = field(default_factory=list)
    files_removed: list[str] = field(default_factory=list)
    bytes_reclaimed: int = 0
    refused: list[str] = field(default_factory=list)
    checkpoint: str = CheckpointStatus.MISSING.value
    errors: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)  # every error above, with path and errno
    salvaged: int = 0  # descriptions moved to the salvage store before the cache was deleted
    salvaged_of: int = 0  # frames of the plan they came from
    salvage_error: str | None = None  # why nothing could be salvaged (the invalidation went on)

    @property
    def changed_anything(self) -> bool:
        return bool(self.stages_reset or self.fields_nulled or self.files_removed)


def invalidate(
    work_dir: WorkDir | str | os.PathLike[str],
    changed: Iterable[Input | str],
    *,
    reason: str = "",
    lock_timeout: float | None = 0.0,
    locked: bool = False,
) -> InvalidationReport:
    """Reset every stage downstream of ``changed`` and delete the regenerable artifacts they own.

    Idempotent. Takes the work dir's lock (``lock_timeout=0``: raise LockBusy at once if a pipeline holds
    it) unless the caller already holds it (``locked=True``). A symlinked work dir is refused (reported,
    nothing touched); symlinked artifacts are reported in ``refused`` and left alone. Nothing outside the
    work dir is ever touched. Order: checkpoint first (durable), then files, so a crash in between leaves
    the checkpoint saying "regenerate" while stale bytes are at worst still on disk for the next pass.
    """
    wd = as_work_dir(work_dir)
    changed_list = sorted({str(c) for c in changed})
    report = InvalidationReport(str(wd.path), changed_list, reason)
    try:
        fd_cm = safefs.work_dir_fd(wd.path)
        fd = fd_cm.__enter__()
    except FileNotFoundError:
        return report
    except safefs.SymlinkRefused:
        report.refused.append(str(wd.path))
        report.problems.append(Problem(str(wd.path), None, "the work dir is a symlink: refused, not followed"))
        return report
    try:
        lock = None
        if not locked:
            lock = work_dir_lock(wd, purpose=f"invalidate ({reason})" if reason else "invalidate", dir_fd=fd)
            try:
                if lock_timeout is None:
                    lock.acquire()
                elif not lock.try_acquire():
                    lock.acquire(lock_timeout)
            except safefs.SymlinkRefused:
                report.refused.append(wd.lock_path.name)
                report.problems.append(Problem(str(wd.lock_path), None, "the lock file is a symlink: refused"))
                return report
        try:
            invalidate_at(fd, wd, downstream(changed_list), report)
        finally:
            if lock is not None:
                lock.release()
    finally:
        fd_cm.__exit__(None, None, None)
    return report


def invalidate_at(dir_fd: int, wd: WorkDir, stages: list[Stage], report: InvalidationReport) -> None:
    """The body of :func:`invalidate`, for callers that already opened and locked the work dir."""
    _salvage(dir_fd, wd, stages, report)
    read = read_checkpoint_at(dir_fd)
    report.checkpoint = read.status.value
    ckpt = read.checkpoint
    if ckpt is not None:
        names = {s.name for s in stages}
        kept = [s for s in ckpt.stages_complete if s not in names]
        reset = [s for s in ckpt.stages_complete if s in names]
        nulled = [f for s in stages for f in s.fields if getattr(ckpt, f) is not None]
        if reset or nulled:
            ckpt.stages_complete = kept
            for f in nulled:
                setattr(ckpt, f, None)
            faults.point("invalidate.before_checkpoint")
            try:
                save_checkpoint_at(ckpt, dir_fd)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    # Not ours to rewrite (an owner we cannot keep, a read-only work dir): upstream must
                    # still not resume the stale stages, so the checkpoint goes aside if it can.
                    stages = neutralize_unreadable_checkpoint(
                        dir_fd, wd, stages, report, exc.errno or errno.EIO, "rewrite")
                    _remove_artifacts(dir_fd, wd, stages, report)
                    return
                # A full disk: the stale regenerable files go first (they are what fills it, and a
                # "complete" stage whose file is gone makes a pipeline fail rather than reuse stale
                # bytes), then the checkpoint is written again in the room they left.
                _remove_artifacts(dir_fd, wd, stages, report)
                save_checkpoint_at(ckpt, dir_fd)
            faults.point("invalidate.after_checkpoint")
            report.stages_reset = reset
            report.fields_nulled = nulled
        if "inference" in names and "inference" not in report.stages_reset and "inference_complete" in nulled:
            report.stages_reset.append("inference")
    elif read.status is CheckpointStatus.UNREADABLE and (err := unreadable_checkpoint_errno(dir_fd)) is not None:
        # It exists and its owner (upstream) can read it, we cannot: its stages cannot be reset here.
        stages = neutralize_unreadable_checkpoint(dir_fd, wd, stages, report, err)
    elif read.status is CheckpointStatus.UNREADABLE:
        # We cannot reset stages we cannot read. Upstream either cannot read it either (and starts fresh,
        # regenerating everything) or can (an oversized file): then deleting the proxy or keyframes under
        # stages it believes complete would break its run. Only the cache, which upstream validates by
        # stamp itself, and our partial results go; the rest stays and the report says why.
        report.errors.append(f"checkpoint unreadable ({read.reason}); only the cache was removed")
        report.problems.append(Problem(str(wd.checkpoint_path), None, f"checkpoint unreadable ({read.reason})",
                                       "only the cache was removed"))
        stages = [s for s in stages if s.name == "inference"]
    _remove_artifacts(dir_fd, wd, stages, report)


def _salvage(dir_fd: int, wd: WorkDir, stages: list[Stage], report: InvalidationReport) -> None:
    """Before the cache of an unchanged video goes (a subtitle change), keep its descriptions aside.

    Runs first, so nothing is deleted before the store is durable; a failure to write it costs the
    descriptions, never the invalidation.
    """
    names = {s.name for s in stages}
    if "inference" not in names or "proxy" in names:
        return
    try:
        report.salvaged, report.salvaged_of = salvage_before_removal(dir_fd, wd)
    except OSError as exc:
        report.salvage_error = f"{SALVAGE_NAME}: {exc.strerror or exc}"


def _remove_artifacts(dir_fd: int, wd: WorkDir, stages: list[Stage], report: InvalidationReport) -> None:
    for stage in stages:
        for art in stage.artifacts:
            _remove_artifact(dir_fd, wd, art, report)
            faults.point("invalidate.after_artifact")


def _remove_artifact(dir_fd: int, wd: WorkDir, art: Artifact, report: InvalidationReport) -> None:
    if art.kind is ArtifactKind.FILE:
        _unlink(dir_fd, art.resolve(wd), report)
    elif art.kind is ArtifactKind.TEMP:
        now = time.time()
        for entry in os.scandir(dir_fd):
            if entry.name.endswith(art.name) and entry.is_file(follow_symlinks=False):
                if now - entry.stat(follow_symlinks=False).st_mtime >= TEMP_FILE_GRACE_S:
                    _unlink(dir_fd, entry.name, report)
    elif art.kind is ArtifactKind.KEYFRAMES:
        _remove_keyframes(dir_fd, report)


def _unlink(dir_fd: int, name: str, report: InvalidationReport, prefix: str = "") -> None:
    try:
        size = safefs.unlink_regular(dir_fd, name)
    except safefs.SymlinkRefused:
        report.refused.append(prefix + name)
        report.problems.append(Problem(os.path.join(report.work_dir, prefix + name), None,
                                       "a symlink or special file where a regenerable file belongs: left alone"))
        return
    except OSError as exc:
        report.errors.append(f"{prefix}{name}: {exc.strerror or exc}")
        report.problems.append(Problem.from_exc(os.path.join(report.work_dir, prefix + name), exc, "left in place"))
        return
    if size is not None:
        report.files_removed.append(prefix + name)
        report.bytes_reclaimed += size


def _remove_keyframes(dir_fd: int, report: InvalidationReport) -> None:
    """Delete ``keyframes/frame_<ms>.jpg`` files; the dir goes only if nothing else is left in it."""
    st = safefs.lstat_in(dir_fd, KEYFRAMES_DIR_NAME)
    if st is None:
        return
    if not stat.S_ISDIR(st.st_mode):
        report.refused.append(KEYFRAMES_DIR_NAME)
        report.problems.append(Problem(os.path.join(report.work_dir, KEYFRAMES_DIR_NAME), None,
                                       "keyframes is not a directory: left alone"))
        return
    try:
        kfd = safefs.open_subdir(dir_fd, KEYFRAMES_DIR_NAME)
    except safefs.SymlinkRefused:
        report.refused.append(KEYFRAMES_DIR_NAME)
        report.problems.append(Problem(os.path.join(report.work_dir, KEYFRAMES_DIR_NAME), None,
                                       "keyframes is a symlink: refused, not followed"))
        return
    except OSError as exc:
        report.errors.append(f"{KEYFRAMES_DIR_NAME}: {exc.strerror or exc}")
        report.problems.append(Problem.from_exc(os.path.join(report.work_dir, KEYFRAMES_DIR_NAME), exc, "frames left in place"))
        return
    try:
        names = [e.name for e in os.scandir(kfd)]
        for name in names:
            if KEYFRAME_RE.match(name):
                _unlink(kfd, name, report, prefix=f"{KEYFRAMES_DIR_NAME}/")
        os.fsync(kfd)
    finally:
        os.close(kfd)
    try:
        os.rmdir(KEYFRAMES_DIR_NAME, dir_fd=dir_fd)
    except OSError:
        pass  # not empty (unknown files stay) or raced: leaving an empty dir is harmless


def stale_temp_files(dir_fd: int) -> list[str]:
    """Names of leftover temp files (``*.ckpt.tmp``, ``*.cache.tmp``, ours) older than the grace period."""
    now = time.time()
    out = []
    for entry in os.scandir(dir_fd):
        if entry.name.endswith((CKPT_TMP_SUFFIX, CACHE_TMP_SUFFIX, ".stamps.tmp")) and entry.is_file(
            follow_symlinks=False
        ):
            if now - entry.stat(follow_symlinks=False).st_mtime >= TEMP_FILE_GRACE_S:
                out.append(entry.name)
    return out


__all__ = [
    "STAGES",
    "STAGE_BY_NAME",
    "Artifact",
    "ArtifactKind",
    "Input",
    "InvalidationReport",
    "LockBusy",
    "Stage",
    "downstream",
    "invalidate",
    "invalidate_at",
    "stale_temp_files",
]
