"""What a film's work dir holds right now, and the invariants the daemon's tests assert on it.

Read with the core's readers (symlink-safe) and judged by upstream's own rule, independently of the
daemon, so a check cannot agree with a daemon bug: "no stale result survives", "invalidated from the
video / from the subtitles", "still warm", "files that are not ours are unchanged".
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cinecut.checkpoint import read_checkpoint
from cinecut.inference.cache import read_cache_metadata
from cinecut.stamp import SourceStamp
from cinecut.stamps import InputStamps, current_stamps, read_stamps
from cinecut.workdir import WorkDir

from .films import ALL_STAGES, KEPT_IN_WORK_DIR, Film

if TYPE_CHECKING:
    from .runner import Daemon


def snapshot(paths: Iterable[Path]) -> dict[Path, bytes | None]:
    """Contents of files that must not change (None for a missing one)."""
    out: dict[Path, bytes | None] = {}
    for p in paths:
        try:
            out[p] = p.read_bytes()
        except FileNotFoundError:
            out[p] = None
    return out


def sacred_files(film: Film) -> list[Path]:
    """What no invalidation may touch: manifests, later-stage output, unknown files, the trailer."""
    out = [film.wd.path / name for name in KEPT_IN_WORK_DIR]
    if film.trailer is not None:
        out.append(film.trailer)
    return out


def changed_files(before: dict[Path, bytes | None]) -> list[Path]:
    """The files of a :func:`snapshot` whose content differs now."""
    return [p for p, data in before.items() if snapshot([p])[p] != data]


@dataclass(frozen=True)
class WorkState:
    """What is in a film's work dir right now (read with the core's readers, symlink-safe)."""

    exists: bool
    stages: tuple[str, ...]
    checkpoint_source: str | None
    cache_stamp: SourceStamp | None
    cache_source: str | None
    cache_file: bool
    proxy: bool
    keyframes: int
    timestamps: bool
    stamps: InputStamps | None

    film_stamp: SourceStamp | None

    @property
    def cache_valid(self) -> bool:
        """Upstream's rule: the cache's mtime/size equal the film's current stat."""
        return self.cache_stamp is not None and self.cache_stamp == self.film_stamp


def work_state(film: Film | Path) -> WorkState:
    path = film.path if isinstance(film, Film) else film
    wd = WorkDir.for_film(path)
    ck = read_checkpoint(wd.path).checkpoint
    meta = read_cache_metadata(wd.cache_path)
    kdir = wd.keyframes_dir
    frames = len(list(kdir.glob("frame_*.jpg"))) if kdir.is_dir() and not kdir.is_symlink() else 0
    return WorkState(
        exists=wd.path.is_dir() and not wd.path.is_symlink(),
        stages=tuple(ck.stages_complete) if ck else (),
        checkpoint_source=ck.source_file if ck else None,
        cache_stamp=meta.stamp if meta else None,
        cache_source=meta.source_file if meta else None,
        cache_file=os.path.lexists(wd.cache_path),
        proxy=os.path.lexists(wd.proxy_path),
        keyframes=frames,
        timestamps=os.path.lexists(wd.timestamps_path),
        stamps=read_stamps(wd.path),
        film_stamp=SourceStamp.maybe(path),
    )


def stamps_current(film: Film) -> bool:
    """Our sidecar records exactly the film's (and its present subtitles') current stamps."""
    rec = read_stamps(film.wd.path)
    if rec is None:
        return False
    now = current_stamps(film.path, [s for s in film.subtitles if s.exists()])
    return rec.video == now.video and rec.subtitles == now.subtitles and rec.source_file == str(film.path)


def no_stale_results(film: Film) -> bool:
    """The invariant of issue 3: no stale cache and no stale stage survive.

    A cache that is present matches the film's stat; if any stage is complete, our stamps match the
    film's current inputs (so nothing complete was computed from an older film or subtitle).
    """
    s = work_state(film)
    if s.cache_file and not s.cache_valid:
        return False
    if s.stages or s.proxy or s.keyframes or s.timestamps:
        return stamps_current(film)
    return True


def video_invalidated(film: Film) -> bool:
    """Everything downstream of the video is reset and the regenerable files are gone, stamps current."""
    s = work_state(film)
    return (
        s.exists
        and s.stages == ()
        and not s.cache_file
        and not s.proxy
        and s.keyframes == 0
        and not s.timestamps
        and stamps_current(film)
    )


def subtitles_invalidated(film: Film) -> bool:
    """Reset from ``subtitles``: the proxy (video only) stays, keyframes and cache are gone."""
    s = work_state(film)
    return (
        s.exists
        and s.stages == ("proxy",)
        and s.proxy
        and not s.cache_file
        and s.keyframes == 0
        and not s.timestamps
        and stamps_current(film)
    )


def warm(film: Film) -> bool:
    """Untouched results: every stage complete, a valid cache, keyframes present, stamps current."""
    s = work_state(film)
    return s.stages == tuple(ALL_STAGES) and s.cache_valid and s.proxy and s.keyframes > 0 and stamps_current(film)


def invalidations_of(d: Daemon, film: Film | Path) -> list[dict[str, Any]]:
    """The daemon's recent invalidation records for one film (newest first)."""
    path = str(film.path if isinstance(film, Film) else film)
    return [r for r in d.status()["recent_invalidations"] if r["film"] == path]
