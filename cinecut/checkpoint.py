"""``pipeline_checkpoint.json``: upstream's stage checkpoint, read defensively and written atomically.

The key set is upstream's exactly: upstream loads the file with ``PipelineCheckpoint(**data)`` and drops
the whole checkpoint on any extra key, so nothing of ours is ever stored here (see ``cinecut.stamps``).
"""

from __future__ import annotations

import enum
import errno
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Final

from cinecut import safefs
from cinecut.workdir import CHECKPOINT_NAME, CKPT_TMP_SUFFIX, WorkDir, as_work_dir

#: Upstream's public name for the checkpoint file (``cinecut.checkpoint.CHECKPOINT_FILENAME``).
CHECKPOINT_FILENAME: Final = CHECKPOINT_NAME
STAGE_NAMES: Final = ("proxy", "subtitles", "keyframes", "structural", "narrative", "assembly", "music")
#: ~100x a real checkpoint (a few KB); a hostile JSON file costs up to ~25x its size to parse.
MAX_CHECKPOINT_BYTES: Final = 256 << 10


@dataclass(slots=True)
class PipelineCheckpoint:
    """The upstream checkpoint, field for field."""

    source_file: str
    vibe: str
    stages_complete: list[str] = field(default_factory=list)
    proxy_path: str | None = None
    keyframe_count: int | None = None
    dialogue_event_count: int | None = None
    inference_complete: bool | None = None
    cache_hit: bool | None = None
    manifest_path: str | None = None
    assembly_manifest_path: str | None = None
    proxy_duration_s: float | None = None
    structural_anchors: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Exactly the upstream keys, in declaration order."""
        return asdict(self)

    def is_stage_complete(self, stage: str) -> bool:
        """Upstream's API: True if ``stage`` is in ``stages_complete`` (any string may be asked)."""
        return stage in self.stages_complete

    def mark_stage_complete(self, stage: str) -> None:
        """Upstream's API: append ``stage`` unless present; any string is accepted, as upstream does."""
        if stage not in self.stages_complete:
            self.stages_complete.append(stage)

    def is_complete(self, stage: str) -> bool:
        """Alias of :meth:`is_stage_complete`."""
        return stage in self.stages_complete

    def mark_complete(self, stage: str) -> None:
        """Our own stages' guard against typos: :meth:`mark_stage_complete` for a known stage name only."""
        if stage not in STAGE_NAMES:
            raise ValueError(f"unknown stage {stage!r}")
        self.mark_stage_complete(stage)

    @classmethod
    def from_dict(cls, data: object) -> PipelineCheckpoint:
        """Strict validation mirroring what upstream accepts; ValueError with the reason otherwise."""
        if not isinstance(data, dict):
            raise ValueError(f"top level is {type(data).__name__}, not an object")
        extra = set(data) - CHECKPOINT_KEYS
        if extra:
            raise ValueError(f"unknown keys {sorted(extra)} (upstream would discard this checkpoint)")
        for key in ("source_file", "vibe"):
            if not isinstance(data.get(key), str):
                raise ValueError(f"{key} must be a string")
        stages = data.get("stages_complete", [])
        if not isinstance(stages, list) or not all(isinstance(s, str) for s in stages):
            raise ValueError("stages_complete must be a list of strings")
        for key, check, what in _OPTIONAL_CHECKS:
            value = data.get(key)
            if value is not None and not check(value):
                raise ValueError(f"{key} must be {what} or null")
        return cls(**data)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_float(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


_OPTIONAL_CHECKS: Final = (
    ("proxy_path", lambda v: isinstance(v, str), "a string"),
    ("keyframe_count", _is_int, "a non-negative integer"),
    ("dialogue_event_count", _is_int, "a non-negative integer"),
    ("inference_complete", lambda v: isinstance(v, bool), "a boolean"),
    ("cache_hit", lambda v: isinstance(v, bool), "a boolean"),
    ("manifest_path", lambda v: isinstance(v, str), "a string"),
    ("assembly_manifest_path", lambda v: isinstance(v, str), "a string"),
    ("proxy_duration_s", _is_float, "a finite number"),
    ("structural_anchors", lambda v: isinstance(v, dict), "an object"),
)
CHECKPOINT_KEYS: Final = frozenset(f.name for f in fields(PipelineCheckpoint))


class CheckpointStatus(enum.StrEnum):
    OK = "ok"
    MISSING = "missing"
    UNREADABLE = "unreadable"


@dataclass(frozen=True, slots=True)
class CheckpointRead:
    """Outcome of reading a checkpoint: never an exception, always something a caller can report."""

    status: CheckpointStatus
    checkpoint: PipelineCheckpoint | None = None
    reason: str | None = None


def parse_checkpoint(data: bytes) -> CheckpointRead:
    """Decode and validate checkpoint bytes."""
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as exc:
        return CheckpointRead(CheckpointStatus.UNREADABLE, reason=f"not valid JSON: {exc}")
    try:
        return CheckpointRead(CheckpointStatus.OK, PipelineCheckpoint.from_dict(obj))
    except (ValueError, TypeError) as exc:
        return CheckpointRead(CheckpointStatus.UNREADABLE, reason=str(exc))


def read_checkpoint_at(dir_fd: int) -> CheckpointRead:
    """Read the checkpoint of the work dir open at ``dir_fd`` (symlinks refused)."""
    try:
        data = safefs.read_bounded(dir_fd, CHECKPOINT_NAME, MAX_CHECKPOINT_BYTES)
    except FileNotFoundError:
        return CheckpointRead(CheckpointStatus.MISSING)
    except OSError as exc:
        return CheckpointRead(CheckpointStatus.UNREADABLE, reason=exc.strerror or str(exc))
    return parse_checkpoint(data)


def read_checkpoint(work_dir: WorkDir | str | os.PathLike[str]) -> CheckpointRead:
    """Read a work dir's checkpoint; never raises (missing or unreadable are statuses with a reason)."""
    wd = as_work_dir(work_dir)
    try:
        with safefs.work_dir_fd(wd.path) as fd:
            return read_checkpoint_at(fd)
    except FileNotFoundError:
        return CheckpointRead(CheckpointStatus.MISSING)
    except OSError as exc:
        return CheckpointRead(CheckpointStatus.UNREADABLE, reason=f"{exc.strerror or exc}")


#: Errors upstream's ``ckpt_path.exists()`` turns into "no checkpoint" (plus ours: too large to be one).
_ABSENT_ERRNOS: Final = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EFBIG})


