"""A film's path identity, spelled exactly as upstream CineCut spells it.

Upstream resolves every path argument with ``realpath`` (typer ``resolve_path=True``) and starts fresh
when ``checkpoint.source_file != str(video)``. So every path we WRITE (checkpoint ``source_file`` and
``proxy_path``, cache metadata and ``frame_path``, our stamps sidecar) is the realpath, and every
comparison of a stored path with a film resolves BOTH sides: two spellings of one file (a symlinked
library folder, an older abspath-spelled record of ours) are the same film. Only content (stamps) ever
decides staleness; a path comparison never discards or redoes work.
"""

from __future__ import annotations

import os
from pathlib import Path


def film_identity(path: str | os.PathLike[str]) -> str:
    """The spelling upstream records for ``path``: ``os.path.realpath`` (symlinks resolved, absolute).

    A path that does not exist (a film just deleted or renamed away) resolves as far as it exists.
    """
    return os.path.realpath(path)


def film_identity_path(path: str | os.PathLike[str]) -> Path:
    """:func:`film_identity` as a Path."""
    return Path(film_identity(path))


def same_film_path(a: str | os.PathLike[str] | None, b: str | os.PathLike[str] | None) -> bool:
    """True when ``a`` and ``b`` name the same path once both are resolved as upstream resolves them.

    Equal strings are equal without a syscall; None (nothing recorded) never matches.
    """
    if a is None or b is None:
        return False
    sa, sb = os.fspath(a), os.fspath(b)
    if sa == sb:
        return True
    return film_identity(sa) == film_identity(sb)
