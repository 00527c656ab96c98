"""What in a library folder is a film, which files are its subtitles, and scanning a root for them.

Never a film: anything inside a ``*_cinecut_work`` dir, upstream trailers (``<stem>_trailer_<vibe>.mp4``),
hidden files (rsync's ``.name.XXXXXX`` temp files among them) and in-progress downloads.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from cinecut.workdir import WORK_DIR_SUFFIX, is_trailer_name, is_work_dir_name, subtitle_belongs_to

IN_PROGRESS_SUFFIXES: Final = (".part", ".tmp", ".!qb", ".crdownload", ".partial", ".download", ".!ut", ".temp")


def is_ignored_name(name: str) -> bool:
    """Hidden or in-progress files are never films (they become films when renamed into place)."""
    lower = name.lower()
    return name.startswith(".") or lower.endswith(IN_PROGRESS_SUFFIXES) or name.endswith("~")


def is_film_name(name: str, video_extensions: Iterable[str]) -> bool:
    """True if a file with this name is a film to keep a cache for."""
    if is_ignored_name(name) or is_trailer_name(name):
        return False
    return os.path.splitext(name)[1].lower() in video_extensions


def in_work_dir(path: str | os.PathLike[str]) -> bool:
    """True if any component of ``path`` is a work dir (events there are ours or the pipeline's)."""
    s = os.fspath(path)
    if WORK_DIR_SUFFIX not in s:
        return False
    return any(is_work_dir_name(part) for part in Path(s).parts)


@dataclass(slots=True)
class ScanResult:
    """Everything a scan of one root found."""

    root: Path
    films: dict[Path, tuple[Path, ...]] = field(default_factory=dict)  # film -> its subtitle sidecars
    work_dirs: set[Path] = field(default_factory=set)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)
    missing: bool = False


def scan_root(
    root: Path,
    video_extensions: tuple[str, ...],
    subtitle_extensions: tuple[str, ...],
    *,
    max_depth: int = 32,
) -> ScanResult:
    """Walk a library root (not following directory symlinks, so loops cannot trap it).

    Symlinked film files are films (Plex users link them); symlinked folders are not descended. An
    unreadable folder is recorded and skipped, never fatal.
    """
    result = ScanResult(root)
    try:
        st = os.stat(root)
    except OSError as exc:
        result.missing = True
        result.unreadable.append((root, exc.strerror or str(exc)))
        return result
    if not stat.S_ISDIR(st.st_mode):
        result.missing = True
        result.unreadable.append((root, "not a directory"))
        return result
    vexts = frozenset(e.lower() for e in video_extensions)
    sexts = frozenset(e.lower() for e in subtitle_extensions)
    _scan_dir(root, 0, max_depth, vexts, sexts, result)
    return result


def scan_folder(
    folder: Path, video_extensions: frozenset[str], subtitle_extensions: frozenset[str], result: ScanResult
) -> list[Path]:
    """Films directly in ``folder`` (with their subtitles) into ``result``; returns its subfolders."""
    subdirs: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError as exc:
        result.unreadable.append((folder, exc.strerror or str(exc)))
        return subdirs
    names = [e.name for e in entries]
    films: list[str] = []
    for entry in entries:
        name = entry.name
        try:
            if entry.is_dir(follow_symlinks=False):
                if is_work_dir_name(name):
                    result.work_dirs.add(folder / name)
                elif not name.startswith("."):
                    subdirs.append(folder / name)
            elif is_film_name(name, video_extensions) and entry.is_file(follow_symlinks=True):
                films.append(name)
        except OSError:
            continue
    for name in films:
        stem = os.path.splitext(name)[0]
        subs = tuple(sorted(folder / n for n in names if subtitle_belongs_to(n, stem, subtitle_extensions)))
        result.films[folder / name] = subs
    return subdirs


def _scan_dir(
    folder: Path, depth: int, max_depth: int, vexts: frozenset[str], sexts: frozenset[str], result: ScanResult
) -> None:
    stack = [(folder, depth)]
    while stack:
        current, d = stack.pop()
        subdirs = scan_folder(current, vexts, sexts, result)
        if d < max_depth:
            stack.extend((s, d + 1) for s in subdirs)


def subtitles_of(film: Path, subtitle_extensions: tuple[str, ...]) -> tuple[Path, ...]:
    """Current subtitle sidecars of one film (one directory listing)."""
    sexts = frozenset(e.lower() for e in subtitle_extensions)
    stem = film.stem
    try:
        names = os.listdir(film.parent)
    except OSError:
        return ()
    return tuple(sorted(film.parent / n for n in names if subtitle_belongs_to(n, stem, sexts)))


def films_for_subtitle(sub: Path, candidates: Iterable[Path]) -> list[Path]:
    """Films (among ``candidates`` in the same folder) that a subtitle file belongs to."""
    name = sub.name
    out = []
    for film in candidates:
        if film.parent == sub.parent and name.startswith(film.stem):
            out.append(film)
    return out
