"""Progress of an analysis: one event vocabulary for the CLI's display and the worker's JSON lines.

The pipeline reports what it does through a callback instead of printing, so the interactive CLI can
draw stage lines and a progress bar while the daemon's worker turns the same events into JSON lines.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass


class EventKind(enum.StrEnum):
    STAGE = "stage"  # a stage starts (stage=proxy|subtitles|keyframes|inference)
    STAGE_DONE = "stage_done"  # a stage finished; skipped=True when the checkpoint already had it
    WARNING = "warning"  # something the user should know (no subtitles, ...)
    INVALIDATED = "invalidated"  # revalidation reset stages (message: why)
    WAITING_LOCK = "waiting_lock"  # another pipeline holds the work dir (message: who)
    WAITING_GPU = "waiting_gpu"  # another run holds the GPU (message: who)
    MODEL_LOADING = "model_loading"
    MODEL_LOADED = "model_loaded"
    CACHE_HIT = "cache_hit"  # count SceneDescriptions served from path
    FRAME = "frame"  # one more frame described: done/total, computed this run, fps
    YIELDED = "yielded"  # the GPU was handed to an interactive run
    RESUMED = "resumed"  # the GPU is ours again
    CACHE_SAVED = "cache_saved"  # count results written to path
    SALVAGED = "salvaged"  # done of total frames of the plan come from the salvage store (message says so)


@dataclass(frozen=True, slots=True)
class ProgressEvent:
    """One thing that happened; fields not relevant to ``kind`` keep their defaults."""

    kind: EventKind
    stage: str | None = None
    done: int = 0
    total: int = 0
    computed: int = 0
    fps: float = 0.0
    eta_s: float | None = None
    message: str = ""
    path: str | None = None
    skipped: bool = False
    reason: str | None = None  # YIELDED / WAITING_GPU: why ("interactive", "processes", "transcodes", "vram")


ProgressCallback = Callable[[ProgressEvent], None]


def ignore_progress(_event: ProgressEvent) -> None:
    """The default callback."""


class RateMeter:
    """Frames per second of the frames computed in this run, not counting time spent yielded.

    Resumed frames are excluded (they cost nothing now), so the ETA reflects the real remaining work.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._busy = 0.0
        self._since: float | None = None
        self.frames = 0

    def start(self) -> None:
        if self._since is None:
            self._since = self._clock()

    def pause(self) -> None:
        if self._since is not None:
            self._busy += self._clock() - self._since
            self._since = None

    def tick(self, n: int = 1) -> None:
        self.frames += n

    @property
    def elapsed(self) -> float:
        running = self._clock() - self._since if self._since is not None else 0.0
        return self._busy + running

    @property
    def fps(self) -> float:
        elapsed = self.elapsed
        return self.frames / elapsed if elapsed > 0 and self.frames else 0.0

    def eta(self, remaining: int) -> float | None:
        """Seconds left for ``remaining`` frames at the current rate; None before the first frame."""
        fps = self.fps
        return remaining / fps if fps > 0 else None


class Throttle:
    """True at most once per ``interval`` seconds (the first call always passes)."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._last: float | None = None

    def ready(self) -> bool:
        now = self._clock()
        if self._last is None or now - self._last >= self.interval:
            self._last = now
            return True
        return False


def format_duration(seconds: float | None) -> str:
    """``1:02:03`` / ``2:03``; ``?`` when unknown."""
    if seconds is None:
        return "?"
    s = round(seconds)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
