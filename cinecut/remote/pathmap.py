"""A worker's view of the coordinator's libraries: ``/movies=/srv/media/films``.

The NAS may be mounted at different paths on each host. A job names the film as the coordinator sees it
and the coordinator's library root; the worker maps that root to its own mount and accepts the job only
if the film, fully resolved (symlinks, ``..``), lies inside the mapped library. Anything else (a root it
does not map, a path outside its root, a symlink out of the library, a work dir) is refused before a
single byte of it is read or written: Redis is shared, so a job is a request, not an order.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from cinecut.workdir import in_work_dir


class Refused(Exception):
    """The job names a path this worker will not touch."""


def _clean_abs(text: str, what: str) -> PurePosixPath:
    p = PurePosixPath(text)
    if not p.is_absolute() or ".." in p.parts or "\0" in text:
        raise Refused(f"{what} {text!r} is not a plain absolute path")
    return p


@dataclass(frozen=True, slots=True)
class PathMap:
    """Coordinator root -> this host's path of the same folder (a root mapped to itself: same view)."""

    entries: tuple[tuple[PurePosixPath, Path], ...]

    @classmethod
    def parse(cls, specs: Iterable[str]) -> PathMap:
        """``FROM=TO`` strings (``TO`` alone: the same path on both sides); ValueError if malformed."""
        out: list[tuple[PurePosixPath, Path]] = []
        for spec in specs:
            src, sep, dest = spec.partition("=")
            if not sep:
                dest = src
            if not src or not dest or not os.path.isabs(src) or not os.path.isabs(dest):
                raise ValueError(f"path map {spec!r}: expected FROM=TO with two absolute paths")
            try:
                key = _clean_abs(os.path.normpath(src), "path map source")
            except Refused as exc:
                raise ValueError(str(exc)) from None
            if any(k == key for k, _ in out):
                raise ValueError(f"path map {spec!r}: {src} is mapped twice")
            out.append((key, Path(os.path.normpath(dest))))
        return cls(tuple(out))

    def local(self, film: str, root: str) -> Path:
        """This host's realpath of ``film`` (under the coordinator's ``root``); Refused if outside."""
        f = _clean_abs(film, "film")
        r = _clean_abs(root, "library root")
        try:
            rel = f.relative_to(r)
        except ValueError:
            raise Refused(f"{film} is not inside its library root {root}") from None
        if not rel.parts:
            raise Refused(f"{film} is the library root itself")
        dest = next((d for k, d in self.entries if k == r), None)
        if dest is None:
            raise Refused(f"library root {root} is not one this worker maps (--path-map)")
        base = os.path.realpath(dest)
        target = os.path.realpath(os.path.join(dest, *rel.parts))
        if os.path.commonpath([base, target]) != base or target == base:
            raise Refused(f"{film} resolves to {target}, outside the mapped library {dest}")
        if in_work_dir(target, base):
            raise Refused(f"{film} lies inside a work dir")
        try:
            st = os.stat(target)
        except OSError as exc:
            raise Refused(f"{film}: {exc.strerror or exc} at {target}") from None
        if not stat.S_ISREG(st.st_mode):
            raise Refused(f"{film} is not a regular file at {target}")
        return Path(target)
