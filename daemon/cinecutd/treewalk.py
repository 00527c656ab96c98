"""Walking a folder tree without recursion, without a depth limit, and without going round in circles.

Python's ``os.walk`` (3.11) and watchdog's own walks recurse once per level: a chain of 1,000 nested
folders raises ``RecursionError`` in whatever thread meets it. Every walk of a library tree goes through
here instead: an explicit stack, symlinked folders never followed, and each folder visited once by its
``(st_dev, st_ino)``, so a bind mount of an ancestor (a loop no symlink check can see) ends the branch
instead of the walk running until paths grow past ``PATH_MAX``.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from typing import AnyStr

#: ``(st_dev, st_ino)`` of a folder.
FolderId = tuple[int, int]


def folder_id(st: os.stat_result) -> FolderId:
    return st.st_dev, st.st_ino


def walk(
    top: AnyStr,
    *,
    prune: Callable[[AnyStr], bool] | None = None,
    on_error: Callable[[AnyStr, OSError], None] | None = None,
    on_loop: Callable[[AnyStr], None] | None = None,
) -> Iterator[tuple[AnyStr, list[AnyStr], list[AnyStr]]]:
    """Yield ``(folder, sub-folder names, other names)`` for ``top`` and every folder below it (depth
    first, like ``os.walk`` top-down), iteratively.

    ``prune(name)`` True leaves a sub-folder out (and all it holds: work dirs). Symlinked folders are not
    entered (they are listed with the other names). ``on_error`` hears of folders that could not be
    listed (the walk goes on); ``on_loop`` of a folder already visited under another path (a bind mount
    of an ancestor), which is left out.
    """
    try:
        seen: set[FolderId] = {folder_id(os.stat(top))}
    except OSError as exc:
        if on_error is not None:
            on_error(top, exc)
        return
    stack: list[AnyStr] = [top]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError as exc:
            if on_error is not None:
                on_error(folder, exc)
            continue
        dirs: list[AnyStr] = []
        others: list[AnyStr] = []
        paths: list[AnyStr] = []
        for entry in entries:
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
                if is_dir and prune is not None and prune(entry.name):
                    continue
                st = entry.stat(follow_symlinks=False) if is_dir else None
            except OSError:
                continue  # vanished since it was listed
            if st is None or not stat.S_ISDIR(st.st_mode):
                others.append(entry.name)
                continue
            ident = folder_id(st)
            if ident in seen:
                if on_loop is not None:
                    on_loop(entry.path)
                continue
            seen.add(ident)
            dirs.append(entry.name)
            paths.append(entry.path)
        yield folder, dirs, others
        stack.extend(reversed(paths))


def walk_folders(
    top: AnyStr,
    *,
    prune: Callable[[AnyStr], bool] | None = None,
    on_error: Callable[[AnyStr, OSError], None] | None = None,
    on_loop: Callable[[AnyStr], None] | None = None,
) -> Iterator[AnyStr]:
    """``top`` and every folder below it, as :func:`walk` finds them."""
    for folder, _, _ in walk(top, prune=prune, on_error=on_error, on_loop=on_loop):
        yield folder
