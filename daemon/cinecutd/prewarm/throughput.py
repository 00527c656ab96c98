"""Films warmed per night: the measured speed of the last job and how many nights the queue needs.

The speed is the worker's own frames/s (frames computed over inference time, GPU yields excluded), so
it reflects this machine, this model and the configured ``parallel``. Films differ in length, so the
keyframes per film are the mean of the films pre-warmed since the daemon started.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cinecutd.config import Window


def window_hours(window: Window) -> float:
    """Hours the pre-warm window is open per day (24 for "always")."""
    if window.start is None or window.end is None:
        return 24.0
    today = datetime(2000, 1, 1)
    start = datetime.combine(today, window.start)
    end = datetime.combine(today, window.end)
    hours = (end - start).total_seconds() / 3600
    return hours if hours > 0 else hours + 24


def estimate(
    *, fps: float, frames_per_film: float, films_left: int, hours_per_night: float
) -> dict[str, Any]:
    """Films per night at ``fps`` and the nights ``films_left`` films need (None when not computable)."""
    if fps <= 0 or frames_per_film <= 0 or hours_per_night <= 0:
        return {"films_per_night": None, "nights_needed": None}
    per_night = fps * hours_per_night * 3600 / frames_per_film
    return {
        "films_per_night": round(per_night, 2),
        "nights_needed": math.ceil(films_left / per_night) if films_left else 0,
    }


@dataclass
class Throughput:
    """What the daemon has measured; fed by every pre-warm job that computed frames."""

    last_fps: float | None = None
    last_film: str | None = None
    last_at: float | None = None
    frames: int = 0
    films: int = 0

    def record(self, film: str, fps: float, frames: int, at: float) -> None:
        if fps <= 0 or frames <= 0:
            return
        self.last_fps, self.last_film, self.last_at = fps, film, at
        self.frames += frames
        self.films += 1

    def status(self, *, films_left: int, window: Window) -> dict[str, Any]:
        hours = window_hours(window)
        out: dict[str, Any] = {
            "last_fps": None if self.last_fps is None else round(self.last_fps, 3),
            "last_film": self.last_film,
            "last_at": self.last_at,
            "frames_per_film": round(self.frames / self.films) if self.films else None,
            "films_left": films_left,
            "window_hours": round(hours, 2),
        }
        if self.last_fps is None or not self.films:
            return out | {"films_per_night": None, "nights_needed": None}
        return out | estimate(
            fps=self.last_fps, frames_per_film=self.frames / self.films, films_left=films_left,
            hours_per_night=hours,
        )  # fmt: skip
