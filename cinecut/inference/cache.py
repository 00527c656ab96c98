"""The SceneDescription cache ``<stem>.scenedesc.msgpack``: upstream's format, read without trusting it.

Layout (upstream's, keys in this order)::

    {"metadata": {"source_file": str, "mtime": float, "size": int},
     "results": [{"record": {...KeyframeRecord}, "description": {...SceneDescription} | None}, ...]}

Valid means metadata ``mtime``/``size`` equal the film's current ``os.stat`` exactly. Every reader here is
bounded: a hostile file (a 4 GB string header, a billion-entry array, garbage, a symlink, a FIFO) is a
miss, never a crash, a hang or a large allocation.
"""

from __future__ import annotations

import enum
import io
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import msgpack

from cinecut import safefs
from cinecut.checkpoint import ensure_work_dir
from cinecut.inference.models import SceneDescription
from cinecut.models import KeyframeRecord
from cinecut.paths import film_identity
from cinecut.stamp import SourceStamp
from cinecut.workdir import CACHE_TMP_SUFFIX, WorkDir, as_work_dir

Result = tuple[KeyframeRecord, SceneDescription | None]

#: A real cache is ~0.5-1.5 MB for 1,000-3,000 keyframes; 64 MiB leaves room for extreme films.
MAX_CACHE_BYTES: Final = 64 << 20
MAX_RESULTS: Final = 200_000
_MAX_STR: Final = 1 << 16
_HEADER_BUFFER: Final = 1 << 16


@dataclass(frozen=True, slots=True)
class CacheMetadata:
    """The cache's leading metadata entry: which film state the results describe."""

    source_file: str
    mtime: float
    size: int

    @property
    def stamp(self) -> SourceStamp:
        return SourceStamp(self.mtime, self.size)

    @classmethod
    def from_obj(cls, obj: object) -> CacheMetadata:
        if not isinstance(obj, dict) or set(obj) != {"source_file", "mtime", "size"}:
            raise ValueError("metadata must have exactly source_file, mtime, size")
        src, mtime, size = obj["source_file"], obj["mtime"], obj["size"]
        if not isinstance(src, str):
            raise ValueError("metadata.source_file must be a string")
        if isinstance(mtime, bool) or not isinstance(mtime, int | float):
            raise ValueError("metadata.mtime must be a number")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError("metadata.size must be a non-negative integer")
        return cls(src, float(mtime), size)


class CacheState(enum.StrEnum):
    VALID = "valid"
    STALE = "stale"
    MISSING = "missing"
    CORRUPT = "corrupt"


def cache_path(source_file: str | os.PathLike[str], work_dir: WorkDir | str | os.PathLike[str]) -> Path:
    """Path of the cache for ``source_file`` in ``work_dir``."""
    return as_work_dir(work_dir, source_file).cache_path


def encode_cache(results: Iterable[Result], source_file: str, stamp: SourceStamp) -> bytes:
    """Pack results exactly as upstream does (``use_bin_type=True``, metadata first)."""
    payload = {
        "metadata": {"source_file": source_file, "mtime": float(stamp.mtime), "size": int(stamp.size)},
        "results": [
            {"record": rec.to_dict(), "description": desc.to_dict() if desc is not None else None}
            for rec, desc in results
        ],
    }
    return msgpack.packb(payload, use_bin_type=True)


def save_cache(
    results: Sequence[Result],
    source_file: str | os.PathLike[str],
    work_dir: WorkDir | str | os.PathLike[str],
    *,
    stamp: SourceStamp | None = None,
) -> Path:
    """Atomically write the cache (mkstemp-style temp ``*.cache.tmp`` in the work dir, fsync, rename).

    ``stamp`` is the film's stamp taken BEFORE its frames were read; default: its stamp now. Results
    computed from a film that changed since must never be saved under a stamp they do not match: callers
    that read the film for a long time pass the stamp they started from and re-check it.
    """
    wd = as_work_dir(work_dir, source_file)
    src = film_identity(source_file)  # upstream's spelling: the realpath its CLI resolved
    st = stamp if stamp is not None else SourceStamp.of(src)
    data = encode_cache(results, src, st)
    ensure_work_dir(wd)
    with safefs.work_dir_fd(wd.path) as fd:
        safefs.atomic_write(fd, wd.cache_name, data, tmp_suffix=CACHE_TMP_SUFFIX)
    return wd.cache_path


