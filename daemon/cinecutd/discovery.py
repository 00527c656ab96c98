"""What in a library folder is a film, which files are its subtitles, and scanning a root for them.

Never a film: anything inside a ``*_cinecut_work`` dir, upstream trailers (``<stem>_trailer_<vibe>.mp4``),
hidden files (rsync's ``.name.XXXXXX`` temp files among them) and in-progress downloads.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from cinecut.workdir import in_work_dir as _in_work_dir
from cinecut.workdir import is_trailer_name, is_work_dir_name, subtitle_belongs_to, subtitle_stems
from cinecutd import judged
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
    #: What an earlier scan of this root learned (reused), and what this one learns (filled when given).
    known: Known | None = None
    learned: Known | None = None
    #: Work dirs ``known`` did not hold at this path with this inode (all of them without ``known``): new
    #: here, or replaced, since the last scan.
    new_work_dirs: set[Path] = field(default_factory=set)


@dataclass(slots=True)
class Known:
    """Each film, subtitle and work dir a scan met, by path string, with its path object and what its
    name makes it: the next scan of the root neither classifies a name it met before nor builds its path
    again (and finds it in the registry by a hash computed once). Only valid for the same extensions."""

    exts: tuple[frozenset[str], frozenset[str]]
    films: dict[str, tuple[Path, str]] = field(default_factory=dict)  # -> (path, stem)
    subtitles: dict[str, tuple[Path, list[str]]] = field(default_factory=dict)  # -> (path, film stems)
    work_dirs: dict[str, tuple[Path, int]] = field(default_factory=dict)  # -> (path, inode)
    folders: dict[str, Path] = field(default_factory=dict)
    listings: dict[str, Listing] = field(default_factory=dict)  # folder -> what its listing gave

    @classmethod
    def fresh(cls, video_extensions: Iterable[str], subtitle_extensions: Iterable[str]) -> Known:
        return cls((frozenset(e.lower() for e in video_extensions), frozenset(e.lower() for e in subtitle_extensions)))


@dataclass(slots=True)
class Listing:
    """What one folder's listing gave a scan, kept with the folder's own stat identity: while that identity
    holds, the folder has the same entries (creating, removing or renaming an entry changes the folder's
    mtime and ctime), so the next scan takes them from here instead of reading the listing again.

    Only a folder without subfolders to descend and without symlinked films is remembered (a mount over
    a subfolder, or a link's target vanishing, changes nothing in the folder itself); and, like a film's
    memo (:mod:`cinecutd.judged`), only when it last changed more than ``RACY_S`` before it was read, and
    for ``TTL_S`` at most."""

    ident: tuple[int, int, int, int]  # st_dev, st_ino, st_mtime_ns, st_ctime_ns
    at: float  # monotonic, for the TTL
    films: dict[Path, tuple[Path, ...]]
    work_dirs: dict[str, tuple[Path, int]]
    film_names: dict[str, tuple[Path, str]]
    subtitles: dict[str, tuple[Path, list[str]]]

    def replay(self, result: ScanResult, learned: Known | None) -> None:
        result.films.update(self.films)
        result.work_dirs.update(w for w, _ in self.work_dirs.values())
        if learned is not None:
            learned.work_dirs.update(self.work_dirs)
            learned.films.update(self.film_names)
            learned.subtitles.update(self.subtitles)


def _folder_ident(folder: Path) -> tuple[tuple[int, int, int, int] | None, bool]:
    """The folder's identity, and whether it changed long enough ago to be remembered."""
    try:
        st = os.stat(folder)
    except OSError:
        return None, False
    settled = st.st_ctime_ns < time.time_ns() - int(judged.RACY_S * 1e9)
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns), settled


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
    """One folder: one listing, subtitles indexed by stem (linear in the folder's size, however flat).
    A name met by an earlier scan (``result.known``) is neither classified nor made a path again."""
    films: list[tuple[Path, str]] = []
    subs_by_stem: dict[str, list[Path]] = {}
    child = _child(folder)
    known = result.known if result.known is not None and result.known.exts == (vexts, sexts) else None
    kf, ks, kw, kd = (known.films, known.subtitles, known.work_dirs, known.folders) if known else ({}, {}, {}, {})
    learned = result.learned
    lf, ls, lw, ld = (
        (learned.films, learned.subtitles, learned.work_dirs, learned.folders) if learned else ({}, {}, {}, {})
    )
    key = str(folder)
    ident, settled = _folder_ident(folder) if learned is not None else (None, False)
    if ident is not None and known is not None:
        memo = known.listings.get(key)
        if memo is not None and memo.ident == ident and time.monotonic() - memo.at <= judged.TTL_S:
            memo.replay(result, learned)
            if learned is not None:
                learned.listings[key] = memo
            return
    if learned is not None:  # this folder's share of what is learned, for its listing's memo
        lf, ls, lw = {}, {}, {}
    unsure = False  # a symlinked film, or an entry that could not be classified
    n_subdirs = len(subdirs)
    n_loops = len(result.loops)
    n = 0
    try:
        with os.scandir(folder) as it:
            for entry in it:
                n += 1
                if n % ENTRIES_PER_STEP == 0:
                    yield
                path = entry.path
                try:
                    if entry.is_dir(follow_symlinks=False):
                        hit = kw.get(path)
                        if hit is not None and hit[1] == entry.inode():
                            result.work_dirs.add(hit[0])  # the same work dir as last time
                            lw[path] = hit
                            continue
                        name = entry.name
                        if is_work_dir_name(name):
                            hit = (hit[0] if hit is not None else child(name), entry.inode())
                            result.new_work_dirs.add(hit[0])
                            result.work_dirs.add(hit[0])
                            lw[path] = hit
                        elif not name.startswith("."):
                            if seen is not None:
                                ident = folder_id(entry.stat(follow_symlinks=False))
                                if ident in seen:
                                    result.loops.append(child(name))
                                    continue
                                seen.add(ident)
                            sub_folder = kd.get(path) or child(name)
                            subdirs.append(sub_folder)
                            ld[path] = sub_folder
                        continue
                    film = kf.get(path)
                    if film is None:
                        sub = ks.get(path)
                        if sub is None:
                            name = entry.name
                            if is_film_name(name, vexts):
                                film = (child(name), os.path.splitext(name)[0])
                            else:
                                stems = subtitle_stems(name, sexts)
                                if not stems:
                                    continue
                                sub = (child(name), stems)
                        if sub is not None:
                            for stem in sub[1]:
                                subs_by_stem.setdefault(stem, []).append(sub[0])
                            ls[path] = sub
                            continue
                    if entry.is_file(follow_symlinks=True):
                        films.append(film)
                        lf[path] = film
                        unsure = unsure or entry.is_symlink()
                except OSError:
                    unsure = True
                    continue
    except OSError as exc:
        result.unreadable.append((folder, exc.strerror or str(exc)))
        return
    out: dict[Path, tuple[Path, ...]] = {}
    for i, (film_path, stem) in enumerate(films):
        if i and i % ENTRIES_PER_STEP == 0:
            yield
        subs = subs_by_stem.get(stem)
        out[film_path] = () if not subs else (subs[0],) if len(subs) == 1 else tuple(sorted(subs))
    result.films.update(out)
    if learned is not None:
        learned.films.update(lf)
        learned.subtitles.update(ls)
        learned.work_dirs.update(lw)
        if ident is not None and settled and not unsure and len(subdirs) == n_subdirs \
                and len(result.loops) == n_loops:
            learned.listings[key] = Listing(ident, time.monotonic(), out, lw, lf, ls)


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
