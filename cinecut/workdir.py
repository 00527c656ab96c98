"""The work directory of a film: ``<parent>/<stem>_cinecut_work`` and every artifact in it.

Names follow the upstream contract exactly; the few files that are ours alone (lock, stamps sidecar,
partial results) have names upstream never reads.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

WORK_DIR_SUFFIX: Final = "_cinecut_work"
_SUFFIX_BYTES: Final = WORK_DIR_SUFFIX.encode()
CHECKPOINT_NAME: Final = "pipeline_checkpoint.json"
TIMESTAMPS_NAME: Final = "keyframe_timestamps.json"
KEYFRAMES_DIR_NAME: Final = "keyframes"
LOCK_NAME: Final = "cinecut.lock"
STAMPS_NAME: Final = "cinecut_stamps.json"
TRAILER_MANIFEST_NAME: Final = "TRAILER_MANIFEST.json"
ASSEMBLY_MANIFEST_NAME: Final = "ASSEMBLY_MANIFEST.json"
CACHE_SUFFIX: Final = ".scenedesc.msgpack"
PARTIAL_SUFFIX: Final = ".scenedesc.partial"
PROXY_SUFFIX: Final = "_proxy.mp4"
CKPT_TMP_SUFFIX: Final = ".ckpt.tmp"
CACHE_TMP_SUFFIX: Final = ".cache.tmp"
KEYFRAME_RE: Final = re.compile(r"^frame_\d{10}\.jpg$")
_TRAILER_RE: Final = re.compile(r"^(?P<stem>.+)_trailer_(?P<vibe>[^/]+)\.mp4$", re.IGNORECASE)
_SUB_TAG_RE: Final = re.compile(r"^[A-Za-z0-9_-]{1,12}$")
DEFAULT_SUBTITLE_EXTENSIONS: Final = (".srt", ".ass", ".ssa")


def keyframe_name(timestamp_s: float) -> str:
    """Upstream's JPEG name for a keyframe: ``frame_<ms:010d>.jpg`` with ms = int(timestamp_s * 1000)."""
    return f"frame_{int(timestamp_s * 1000):010d}.jpg"


def is_work_dir_name(name: str | bytes) -> bool:
    """True for a folder name ``<stem>_cinecut_work`` (never scanned for films, never watched).

    The one definition of a work dir by name, used by discovery, the watchers and the engine alike: the
    whole name ends with the suffix and has a stem before it. A name that merely contains the suffix
    (``Gym_cinecut_workout``, ``Best_cinecut_works.mkv``, a film ``Stem_cinecut_work.mkv``) is not one.
    """
    suffix = _SUFFIX_BYTES if isinstance(name, bytes) else WORK_DIR_SUFFIX
    return name.endswith(suffix) and len(name) > len(suffix)  # type: ignore[arg-type]


def in_work_dir(path: str | bytes | os.PathLike[str], root: str | bytes | os.PathLike[str] | None = None) -> bool:
    """True if ``path`` is a work dir or lies inside one: a component of it (below ``root``, when given)
    is a work-dir name by :func:`is_work_dir_name`. Takes str or bytes paths (inotify reports bytes)."""
    p = os.fspath(path)
    suffix = _SUFFIX_BYTES if isinstance(p, bytes) else WORK_DIR_SUFFIX
    if suffix not in p:  # type: ignore[operator]
        return False
    if root is not None:
        r = os.fspath(root)
        r = os.fsencode(r) if isinstance(p, bytes) else os.fsdecode(r)
        sep = b"/" if isinstance(p, bytes) else "/"
        r = r.rstrip(sep) or sep  # type: ignore[arg-type]
        if p == r:
            return False
        prefix = r if r.endswith(sep) else r + sep  # type: ignore[operator,arg-type]
        if p.startswith(prefix):  # type: ignore[arg-type]
            p = p[len(prefix) :]
    sep = b"/" if isinstance(p, bytes) else "/"
    return any(is_work_dir_name(part) for part in p.split(sep))  # type: ignore[arg-type]


def stem_of_work_dir(name: str) -> str:
    """The film stem a work-dir name belongs to."""
    return name[: -len(WORK_DIR_SUFFIX)]


def trailer_stem(name: str) -> str | None:
    """The stem of an upstream trailer output ``<stem>_trailer_<vibe>.mp4``, else None."""
    m = _TRAILER_RE.match(name)
    return m.group("stem") if m else None


def is_trailer_name(name: str) -> bool:
    """True for upstream's final trailer files: user data, never a film to analyse, never deleted."""
    return trailer_stem(name) is not None