#: The format's only array is ``results``; records and descriptions are small maps. msgpack pre-sizes a
#: container from its declared length before reading its items, so tight per-container limits are what
#: keep a few KB of nested headers from allocating tens of MB.
_MAX_INNER_ARRAY: Final = 4
_MAX_INNER_MAP: Final = 8


def bounded_unpacker(f: Any, buffer_size: int, max_str: int, *, read_size: int = 1 << 16) -> msgpack.Unpacker:
    """An unpacker that can never be talked into a large allocation (``f=None``: fed with bytes)."""
    return msgpack.Unpacker(
        f,
        read_size=min(buffer_size, read_size),
        max_buffer_size=buffer_size,
        raw=False,
        strict_map_key=False,
        max_str_len=max_str,
        max_bin_len=max_str,
        max_array_len=_MAX_INNER_ARRAY,
        max_map_len=_MAX_INNER_MAP,
        max_ext_len=0,
    )


def decode_item(item: object, i: int) -> Result:
    if not isinstance(item, dict) or set(item) != {"record", "description"}:
        raise ValueError(f"results[{i}] must have exactly record and description")
    rec = KeyframeRecord.from_dict(item["record"])
    desc = None if item["description"] is None else SceneDescription.from_dict(item["description"])
    return rec, desc


def decode_cache(data: bytes) -> tuple[CacheMetadata, list[Result]]:
    """Decode and strictly validate cache bytes; ValueError on anything upstream could not load.

    Streams the top-level map and the ``results`` array (whose header is checked, never pre-sized) so
    memory stays proportional to the bytes actually present, whatever lengths a hostile file declares.
    """
    return _decode_stream(io.BytesIO(data), len(data))


def _decode_stream(f: Any, size: int) -> tuple[CacheMetadata, list[Result]]:
    """:func:`decode_cache` reading ``size`` bytes from a file object, one result at a time."""
    limit = max(size, 1)
    unpacker = bounded_unpacker(f, limit, min(limit, MAX_CACHE_BYTES))
    meta: CacheMetadata | None = None
    results: list[Result] | None = None
    try:
        if unpacker.read_map_header() != 2:
            raise ValueError("top level must be a map with exactly metadata and results")
        for _ in range(2):
            key = unpacker.unpack()
            if key == "metadata" and meta is None:
                meta = CacheMetadata.from_obj(unpacker.unpack())
            elif key == "results" and results is None:
                count = unpacker.read_array_header()
                if count > min(MAX_RESULTS, size):
                    raise ValueError(f"results declares {count} entries")
                results = [decode_item(unpacker.unpack(), i) for i in range(count)]
            else:
                raise ValueError("top level must be a map with exactly metadata and results")
        if unpacker.tell() != size:
            raise ValueError("extra bytes after the cache map")
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise ValueError(f"not a msgpack cache: {str(exc) or type(exc).__name__}") from exc
    except RecursionError as exc:
        raise ValueError("msgpack nesting too deep") from exc
    assert meta is not None and results is not None
    return meta, results


def read_cache_file(path: str | os.PathLike[str]) -> tuple[CacheMetadata, list[Result]]:
    """Read and decode a cache file (no stamp check); OSError/ValueError on failure.

    Streams from the file rather than reading it whole, so garbage is rejected after its first block and
    never costs its full size in memory.
    """
    p = Path(path)
    with safefs.dir_fd(p.parent, follow_last=True) as dfd:
        fd = safefs.open_regular(dfd, p.name)
    with os.fdopen(fd, "rb", buffering=0) as f:
        size = os.fstat(fd).st_size
        if size > MAX_CACHE_BYTES:
            raise safefs.TooLarge(p.name, size, MAX_CACHE_BYTES)
        return _decode_stream(f, size)


