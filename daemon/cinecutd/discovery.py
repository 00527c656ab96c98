"""What in a library folder is a film, which files are its subtitles, and scanning a root for them.

Never a film: anything inside a ``*_cinecut_work`` dir, upstream trailers (``<stem>_trailer_<vibe>.mp4``),
hidden files (rsync's ``.name.XXXXXX`` temp files among them) and in-progress downloads.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from cinecut.workdir import in_work_dir as _in_work_dir
from cinecut.workdir import is_trailer_name, is_work_dir_name, subtitle_belongs_to, subtitle_stems
from cinecutd.treewalk import FolderId, folder_id

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


def in_work_dir(path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> bool:
    """True if ``path`` is, or is inside, a work dir (below ``root``): :func:`cinecut.workdir.in_work_dir`."""
    return _in_work_dir(path, root)


@dataclass(slots=True)
class ScanResult:
    """Everything a scan of one root found."""

    root: Path
    films: dict[Path, tuple[Path, ...]] = field(default_factory=dict)  # film -> its subtitle sidecars
    work_dirs: set[Path] = field(default_factory=set)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)
    #: Folders skipped because the walk had already been there under another path (a bind mount loop).
    loops: list[Path] = field(default_factory=list)
    missing: bool = False


#: Entries read from a folder between two yields of a scan: a flat folder of 100,000 films is listed in
#: slices, so a rescan running as a job never holds the engine for the whole listing.
ENTRIES_PER_STEP = 1024


def scan_root(root: Path, video_extensions: tuple[str, ...], subtitle_extensions: tuple[str, ...]) -> ScanResult:
    """Walk a library root to the bottom (see :func:`iter_scan_root`) in one go."""
    result = ScanResult(root)
    for _ in iter_scan_root(root, video_extensions, subtitle_extensions, result):
        pass
    return result


def iter_scan_root(
    root: Path, video_extensions: Iterable[str], subtitle_extensions: Iterable[str], result: ScanResult
) -> Iterator[None]:
    """Walk a library root into ``result``, yielding every few hundred entries (a resumable scan).

    No depth limit and no recursion: an explicit stack, symlinked folders not descended (symlinked film
    files are films: Plex users link them), and every folder visited once by ``(st_dev, st_ino)``, so a
    bind mount of an ancestor ends its branch (recorded in ``result.loops``). An unreadable folder is
    recorded and skipped, never fatal.
    """
    try:
        st = os.stat(root)
    except OSError as exc:
        result.missing = True
        result.unreadable.append((root, exc.strerror or str(exc)))
        return
    if not stat.S_ISDIR(st.st_mode):
        result.missing = True
        result.unreadable.append((root, "not a directory"))
        return
    yield from iter_scan_tree(root, video_extensions, subtitle_extensions, result, seen={folder_id(st)})


def iter_scan_tree(
    top: Path,
    video_extensions: Iterable[str],
    subtitle_extensions: Iterable[str],
    result: ScanResult,
    *,
    seen: set[FolderId] | None = None,
    visited: set[Path] | None = None,
) -> Iterator[None]:
    """Films in ``top`` and every folder below it (work dirs and hidden folders excluded) into ``result``;
    the folders listed are added to ``visited`` when given."""
    vexts = frozenset(e.lower() for e in video_extensions)
    sexts = frozenset(e.lower() for e in subtitle_extensions)
    if seen is None:
        try:
            seen = {folder_id(os.stat(top))}
        except OSError as exc:
            result.unreadable.append((top, exc.strerror or str(exc)))
            return
    stack = [top]
    while stack:
        subdirs: list[Path] = []
        folder = stack.pop()
        if visited is not None:
            visited.add(folder)
        yield from _iter_scan_folder(folder, vexts, sexts, result, subdirs, seen)
        stack.extend(reversed(subdirs))


def scan_folder(
    folder: Path, video_extensions: frozenset[str], subtitle_extensions: frozenset[str], result: ScanResult
) -> list[Path]:
    """Films directly in ``folder`` (with their subtitles) into ``result``; returns its subfolders."""
    subdirs: list[Path] = []
    for _ in _iter_scan_folder(folder, video_extensions, subtitle_extensions, result, subdirs, None):
        pass
    return subdirs


def _child(folder: Path) -> Callable[[str], Path]:
    """``folder / name`` without re-parsing the folder's path for every entry (pathlib's ``/`` does; a
    listing of 20,000 names spends most of its time there). Falls back to ``/`` where pathlib lacks it."""
    make = getattr(folder, "_make_child_relpath", None)
    return make if make is not None else folder.joinpath


def _iter_scan_folder(
    folder: Path,
    vexts: frozenset[str],
    sexts: frozenset[str],
    result: ScanResult,
    subdirs: list[Path],
    seen: set[FolderId] | None,
) -> Iterator[None]:
    """One folder: one listing, subtitles indexed by stem (linear in the folder's size, however flat)."""
    films: list[str] = []
    subs_by_stem: dict[str, list[str]] = {}
    child = _child(folder)
    n = 0
    try:
        with os.scandir(folder) as it:
            for entry in it:
                n += 1
                if n % ENTRIES_PER_STEP == 0:
                    yield
                name = entry.name
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if is_work_dir_name(name):
                            result.work_dirs.add(child(name))
                        elif not name.startswith("."):
                            if seen is not None:
                                ident = folder_id(entry.stat(follow_symlinks=False))
                                if ident in seen:
                                    result.loops.append(child(name))
                                    continue
                                seen.add(ident)
                            subdirs.append(child(name))
                    elif is_film_name(name, vexts) and entry.is_file(follow_symlinks=True):
                        films.append(name)
                    else:
                        for stem in subtitle_stems(name, sexts):
                            subs_by_stem.setdefault(stem, []).append(name)
                except OSError:
                    continue
    except OSError as exc:
        result.unreadable.append((folder, exc.strerror or str(exc)))
        return
    for i, name in enumerate(films):
        if i and i % ENTRIES_PER_STEP == 0:
            yield
        names = subs_by_stem.get(os.path.splitext(name)[0])
        result.films[child(name)] = tuple(sorted(child(n) for n in names)) if names else ()


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
