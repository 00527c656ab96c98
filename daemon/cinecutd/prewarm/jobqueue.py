"""Which films wait for a pre-warm, and in what order. Pure functions over the engine's film states.

The registry is the truth; the queue is recomputed from it (cheaply, and only when something changed or
a film's settle time ran out) instead of being kept in step with every event, so a film can never be
lost from or stuck in a queue that disagrees with what the daemon knows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cinecut.inference.cache import CacheState
from cinecut.stamp import SourceStamp
from cinecutd.registry import FilmState


@dataclass(frozen=True, slots=True)
class Request:
    """``cinecutd prewarm FILM [--now]``: ``seq`` keeps requests in the order they were made."""

    seq: int
    now: bool


@dataclass(frozen=True, slots=True)
class Failure:
    """A failed job: not retried until the inputs it failed on change, or ``--retry``."""

    reason: str
    at: float  # wall time
    stamp: SourceStamp | None  # the video's stamp when the job started
    subtitles: tuple[tuple[str, SourceStamp | None], ...]  # the subtitles' paths and stamps then
    log: str | None = None

    def to_dict(self, film: Path) -> dict[str, object]:
        return {"film": str(film), "reason": self.reason, "at": self.at, "log": self.log}


def why_not(
    state: FilmState,
    *,
    now: float,
    settle_seconds: float,
    failure: Failure | None = None,
    skip_until: float | None = None,
) -> str | None:
    """None if the film should be pre-warmed now, else a short reason ("warm", "settling", ...)."""
    if state.stamp is None:
        return "unreadable"
    if state.cache == CacheState.VALID:
        return "warm"
    if state.conflict:
        return "same-stem conflict"
    if state.refused:
        return "work dir refused"
    if state.pending:
        return "waiting for a pipeline's lock"
    if failure is not None and not failure_outdated(failure, state):
        return "failed"
    if not state.settled(now, settle_seconds):
        return "settling"
    if skip_until is not None and now < skip_until:
        return "open for writing"
    return None


def failure_outdated(failure: Failure, state: FilmState) -> bool:
    """The video's stamp or the set of subtitle files differs from when the job failed (no syscalls;
    a subtitle edited in place is seen by the engine's hook, which compares their stamps too)."""
    return failure.stamp != state.stamp or tuple(p for p, _ in failure.subtitles) != tuple(map(str, state.subtitles))


def order(states: Iterable[FilmState], requests: Mapping[Path, Request]) -> list[FilmState]:
    """Run order: ``--now`` requests, then other requests (each in request order), then the rest newest
    first by mtime (the film a user just added is the one they will open next)."""

    def key(s: FilmState) -> tuple[int, float, str]:
        req = requests.get(s.film)
        if req is not None:
            return (0 if req.now else 1, float(req.seq), str(s.film))
        mtime = s.stamp.mtime if s.stamp is not None else 0.0
        return (2, -mtime, str(s.film))

    return sorted(states, key=key)


def next_settle(states: Iterable[FilmState], now: float, settle_seconds: float) -> float | None:
    """The monotonic time the next cold, still-settling film becomes settled (None if none).

    A burst the engine has not closed yet (``settle_due``) ends with a hook call, which recomputes the
    queue anyway, so only the pre-warm's own settle time is timed here.
    """
    best: float | None = None
    for s in states:
        if s.cache == CacheState.VALID or s.stamp is None:
            continue
        due = s.last_change + settle_seconds
        if due <= now:
            continue
        if best is None or due < best:
            best = due
    return best
