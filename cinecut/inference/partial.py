"""Resumable partial results: ``<stem>.scenedesc.partial``, an append-only msgpack stream.

Inference takes 30 to 60 minutes per film and may be stopped at any frame (window end, SIGTERM, an
interactive run taking the GPU, a crash), so every described frame is appended here as it is produced
and the next run resumes after the last complete entry. The stream is::

    header  {"format": "cinecut.scenedesc.partial", "version": 1, "source_file": str,
             "mtime": float, "size": int, "fingerprint": str, "plan": [[timestamp_s, source], ...]}
    entry   {"record": {...KeyframeRecord}, "description": {...SceneDescription} | None}   (plan order)
    entry   ...

It can never be taken for a cache: it has another name, and its top level is a sequence of objects,
not upstream's single ``{"metadata", "results"}`` map (``msgpack.unpackb`` refuses it with ExtraData).

The header carries the film's stamp taken BEFORE the film was read and the keyframe plan (timestamps
and why each was chosen, which ``keyframe_timestamps.json`` does not record); a run resumes only if
both still match, else it starts over. Reading tolerates a truncated tail (a crash mid-append) and
trailing garbage: the valid prefix is kept and the rest is cut off before appending again. Every read
is bounded (file size, container lengths, string lengths), as for the cache.

Each entry is one ``write(2)``, so a killed process loses at most the frame in flight; ``fsync`` runs
every few frames or seconds and on close, so a power cut loses at most those.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import msgpack

from cinecut import fresh, safefs
from cinecut.inference.cache import MAX_RESULTS, Result, bounded_unpacker, decode_item
from cinecut.inference.models import SceneDescription
from cinecut.inference.strictmap import read_fixed_map
from cinecut.models import KEYFRAME_SOURCES, KeyframeRecord
from cinecut.stamp import SourceStamp
from cinecut.workdir import CACHE_TMP_SUFFIX

FORMAT: Final = "cinecut.scenedesc.partial"
VERSION: Final = 1
#: Twice the cache's bound: the header repeats the plan, the entries are the cache's results.
MAX_PARTIAL_BYTES: Final = 128 << 20
_MAX_STR: Final = 1 << 20
_HEADER_KEYS: Final = frozenset({"format", "version", "source_file", "mtime", "size", "fingerprint", "plan"})

PlanEntry = tuple[float, str]


def plan_of(records: Sequence[KeyframeRecord]) -> tuple[PlanEntry, ...]:
    """The keyframe plan behind records: (timestamp, source) pairs; frame paths follow from the work dir."""
    return tuple((float(r.timestamp_s), r.source) for r in records)


def plan_fingerprint(plan: Sequence[PlanEntry]) -> str:
    """A digest of the plan; independent of the work dir's location, so a moved work dir still resumes."""
    data = msgpack.packb([[float(t), s] for t, s in plan], use_bin_type=True)
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True, slots=True)
class PartialHeader:
    """What the partial results were computed from."""

    source_file: str
    stamp: SourceStamp
    plan: tuple[PlanEntry, ...]
    fingerprint: str

    @classmethod
    def for_plan(cls, source_file: str, stamp: SourceStamp, plan: Sequence[PlanEntry]) -> PartialHeader:
        p = tuple((float(t), s) for t, s in plan)
        return cls(source_file, stamp, p, plan_fingerprint(p))

    def encode(self) -> bytes:
        return msgpack.packb(
            {
                "format": FORMAT,
                "version": VERSION,
                "source_file": self.source_file,
                "mtime": float(self.stamp.mtime),
                "size": int(self.stamp.size),
                "fingerprint": self.fingerprint,
                "plan": [[t, s] for t, s in self.plan],
            },
            use_bin_type=True,
        )

    def matches(self, stamp: SourceStamp | None, plan: Sequence[PlanEntry] | None = None) -> bool:
        """True if results under this header are valid for a film now stamped ``stamp`` (and ``plan``)."""
        if stamp is None or self.stamp != stamp:
            return False
        return plan is None or plan_fingerprint(plan) == self.fingerprint