def load_cache(
    source_file: str | os.PathLike[str], work_dir: WorkDir | str | os.PathLike[str]
) -> list[Result] | None:
    """The cached results if the cache matches the film's current ``mtime`` and ``size``; else None.

    None covers a miss, a stale cache, a corrupt or hostile file and an unreadable film. Never raises
    (upstream's ``load_cache`` turns every exception into a miss; so does this one).
    """
    try:
        current = SourceStamp.of(source_file)
        meta, results = read_cache_file(cache_path(source_file, work_dir))
    except Exception:  # upstream's contract: any failure is a miss
        return None
    return results if meta.stamp == current else None


def read_cache_metadata(path: str | os.PathLike[str]) -> CacheMetadata | None:
    """Read only the leading ``metadata`` entry with a streaming unpacker; ``results`` is never unpacked.

    Costs a few microseconds whatever the cache's size, because upstream packs ``metadata`` first. None on
    a missing, symlinked, truncated or hostile file.
    """
    p = Path(path)
    try:
        with safefs.dir_fd(p.parent, follow_last=True) as dfd:
            fd = safefs.open_regular(dfd, p.name)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb", buffering=0) as f:
            return stream_metadata(f)
    except Exception:  # any decoding failure of hostile bytes is a miss
        return None


def stream_metadata(f: Any) -> CacheMetadata | None:
    unpacker = bounded_unpacker(f, _HEADER_BUFFER, _MAX_STR, read_size=4096)
    n = unpacker.read_map_header()
    for _ in range(min(n, 2)):
        key = unpacker.unpack()
        if key == "metadata":
            return CacheMetadata.from_obj(unpacker.unpack())
        return None  # upstream always packs metadata first; anything else is not its cache
    return None


def cache_state(
    source_file: str | os.PathLike[str],
    work_dir: WorkDir | str | os.PathLike[str],
    *,
    stamp: SourceStamp | None = None,
) -> tuple[CacheState, CacheMetadata | None]:
    """Header-only validity: compare the cache's metadata with ``stamp`` (default: the film's stat now)."""
    path = cache_path(source_file, work_dir)
    if not os.path.lexists(path):
        return CacheState.MISSING, None
    meta = read_cache_metadata(path)
    if meta is None:
        return CacheState.CORRUPT, None
    current = stamp if stamp is not None else SourceStamp.maybe(source_file)
    return (CacheState.VALID if meta.stamp == current else CacheState.STALE), meta


def invalidate_cache(source_file: str | os.PathLike[str], work_dir: WorkDir | str | os.PathLike[str]) -> bool:
    """Delete the cache file (never through a symlink); True if a file was removed."""
    wd = as_work_dir(work_dir, source_file)
    try:
        with safefs.work_dir_fd(wd.path) as fd:
            return safefs.unlink_regular(fd, wd.cache_name) is not None
    except FileNotFoundError:
        return False


_HEAD_BYTES: Final = 8192


def metadata_from_fd(fd: int) -> CacheMetadata | None:
    """Header-only read from an open cache fd: one ``pread`` of the first 8 KiB covers the metadata entry
    of any real cache (a path is at most 4 KiB); a longer header falls back to the streaming reader."""
    try:
        head = os.pread(fd, _HEAD_BYTES, 0)
        unpacker = bounded_unpacker(None, _HEAD_BYTES, _MAX_STR)
        unpacker.feed(head)
        try:
            if unpacker.read_map_header() < 1 or unpacker.unpack() != "metadata":
                return None
            return CacheMetadata.from_obj(unpacker.unpack())
        except msgpack.OutOfData:
            if len(head) < _HEAD_BYTES:
                return None  # truncated file
        with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
            return stream_metadata(f)
    except Exception:  # any decoding failure of hostile bytes is a miss
        return None