@dataclass(frozen=True, slots=True)
class WorkDir:
    """A film and the paths of its work directory (nothing here touches the disk)."""

    film: Path
    path: Path

    @classmethod
    def for_film(cls, film: str | os.PathLike[str]) -> WorkDir:
        """Upstream's work dir of a film: ``<parent>/<stem>_cinecut_work`` of the film's realpath.

        Upstream's CLI resolves the film with ``realpath`` before deriving it, so a symlinked film file
        has its work dir beside its target, and every path spelled from here is the one upstream records.
        """
        f = Path(os.path.realpath(film))
        return cls(f, f.with_name(f"{f.stem}{WORK_DIR_SUFFIX}"))

    @property
    def stem(self) -> str:
        """The film's stem, which names the work dir, cache and proxy."""
        return self.film.stem

    @property
    def cache_name(self) -> str:
        return f"{self.stem}{CACHE_SUFFIX}"

    @property
    def partial_name(self) -> str:
        return f"{self.stem}{PARTIAL_SUFFIX}"

    @property
    def proxy_name(self) -> str:
        return f"{self.stem}{PROXY_SUFFIX}"

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT_NAME

    @property
    def cache_path(self) -> Path:
        return self.path / self.cache_name

    @property
    def partial_cache_path(self) -> Path:
        return self.path / self.partial_name

    @property
    def proxy_path(self) -> Path:
        return self.path / self.proxy_name

    @property
    def keyframes_dir(self) -> Path:
        return self.path / KEYFRAMES_DIR_NAME

    @property
    def timestamps_path(self) -> Path:
        return self.path / TIMESTAMPS_NAME

    @property
    def lock_path(self) -> Path:
        return self.path / LOCK_NAME

    @property
    def stamps_path(self) -> Path:
        return self.path / STAMPS_NAME

    def trailer_path(self, vibe: str) -> Path:
        """Where upstream writes the final trailer (beside the film, outside the work dir)."""
        return self.film.parent / f"{self.stem}_trailer_{vibe}.mp4"


def as_work_dir(target: WorkDir | str | os.PathLike[str], source_file: str | os.PathLike[str] | None = None) -> WorkDir:
    """Accept a WorkDir, or a work-dir path (with the film path when known) for the seed's path-based API."""
    if isinstance(target, WorkDir):
        return target
    path = Path(os.path.abspath(target))
    if source_file is not None:
        return WorkDir(Path(os.path.abspath(source_file)), path)
    stem = stem_of_work_dir(path.name) if is_work_dir_name(path.name) else path.name
    return WorkDir(path.parent / stem, path)


def subtitle_sidecars(
    film: str | os.PathLike[str],
    extensions: Sequence[str] = DEFAULT_SUBTITLE_EXTENSIONS,
    names: Iterable[str] | None = None,
) -> list[Path]:
    """Subtitle files that belong to a film: ``<stem>.<ext>`` and ``<stem>.<tags>.<ext>`` (e.g. ``.en.forced.srt``).

    ``names`` lets a scanner that already listed the folder avoid a second listing.
    """
    f = Path(film)
    stem = f.stem
    exts = {e.lower() for e in extensions}
    if names is None:
        try:
            names = os.listdir(f.parent)
        except OSError:
            return []
    found = [f.parent / n for n in names if subtitle_belongs_to(n, stem, exts)]
    return sorted(found)


def subtitle_belongs_to(name: str, stem: str, extensions: Iterable[str]) -> bool:
    """True if the file ``name`` is a subtitle sidecar of the film whose stem is ``stem``."""
    base, ext = os.path.splitext(name)
    if ext.lower() not in extensions or not base.startswith(stem):
        return False
    rest = base[len(stem) :]
    if rest == "":
        return True
    if not rest.startswith("."):
        return False
    tags = rest[1:].split(".")
    return 0 < len(tags) <= 3 and all(_SUB_TAG_RE.match(t) for t in tags)


def subtitle_stems(name: str, extensions: Iterable[str]) -> list[str]:
    """Every film stem the file ``name`` is a subtitle sidecar of, by :func:`subtitle_belongs_to`'s rule:
    the name without its extension and without one to three trailing tags. A folder's sidecars are then
    indexed by stem once, instead of testing every name against every film (quadratic in a flat folder)."""
    base, ext = os.path.splitext(name)
    if ext.lower() not in extensions:
        return []
    stems = [base]
    for _ in range(3):
        head, dot, tag = base.rpartition(".")
        if not dot or not _SUB_TAG_RE.match(tag):
            break
        stems.append(head)
        base = head
    return stems


def same_stem_conflicts(films: Iterable[str | os.PathLike[str]]) -> dict[Path, list[Path]]:
    """Work dirs claimed by more than one film (``Heat.mkv`` and ``Heat.mp4`` share ``Heat_cinecut_work``)."""
    by_dir: dict[Path, list[Path]] = defaultdict(list)
    for film in films:
        wd = WorkDir.for_film(film)
        by_dir[wd.path].append(wd.film)
    return {d: sorted(fs) for d, fs in by_dir.items() if len(fs) > 1}