@dataclass(slots=True)
class PartialRead:
    """The readable part of a partial file: its header and the valid prefix of its entries."""

    header: PartialHeader
    results: list[Result]
    valid_bytes: int
    total_bytes: int
    damage: str | None = None  # why reading stopped before the end of the file, None if it did not

    @property
    def done(self) -> int:
        return len(self.results)

    @property
    def total(self) -> int:
        return len(self.header.plan)


def _decode_header(unpacker: msgpack.Unpacker, size: int) -> PartialHeader:
    plan: list[PlanEntry] = []

    def take(item: Any) -> None:
        if not isinstance(item, list) or len(item) != 2:
            raise ValueError("plan entries must be [timestamp_s, source]")
        t, source = item
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t < 0:
            raise ValueError("plan timestamp must be a finite non-negative number")
        if source not in KEYFRAME_SOURCES:
            raise ValueError(f"unknown keyframe source {source!r}")
        plan.append((float(t), source))

    raw = read_fixed_map(unpacker, _HEADER_KEYS, "plan", take, max_items=min(MAX_RESULTS, size),
                         what="partial results header")
    if raw["format"] != FORMAT or raw["version"] != VERSION:
        raise ValueError("not a partial results file of a known format")
    if not isinstance(raw["source_file"], str) or not isinstance(raw["fingerprint"], str):
        raise ValueError("source_file and fingerprint must be strings")
    stamp = SourceStamp.from_dict({"mtime": raw["mtime"], "size": raw["size"]})
    header = PartialHeader(raw["source_file"], stamp, tuple(plan), raw["fingerprint"])
    if plan_fingerprint(header.plan) != header.fingerprint:
        raise ValueError("plan does not match its fingerprint")
    return header


def decode_partial(data: bytes) -> PartialRead:
    """Decode partial bytes: ValueError if the header is unusable; a damaged tail only ends the prefix."""
    size = max(len(data), 1)
    unpacker = bounded_unpacker(io.BytesIO(data), size, min(size, _MAX_STR))
    try:
        header = _decode_header(unpacker, len(data))
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise ValueError(f"unreadable partial header: {str(exc) or type(exc).__name__}") from exc
    except RecursionError as exc:
        raise ValueError("msgpack nesting too deep") from exc
    results: list[Result] = []
    valid = unpacker.tell()
    damage: str | None = None
    while valid < len(data):
        if len(results) >= len(header.plan):
            damage = "entries beyond the plan"
            break
        try:
            rec, desc = decode_item(unpacker.unpack(), len(results))
        except msgpack.OutOfData:
            damage = "truncated entry"
            break
        except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as exc:
            damage = f"unreadable entry: {str(exc) or type(exc).__name__}"
            break
        t, source = header.plan[len(results)]
        if rec.timestamp_s != t or rec.source != source:
            damage = f"entry {len(results)} does not follow the plan"
            break
        results.append((rec, desc))
        valid = unpacker.tell()
    return PartialRead(header, results, valid, len(data), damage)


def read_partial_at(dir_fd: int, name: str) -> PartialRead | None:
    """The partial file ``name`` in the work dir open at ``dir_fd``; None if missing or unusable."""
    try:
        data = safefs.read_bounded(dir_fd, name, MAX_PARTIAL_BYTES)
        return decode_partial(data)
    except (OSError, ValueError):
        return None


def read_partial(path: str | os.PathLike[str]) -> PartialRead | None:
    """A partial file by path (its directory may be reached through symlinks, the file may not)."""
    p = os.fspath(path)
    try:
        with safefs.dir_fd(os.path.dirname(os.path.abspath(p)), follow_last=True) as fd:
            return read_partial_at(fd, os.path.basename(p))
    except OSError:
        return None


def encode_entry(record: KeyframeRecord, description: SceneDescription | None) -> bytes:
    """One entry, shaped exactly like an item of the cache's ``results``."""
    return msgpack.packb(
        {
            "record": record.to_dict(),
            "description": description.to_dict() if description is not None else None,
        },
        use_bin_type=True,
    )


@dataclass(slots=True)
class SyncPolicy:
    """When appended entries are made durable: every ``frames`` entries or ``seconds``, whichever first."""

    frames: int = 16
    seconds: float = 2.0


