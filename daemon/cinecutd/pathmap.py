"""Paths as Radarr/Sonarr see them, translated to this host's paths (``[[path_map]]``).

Radarr usually runs in a container where the films are ``/movies``; on the host they are
``/srv/media/films``. The longest matching ``from`` wins, compared by whole components (``/movies`` maps
``/movies/Heat`` but not ``/movies2/Heat``). Paths are normalised first, so ``/movies/../etc`` is ``/etc``
and maps (or not) as ``/etc`` would: a mapping can never be escaped with ``..``.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterable

from cinecutd.config import PathMapConfig


class PathRefused(ValueError):
    """A path that cannot name a file of this host (relative, NUL, not text)."""


def normalise(path: object) -> str:
    """An absolute, normalised POSIX path (``//x/./y/`` is ``/x/y``), or PathRefused."""
    if not isinstance(path, str) or not path:
        raise PathRefused(f"not a path: {path!r}"[:300])
    if "\x00" in path:
        raise PathRefused("a path with a NUL character")
    if not path.startswith("/"):
        raise PathRefused(f"not an absolute path: {path!r}; a [[path_map]] maps absolute paths only"[:300])
    return "/" + posixpath.normpath(path).lstrip("/")


class PathMap:
    """The configured mappings, longest ``from`` first."""

    def __init__(self, maps: Iterable[PathMapConfig]) -> None:
        pairs = [(normalise(str(m.src)), normalise(str(m.dest))) for m in maps]
        self._pairs = sorted(pairs, key=lambda p: len(p[0].split("/")) if p[0] != "/" else 0, reverse=True)

    def __call__(self, path: object) -> str:
        """This host's path for ``path`` (normalised; unchanged when no ``from`` matches)."""
        p = normalise(path)
        for src, dest in self._pairs:
            if src == "/":
                return normalise(dest + p)
            if p == src or p.startswith(src + "/"):
                return normalise(dest + p[len(src):]) if p != src else dest
        return p

    def __bool__(self) -> bool:
        return bool(self._pairs)


def split_paths(value: str | None) -> list[str]:
    """Radarr's and Sonarr's ``|``-separated path lists (``Radarr_DeletedPaths``); empty parts dropped."""
    if not value:
        return []
    return [p for p in value.split("|") if p.strip()]


def relative_to_root(path: str, root: str) -> str | None:
    """``path`` below ``root`` by whole components (None when outside or the root itself)."""
    root = root.rstrip("/") or "/"
    if root == "/":
        return path.lstrip("/") or None
    if path.startswith(root + "/"):
        return path[len(root) + 1:] or None
    return None


def is_within(path: str, roots: Iterable[str]) -> str | None:
    """The root ``path`` is strictly below, if any."""
    for root in roots:
        if relative_to_root(path, os.fspath(root)) is not None:
            return os.fspath(root)
    return None
