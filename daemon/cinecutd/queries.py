"""Answers to ``status`` and ``film`` requests: pure functions of the registry, the health book and the config.

Nothing here changes a film's state; the engine thread calls them so the registry is read between events,
never during one. Cache validity is ``cinecut.inference.cache.CacheState``, derived once by
:func:`cache_validity` for every place that needs it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from cinecut import __version__
from cinecut.evidence import Verification
from cinecut.inference.cache import CacheMetadata, CacheState, read_cache_metadata
from cinecut.inference.salvage import read_salvage
from cinecut.locks import is_work_dir_locked
from cinecut.stamp import SourceStamp
from cinecut.workdir import WorkDir
from cinecutd.config import Config
from cinecutd.health import Health
from cinecutd.registry import FilmState, Registry


def cache_validity(meta: CacheMetadata | None, stamp: SourceStamp | None, *, work_dir_exists: bool,
                   cache_path: Path) -> CacheState:
    """The one rule for a film's cache: its header names the film's current stamp (valid) or another
    (stale); no readable header is missing when no file is there, corrupt otherwise."""
    if meta is not None:
        return CacheState.VALID if meta.stamp == stamp else CacheState.STALE
    if work_dir_exists and os.path.lexists(cache_path):
        return CacheState.CORRUPT
    return CacheState.MISSING


def status(reg: Registry, health: Health, config: Config) -> dict[str, Any]:
    """The daemon-wide summary (``cinecutd status``)."""
    films = reg.films.values()
    now = time.monotonic()
    settle = config.prewarm.settle_seconds
    per_root: dict[Path, int] = {}
    for st in films:
        per_root[st.root] = per_root.get(st.root, 0) + 1
    return {
        "daemon": {
            "pid": os.getpid(),
            "version": __version__,
            "uptime_s": round(time.time() - reg.started_at, 1),
            "started_at": reg.started_at,
        },
        "roots": [
            {"path": str(r.path), "watch": r.watch, "state": r.state, "films": per_root.get(r.path, 0),
             "detail": r.detail}
            for r in reg.roots.values()
        ],
        "films": {
            "total": len(reg.films),
            "warm": sum(1 for s in films if s.cache == CacheState.VALID),
            "cold": sum(1 for s in films if s.cache != CacheState.VALID),
            "stale_fixed": sum(1 for s in films if s.stale_fixed),
            "orphaned": len(reg.orphans),
            "conflicts": len(reg.conflicts),
            "unverified": sum(1 for s in films if s.verification == Verification.UNVERIFIED),
            "copying": sum(1 for s in films if not s.settled(now, settle)),
            "blocked": sum(1 for f in health.blocked if f in reg.films),
        },
        "conflicts": [{"work_dir": str(w), "films": [str(f) for f in fs]} for w, fs in reg.conflicts.items()],
        "orphans": [{"work_dir": str(w), "since": t} for w, t in sorted(reg.orphans.items())],
        "pending": [
            {"film": str(s.film), "reason": s.pending.trigger, "since": s.pending.since}
            for s in films if s.pending is not None
        ],
        "unreadable": [{"path": p, "reason": r} for p, r in reg.unreadable[:50]],
        "recent_invalidations": list(reg.recent)[:20],
        "blocked": [
            {"film": str(f), **b.to_dict()} for f, b in list(health.blocked.items())[:50] if f in reg.films
        ],
        "counters": dict(reg.counters),
    }


def film_health(health: Health, film: Path) -> dict[str, Any]:
    """What blocks a film, for its detailed status."""
    b = health.get(film)
    return {"blocked": b.text if b else None, "blocked_since": b.since if b else None,
            "problems": [p.to_dict() for p in b.problems] if b else []}


def film_status(state: FilmState, health: Health) -> dict[str, Any]:
    """One film in detail (``cinecutd film``), read from its work dir now."""
    from cinecut.checkpoint import read_checkpoint

    wd = state.wd or WorkDir.for_film(state.film)
    ck = read_checkpoint(wd.path)
    meta = read_cache_metadata(wd.cache_path)
    current = SourceStamp.maybe(state.film)
    cache: dict[str, Any] = {
        "state": str(cache_validity(meta, current, work_dir_exists=True, cache_path=wd.cache_path)),
        "path": str(wd.cache_path),
    }
    if meta is not None:
        cache["metadata"] = {"source_file": meta.source_file, "mtime": meta.mtime, "size": meta.size}
    return {
        "film": str(state.film),
        "work_dir": str(wd.path),
        "work_dir_exists": os.path.isdir(wd.path) and not os.path.islink(wd.path),
        "stamp": current.to_dict() if current else None,
        "cache": cache,
        "checkpoint": ck.status.value,
        "checkpoint_reason": ck.reason,
        "stages_complete": ck.checkpoint.stages_complete if ck.checkpoint else [],
        "subtitles": [str(s) for s in state.subtitles],
        "last_event": {"kind": state.last_event[0], "at": state.last_event[1]} if state.last_event else None,
        "pending": {"reason": state.pending.trigger, "since": state.pending.since} if state.pending else None,
        "locked": is_work_dir_locked(wd.path) if os.path.isdir(wd.path) else False,
        "conflict": state.conflict,
        "refused": state.refused,
        "stale_fixed": state.stale_fixed,
        **film_health(health, state.film),
        "verification": state.verification,
        "salvage": salvage_status(wd, current),
    }


def salvage_status(wd: WorkDir, current: SourceStamp | None) -> dict[str, Any] | None:
    """Descriptions kept across a subtitle change, waiting for the next run to take them."""
    store = read_salvage(wd.path)
    if store is None or not store.usable_for(current):
        return None
    return {"frames": len(store.frames), "of": store.of}


__all__ = ["cache_validity", "film_health", "film_status", "salvage_status", "status"]