def load_checkpoint(work_dir: WorkDir | str | os.PathLike[str]) -> PipelineCheckpoint | None:
    """Upstream's API and error semantics: None when the file is missing, not JSON or not a checkpoint
    ("start fresh"); any other error (``PermissionError``, ``EIO``) propagates, as upstream's does, so a
    caller never mistakes an unreadable checkpoint for an absent one. A symlinked checkpoint or work dir
    is never followed: it reads as absent. :func:`read_checkpoint` is the never-raising variant.
    """
    wd = as_work_dir(work_dir)
    try:
        with safefs.work_dir_fd(wd.path) as fd:
            data = safefs.read_bounded(fd, CHECKPOINT_NAME, MAX_CHECKPOINT_BYTES)
    except OSError as exc:
        if exc.errno in _ABSENT_ERRNOS:
            return None
        raise
    return parse_checkpoint(data).checkpoint


def encode_checkpoint(ckpt: PipelineCheckpoint) -> bytes:
    """Serialize with exactly the upstream keys.

    ASCII with ``\\u`` escapes, as upstream's ``json.dump`` writes: a film name that is not valid UTF-8
    (surrogate-escaped by Python) round-trips instead of failing to encode.
    """
    return json.dumps(ckpt.to_dict(), indent=2).encode() + b"\n"


def save_checkpoint_at(ckpt: PipelineCheckpoint, dir_fd: int) -> None:
    """Atomically replace the checkpoint of the work dir open at ``dir_fd`` (fsync file and dir)."""
    safefs.atomic_write(dir_fd, CHECKPOINT_NAME, encode_checkpoint(ckpt), tmp_suffix=CKPT_TMP_SUFFIX)


def save_checkpoint(checkpoint: PipelineCheckpoint, work_dir: WorkDir | str | os.PathLike[str]) -> Path:
    """Atomically write a work dir's checkpoint (temp file in the same dir, fsync, rename, fsync dir).

    Creates the work dir if needed; refuses a symlinked work dir.
    """
    wd = as_work_dir(work_dir)
    ensure_work_dir(wd)
    with safefs.work_dir_fd(wd.path) as fd:
        save_checkpoint_at(checkpoint, fd)
    return wd.checkpoint_path


def ensure_work_dir(wd: WorkDir) -> None:
    """Create the work dir (not its parents: the film's folder must exist) unless it exists."""
    try:
        os.mkdir(wd.path, 0o755)
    except FileExistsError:
        pass
