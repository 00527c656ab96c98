"""Whose results a work dir holds: the one question asked before a work dir is moved, parked or judged.

Two films can point at one work dir (same-stem twins ``Heat.mkv`` and ``Heat.mp4``), and a name can pass
from one file to another (``mv A.mkv .swap; mv B.mkv A.mkv``). Moving or revalidating a work dir on the
word of its *name* alone hands one film's results to another, so every such decision asks the work dir
itself. Evidence, strongest first:

1. the film the results name: the checkpoint's ``source_file``, else the cache metadata's, else our stamps
   sidecar's (compared as realpaths, since upstream stores ``realpath`` of the film);
2. the file identity (device, inode) our stamps sidecar recorded, trusted only when the sidecar speaks of
   that same film: it tells a file that still carries the name from another that took the name over.

Reads go through directory descriptors with ``O_NOFOLLOW`` (a symlinked work dir or file is no evidence).
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from pathlib import Path

from cinecut import safefs
from cinecut.checkpoint import read_checkpoint_at
from cinecut.inference.cache import CacheMetadata, metadata_from_fd
from cinecut.paths import film_identity
from cinecut.stamp import SourceStamp
from cinecut.stamps import read_stamps_at
from cinecut.workdir import CACHE_SUFFIX

Identity = tuple[int, int]  # (st_dev, st_ino)


class Owner(enum.StrEnum):
    """The answer to "are these results this film's?"."""

    MINE = "mine"
    THEIRS = "theirs"
    UNKNOWN = "unknown"  # nothing in the work dir names a film (or there is no work dir)


@dataclass(frozen=True, slots=True)
class Evidence:
    """What a work dir says about the film its results were computed from."""

    named: str | None  # realpath of the film the results name
    identity: Identity | None  # that file's (device, inode), from our sidecar when it names the same film
    stamp: SourceStamp | None  # the video stamp our sidecar recorded with that identity
    cache_stamp: SourceStamp | None = None  # the cache's stamp, when the cache names the same film

    @property
    def named_path(self) -> Path | None:
        return Path(self.named) if self.named is not None else None


def real(path: str | os.PathLike[str]) -> str:
    """The realpath form in which upstream records a film (works for a path that no longer exists)."""
    return film_identity(path)


def _cache_meta(fd: int, stem: str | None) -> CacheMetadata | None:
    if stem is None:
        return None
    try:
        cfd = safefs.open_regular(fd, f"{stem}{CACHE_SUFFIX}")
    except OSError:
        return None
    try:
        return metadata_from_fd(cfd)
    finally:
        os.close(cfd)


def read_evidence_at(fd: int, stem: str | None) -> Evidence:
    """Evidence of the work dir open at ``fd``; ``stem`` names its cache (the stem the results were made
    under: the work dir's own for a work dir in place, the recorded film's for a parked one)."""
    ckpt = read_checkpoint_at(fd).checkpoint
    rec = read_stamps_at(fd)
    named = ckpt.source_file if ckpt is not None else None
    if stem is None and rec is not None:
        stem = Path(rec.source_file).stem
    if stem is None and named is not None:
        stem = Path(named).stem
    meta = _cache_meta(fd, stem)
    if named is None and meta is not None:
        named = meta.source_file
    if named is None and rec is not None:
        named = rec.source_file
    if named is None:
        return Evidence(None, None, None)
    named = real(named)
    identity: Identity | None = None
    stamp: SourceStamp | None = None
    if rec is not None and rec.inode is not None and rec.device is not None and real(rec.source_file) == named:
        identity, stamp = (rec.device, rec.inode), rec.video
    cache_stamp = meta.stamp if meta is not None and real(meta.source_file) == named else None
    return Evidence(named, identity, stamp, cache_stamp)


def read_evidence(work_dir: str | os.PathLike[str], stem: str | None) -> Evidence | None:
    """Evidence of a work dir by path; None when there is no such (non-symlinked) directory."""
    try:
        with safefs.work_dir_fd(work_dir) as fd:
            return read_evidence_at(fd, stem)
    except OSError:
        return None


def judge(evidence: Evidence | None, film: str | os.PathLike[str], identity: Identity | None = None) -> Owner:
    """Are the results ``evidence`` describes those of the file that was at ``film`` with ``identity``?

    ``film`` is the name under which the file would have made them (its old name, for a rename).
    Without ``identity`` only the name counts: that is the twin question (which of ``Heat.mkv`` and
    ``Heat.mp4`` owns ``Heat_cinecut_work``). With it, a recorded identity decides: the same file under
    another name is the owner (a folder renamed while nobody watched); another file under the same name
    is not (the name was taken over).
    """
    if evidence is None or evidence.named is None:
        return Owner.UNKNOWN
    if identity is not None and evidence.identity is not None:
        return Owner.MINE if evidence.identity == identity else Owner.THEIRS
    return Owner.MINE if evidence.named == real(film) else Owner.THEIRS


def owner_of(work_dir: str | os.PathLike[str], film: str | os.PathLike[str], identity: Identity | None = None,
             *, stem: str | None = None) -> Owner:
    """:func:`judge` on the work dir at ``work_dir`` (``stem``: its cache's stem, default ``film``'s)."""
    return judge(read_evidence(work_dir, stem if stem is not None else Path(film).stem), film, identity)


__all__ = ["Evidence", "Identity", "Owner", "judge", "owner_of", "read_evidence", "read_evidence_at", "real"]