@dataclass(slots=True)
class PartialWriter:
    """Appends entries to an open partial file; ``close`` (or ``sync``) makes them durable."""

    fd: int | None
    header: PartialHeader
    done: int
    policy: SyncPolicy = field(default_factory=SyncPolicy)
    syncs: int = 0
    _unsynced: int = 0
    _last_sync: float = field(default_factory=time.monotonic)

    @classmethod
    def create(
        cls, dir_fd: int, name: str, header: PartialHeader, policy: SyncPolicy | None = None
    ) -> PartialWriter:
        """Start a new partial file (atomically replacing any old one) holding only ``header``.

        The writer keeps the descriptor of the file it created, so its appends never reach another file
        (a hard link to a film, or whatever a name was swapped for) however the name changes later.
        """
        fd = fresh.publish(dir_fd, name, header.encode(), tmp_suffix=CACHE_TMP_SUFFIX, mode=_mode_of(dir_fd, name))
        return cls(fd, header, 0, policy or SyncPolicy())

    @classmethod
    def resume(
        cls, dir_fd: int, name: str, read: PartialRead, policy: SyncPolicy | None = None
    ) -> PartialWriter:
        """Continue a partial file after its valid prefix (a damaged tail is dropped).

        The prefix is written into a new file that replaces the name, never appended to or truncated in
        place: the existing file may be a hard link shared with another work dir or a film.
        """
        data = read.header.encode() + b"".join(encode_entry(r, d) for r, d in read.results)
        fd = fresh.publish(dir_fd, name, data, tmp_suffix=CACHE_TMP_SUFFIX, mode=_mode_of(dir_fd, name))
        return cls(fd, read.header, read.done, policy or SyncPolicy())

    def append(self, record: KeyframeRecord, description: SceneDescription | None) -> None:
        """Append the next frame's result (in plan order) in a single write."""
        if self.fd is None:
            raise RuntimeError("partial results file is closed")
        t, source = self.header.plan[self.done]
        if record.timestamp_s != t or record.source != source:
            raise ValueError(f"frame {self.done} is not the plan's next keyframe")
        data = encode_entry(record, description)
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]
        self.done += 1
        self._unsynced += 1
        if self._unsynced >= self.policy.frames or time.monotonic() - self._last_sync >= self.policy.seconds:
            self.sync()

    def sync(self) -> None:
        """Make every appended entry durable now (before yielding the GPU, stopping, or exiting)."""
        if self.fd is not None and self._unsynced:
            os.fsync(self.fd)
            self.syncs += 1
        self._unsynced = 0
        self._last_sync = time.monotonic()

    def close(self) -> None:
        """Sync and close (idempotent)."""
        if self.fd is None:
            return
        try:
            self.sync()
        finally:
            fd, self.fd = self.fd, None
            os.close(fd)

    def __enter__(self) -> PartialWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _mode_of(dir_fd: int, name: str) -> int:
    """Permission bits to give a rewritten partial file: the old file's if it is a regular file."""
    old = safefs.lstat_in(dir_fd, name)
    return stat.S_IMODE(old.st_mode) if old is not None and stat.S_ISREG(old.st_mode) else 0o644


def open_partial(
    dir_fd: int,
    name: str,
    *,
    source_file: str,
    stamp: SourceStamp,
    plan: Sequence[PlanEntry],
    policy: SyncPolicy | None = None,
) -> tuple[PartialWriter, list[Result]]:
    """Resume the partial file if it was computed from this film state and plan, else start it over.

    Returns the writer and the results already done (a prefix of the plan, possibly empty).
    """
    existing = read_partial_at(dir_fd, name)
    if existing is not None and existing.header.matches(stamp, plan):
        return PartialWriter.resume(dir_fd, name, existing, policy), existing.results
    header = PartialHeader.for_plan(source_file, stamp, plan)
    return PartialWriter.create(dir_fd, name, header, policy), []


def remove_partial_at(dir_fd: int, name: str) -> bool:
    """Delete the partial file (never through a symlink); True if one was removed."""
    try:
        return safefs.unlink_regular(dir_fd, name) is not None
    except FileNotFoundError:
        return False
