"""SourceStamp: the film's identity as upstream's cache sees it (``st_mtime``, ``st_size``)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class SourceStamp:
    """``st_mtime`` (float seconds) and ``st_size`` of a file; equal only when both match exactly.

    Exact float equality is the contract: msgpack float64 and JSON (repr) both round-trip a float exactly.
    """

    mtime: float
    size: int

    @classmethod
    def from_stat(cls, st: os.stat_result) -> SourceStamp:
        """Stamp from an existing stat result (no extra syscall)."""
        return cls(st.st_mtime, st.st_size)

    @classmethod
    def of(cls, path: str | os.PathLike[str]) -> SourceStamp:
        """Stamp of the file at ``path`` (follows a symlinked film to its target, as upstream's os.stat does)."""
        return cls.from_stat(os.stat(path))

    @classmethod
    def maybe(cls, path: str | os.PathLike[str]) -> SourceStamp | None:
        """Stamp of ``path``, or None when it is gone or unreadable."""
        try:
            return cls.of(path)
        except OSError:
            return None

    def to_dict(self) -> dict[str, float | int]:
        """JSON/msgpack-friendly form."""
        return {"mtime": self.mtime, "size": self.size}

    @classmethod
    def from_dict(cls, data: object) -> SourceStamp:
        """Strict inverse of :meth:`to_dict`; ValueError on anything else."""
        if not isinstance(data, dict):
            raise ValueError("stamp must be a mapping")
        mtime, size = data.get("mtime"), data.get("size")
        if isinstance(mtime, bool) or not isinstance(mtime, int | float) or not math.isfinite(mtime):
            raise ValueError("stamp mtime must be a finite number")  # NaN would never compare equal
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError("stamp size must be a non-negative integer")
        return cls(float(mtime), size)


def film_path(path: str | os.PathLike[str]) -> Path:
    """A film's path as upstream records it in ``source_file``: its realpath (see :mod:`cinecut.paths`)."""
    return Path(os.path.realpath(path))
