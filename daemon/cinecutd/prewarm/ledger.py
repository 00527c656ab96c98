"""What became of each pre-warm job, local or remote: failures, the last outcome per film, attempts,
and the running totals that status and the metrics show.

One owner for both kinds of job, so a job a remote worker ran counts exactly as a local one does (its
outcome, the time of the last success, its frames), and each table is bounded in one place: the daemon
runs for months over a library whose films come and go.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import structlog

from cinecut.stamp import SourceStamp
from cinecutd.prewarm import jobqueue
from cinecutd.prewarm.jobqueue import Failure
from cinecutd.prewarm.throughput import Throughput
from cinecutd.registry import FilmState

log = structlog.get_logger("cinecutd")

MAX_FAILURES: Final = 1000
MAX_HISTORY: Final = 1000


def subtitle_stamps(state: FilmState) -> tuple[tuple[str, SourceStamp | None], ...]:
    """The film's subtitle files and their stamps now: a failure is retried once these differ."""
    return tuple((str(p), SourceStamp.maybe(p)) for p in state.subtitles)


class Ledger:
    """Outcomes of pre-warm jobs, kept for status, ``cinecutd prewarm --retry`` and the metrics."""

    def __init__(self) -> None:
        self._failures: OrderedDict[Path, Failure] = OrderedDict()
        self._history: OrderedDict[Path, dict[str, Any]] = OrderedDict()
        self._attempts: dict[Path, int] = {}
        self._streak = 0  # failures in a row (a success or a ``--retry`` ends it)
        # Cumulative since the daemon started.
        self.completed = 0
        self.frames_described = 0
        self.outcomes: Counter[str] = Counter()
        self.gpu_yields: Counter[str] = Counter()
        self.last_success: float | None = None
        self.throughput = Throughput()

    # ------------------------------------------------------------------------------ attempts
    def attempt(self, film: Path) -> int:
        """A job for ``film`` starts (or is queued remotely): its attempt number."""
        self._attempts[film] = self._attempts.get(film, 0) + 1
        return self._attempts[film]

    def attempts(self, film: Path) -> int:
        return self._attempts.get(film, 0)

    def forget_gone(self, films: Mapping[Path, FilmState]) -> None:
        """Attempts of films the registry no longer has (their outcome and failure stay, bounded)."""
        for film in [f for f in self._attempts if f not in films]:
            del self._attempts[film]

    # ------------------------------------------------------------------------------ failures
    def failure(self, film: Path) -> Failure | None:
        return self._failures.get(film)

    def failures(self) -> list[dict[str, object]]:
        """Newest first, as status lists them."""
        return [f.to_dict(p) for p, f in reversed(self._failures.items())]

    def fail(self, film: Path, failure: Failure, *, in_a_row: bool = True) -> int:
        """Record a failure; returns how many jobs failed in a row (``in_a_row=False``: a failure that says
        nothing about this host's setup, e.g. one a remote worker met)."""
        self._failures[film] = failure
        self._failures.move_to_end(film)
        while len(self._failures) > MAX_FAILURES:
            self._failures.popitem(last=False)
        if in_a_row:
            self._streak += 1
        return self._streak

    def forgive(self, film: Path, reason: str) -> bool:
        """Forget ``film``'s failure so it is tried again; False if it had none."""
        if self._failures.pop(film, None) is None:
            return False
        log.info("prewarm_retry", film=str(film), reason=reason)
        return True

    def forgive_changed(self, state: FilmState) -> None:
        """The engine saw the film change: a new video or other subtitles earn a failed film a new try
        (subtitle stamps are compared too: an edit in place changes no path)."""
        failure = self._failures.get(state.film)
        if failure is not None and (failure.stamp != state.stamp or failure.subtitles != subtitle_stamps(state)):
            self.forgive(state.film, "the film or its subtitles changed")

    def forgive_outdated(self, films: Mapping[Path, FilmState]) -> None:
        """Failures whose source changed without a hook call (a rescan found it): no syscalls."""
        for film, failure in list(self._failures.items()):
            state = films.get(film)
            if state is not None and jobqueue.failure_outdated(failure, state):
                self.forgive(film, "the film or its subtitles changed")

    def end_streak(self) -> None:
        self._streak = 0

    # ------------------------------------------------------------------------------ outcomes
    def succeeded(self, film: Path, at: float) -> None:
        """A job left a valid cache."""
        self.completed += 1
        self.last_success = at
        self._streak = 0
        self._failures.pop(film, None)

    def measured(self, film: Path, fps: float, frames: int, at: float) -> None:
        """A finished job's speed, for the estimate of the nights the queue needs."""
        self.throughput.record(str(film), fps, frames, at)

    def record(self, film: Path, record: dict[str, Any]) -> None:
        """A job ended: its record is ``film``'s last outcome, and its outcome is counted."""
        self.outcomes[str(record["outcome"])] += 1
        self._history[film] = record
        self._history.move_to_end(film)
        while len(self._history) > MAX_HISTORY:
            self._history.popitem(last=False)

    def last(self, film: Path) -> dict[str, Any] | None:
        return self._history.get(film)

    def count_frames(self, n: int) -> None:
        """Keyframes the model described (not salvaged, not cache hits)."""
        self.frames_described += max(0, n)

    def count_yield(self, reason: str) -> None:
        self.gpu_yields[reason] += 1
