"""Salvage instead of redo: SceneDescriptions kept across a subtitle change, ``cinecut_salvage.msgpack``.

Keyframe timestamps come from subtitle midpoints, so new subtitles mean a new keyframe plan and the
stage graph deletes the cache. But the video is byte-identical (its stamp is unchanged), so the frame
at a given timestamp is the same picture and its description still holds. Before the invalidation
deletes the cache, the descriptions are moved here; the next run (``cinecut analyze`` or the pre-warm)
takes those whose timestamp is still in the new plan and describes only the others.

The store is one msgpack map, written atomically (temp file, fsync, rename) under the work dir's lock::

    {"format": "cinecut.scenedesc.salvage", "version": 1, "source_file": str,
     "mtime": float, "size": int,        the video's stamp the descriptions were computed from
     "of": int,                          frames in the plan they were salvaged from
     "frames": [[ms, {...SceneDescription}], ...]}   ms = int(timestamp_s * 1000), ascending

Why it is safe:

- Upstream never reads it (another name, another shape), so a partial set can never pass for a cache.
- It is keyed by the video's stamp, checked when it is written AND when it is used: a store whose
  stamp is not the film's current one is never used. A video change also deletes it through the stage
  graph (it belongs with the proxy, which depends on the video alone).
- Frames match on upstream's JPEG key (whole milliseconds); records, sources and frame paths always
  come from the new plan, never from the store.
- Frames the model failed on (``description`` null) are not kept: a new run tries them again.
- Writing it never deletes anything: the invalidation deletes the cache only after the store is durable,
  so a crash at any point leaves the descriptions in the cache, in the store, or in both.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgpack

from cinecut import faults, safefs
from cinecut.inference.cache import MAX_CACHE_BYTES, MAX_RESULTS, Result, bounded_unpacker, decode_cache
from cinecut.inference.models import SceneDescription
from cinecut.inference.partial import read_partial_at
from cinecut.inference.strictmap import read_fixed_map
from cinecut.models import KeyframeRecord
from cinecut.stamp import SourceStamp
from cinecut.workdir import CACHE_TMP_SUFFIX, WorkDir

SALVAGE_NAME: Final = "cinecut_salvage.msgpack"
FORMAT: Final = "cinecut.scenedesc.salvage"
VERSION: Final = 1
MAX_SALVAGE_BYTES: Final = MAX_CACHE_BYTES
_KEYS: Final = frozenset({"format", "version", "source_file", "mtime", "size", "of", "frames"})
_MAX_STR: Final = 1 << 20


def frame_key(timestamp_s: float) -> int:
    """The key a frame is matched on: upstream's JPEG name's milliseconds, ``int(timestamp_s * 1000)``."""
    return int(timestamp_s * 1000)


@dataclass(frozen=True, slots=True)
class Salvage:
    """Descriptions of one video state, by frame key; ``of``: frames of the plan they came from."""

    source_file: str
    stamp: SourceStamp
    of: int
    frames: Mapping[int, SceneDescription]

    def encode(self) -> bytes:
        return msgpack.packb(
            {
                "format": FORMAT,
                "version": VERSION,
                "source_file": self.source_file,
                "mtime": float(self.stamp.mtime),
                "size": int(self.stamp.size),
                "of": int(self.of),
                "frames": [[k, self.frames[k].to_dict()] for k in sorted(self.frames)],
            },
            use_bin_type=True,
        )

    def usable_for(self, stamp: SourceStamp | None) -> bool:
        """True when these descriptions describe the video now stamped ``stamp``."""
        return stamp is not None and stamp == self.stamp

    def for_plan(self, records: Sequence[KeyframeRecord]) -> dict[int, SceneDescription]:
        """The salvaged descriptions of ``records`` (the new plan), by frame key."""
        return {k: self.frames[k] for k in (frame_key(r.timestamp_s) for r in records) if k in self.frames}


def decode_salvage(data: bytes) -> Salvage:
    """Strictly decode store bytes; ValueError on anything else (bounded like the cache reader)."""
    size = max(len(data), 1)
    unpacker = bounded_unpacker(io.BytesIO(data), size, min(size, _MAX_STR))
    frames: dict[int, SceneDescription] = {}

    def take(item: Any) -> None:
        if not isinstance(item, list) or len(item) != 2:
            raise ValueError("frames entries must be [ms, description]")
        ms, desc = item
        if isinstance(ms, bool) or not isinstance(ms, int) or ms < 0 or ms in frames:
            raise ValueError("frame keys must be distinct non-negative integers")
        frames[ms] = SceneDescription.from_dict(desc)

    try:
        raw = read_fixed_map(unpacker, _KEYS, "frames", take, max_items=min(MAX_RESULTS, size),
                             what="salvage store")
        if unpacker.tell() != len(data):
            raise ValueError("extra bytes after the salvage store")
    except (TypeError, msgpack.UnpackException) as exc:
        raise ValueError(f"unreadable salvage store: {str(exc) or type(exc).__name__}") from exc
    except RecursionError as exc:
        raise ValueError("msgpack nesting too deep") from exc
    if raw["format"] != FORMAT or raw["version"] != VERSION or not isinstance(raw["source_file"], str):
        raise ValueError("not a salvage store of a known format")
    of = raw["of"]
    if isinstance(of, bool) or not isinstance(of, int) or of < 0:
        raise ValueError("of must be a non-negative integer")
    mtime = raw["mtime"]
    if isinstance(mtime, float) and not math.isfinite(mtime):
        raise ValueError("mtime must be finite")
    stamp = SourceStamp.from_dict({"mtime": mtime, "size": raw["size"]})
    return Salvage(raw["source_file"], stamp, of, frames)


def read_salvage_at(dir_fd: int) -> Salvage | None:
    """The store of the work dir open at ``dir_fd``; None when missing, corrupt or not a regular file."""
    try:
        return decode_salvage(safefs.read_bounded(dir_fd, SALVAGE_NAME, MAX_SALVAGE_BYTES))
    except (OSError, ValueError):
        return None


def read_salvage(work_dir: str | os.PathLike[str]) -> Salvage | None:
    """The store of a work dir by path (for status); None when missing or unusable."""
    try:
        with safefs.work_dir_fd(work_dir) as fd:
            return read_salvage_at(fd)
    except OSError:
        return None


def remove_salvage_at(dir_fd: int) -> bool:
    """Delete the store (never through a symlink): once a complete cache exists it has nothing to add."""
    try:
        return safefs.unlink_regular(dir_fd, SALVAGE_NAME) is not None
    except OSError:
        return False


def _described(results: Iterable[Result]) -> dict[int, SceneDescription]:
    return {frame_key(rec.timestamp_s): desc for rec, desc in results if desc is not None}


def _cache_results(dir_fd: int, wd: WorkDir, stamp: SourceStamp) -> list[Result] | None:
    try:
        meta, results = decode_cache(safefs.read_bounded(dir_fd, wd.cache_name, MAX_CACHE_BYTES))
    except (OSError, ValueError):
        return None
    return results if meta.stamp == stamp else None


def salvage_before_removal(dir_fd: int, wd: WorkDir) -> tuple[int, int]:
    """Move the descriptions that describe the film's current video into the store; (kept, of).

    Called by the invalidation, under the work dir's lock, BEFORE it deletes the cache and partial
    results, and only when the video did not change. Gathers the cache, the partial results of an
    interrupted run and an earlier store of the same video (a second subtitle change before any run);
    the newest wins for a frame. Idempotent: a crash before the cache is deleted just salvages again.
    Raises OSError if the store cannot be written (the caller goes on: salvage is an optimisation).
    """
    stamp = SourceStamp.maybe(wd.film)
    if stamp is None:
        return 0, 0
    old = read_salvage_at(dir_fd)
    frames: dict[int, SceneDescription] = dict(old.frames) if old is not None and old.usable_for(stamp) else {}
    of = old.of if old is not None and old.usable_for(stamp) else 0
    partial = read_partial_at(dir_fd, wd.partial_name)
    if partial is not None and partial.header.matches(stamp):
        frames.update(_described(partial.results))
        of = len(partial.header.plan)
    cached = _cache_results(dir_fd, wd, stamp)
    if cached is not None:
        frames.update(_described(cached))
        of = len(cached)
    if not frames:
        return 0, of
    if len(frames) > MAX_RESULTS:  # keep the newest plan's frames: the order of insertion above
        frames = dict(list(frames.items())[-MAX_RESULTS:])
    store = Salvage(str(wd.film), stamp, of, frames)
    if old is not None and old == store:
        return len(frames), of
    faults.point("salvage.before_write")
    safefs.atomic_write(dir_fd, SALVAGE_NAME, store.encode(), tmp_suffix=CACHE_TMP_SUFFIX)
    faults.point("salvage.after_write")
    return len(frames), of


__all__ = [
    "SALVAGE_NAME",
    "Salvage",
    "decode_salvage",
    "frame_key",
    "read_salvage",
    "read_salvage_at",
    "remove_salvage_at",
    "salvage_before_removal",
]
