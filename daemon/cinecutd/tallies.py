"""Distributions the daemon keeps for its metrics: plain bucket counts, filled on the engine thread.

They live apart from the Prometheus exporter so the engine never imports it: the engine only counts,
and the exporter (``cinecutd.metrics``) reads a copy of these counts from a snapshot taken on the engine
thread. Bounds are in seconds, the base unit Prometheus expects.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

#: From the engine's typical few milliseconds to a change that waited behind a pipeline's lock.
LATENCY_BOUNDS_S: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 10.0, 60.0)
#: A rescan of a handful of films takes milliseconds, of 10,000 films a few seconds, of a slow NAS minutes.
RESCAN_BOUNDS_S: tuple[float, ...] = (0.01, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 1800.0)


@dataclass(slots=True)
class Buckets:
    """A cumulative histogram: counts per upper bound (plus +Inf), the sum and the count."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        value = max(0.0, value)
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def copy(self) -> Buckets:
        return Buckets(self.bounds, list(self.counts), self.total, self.count)

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, count)`` pairs as Prometheus wants them, ``+Inf`` last."""
        out: list[tuple[str, int]] = []
        running = 0
        for bound, n in zip((*map(repr, self.bounds), "+Inf"), self.counts):
            running += n
            out.append((bound, running))
        return out


@dataclass(slots=True)
class Tallies:
    """What the engine measures for the metrics (engine thread only)."""

    invalidation_latency: Buckets = field(default_factory=lambda: Buckets(LATENCY_BOUNDS_S))
    rescan_duration: Buckets = field(default_factory=lambda: Buckets(RESCAN_BOUNDS_S))

    def copy(self) -> Tallies:
        return Tallies(self.invalidation_latency.copy(), self.rescan_duration.copy())
