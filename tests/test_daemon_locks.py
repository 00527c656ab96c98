"""A running pipeline's work dir is never edited: the invalidation waits, is shown, and lands on release.

The pipeline is a separate process holding ``cinecut.locks.work_dir_lock`` (a real ``flock``), exactly
what ``cinecut analyze`` and the pre-warm worker hold while they write a work dir.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.checks import video_invalidated, warm, work_state
from tests.harness.films import lock_held, make_film_with_work_dir
from tests.harness.mutate import replace_in_place
from tests.harness.runner import DaemonRunner, Library
from tests.harness.waiting import stays, wait_for

MODES = ["inotify", "poll"]


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[DaemonRunner]:
    with DaemonRunner(tmp_path) as r:
        yield r


def _pending(d) -> list[dict]:
    return d.status()["pending"]


@pytest.mark.parametrize("mode", MODES)
def test_invalidation_waits_for_the_pipeline_and_lands_on_release(runner: DaemonRunner, mode: str) -> None:
    lib = runner.library()
    film = make_film_with_work_dir(lib / "Heat (1995)", "Heat (1995)")
    d = runner.start([Library(lib, watch=mode)])

    with lock_held(film.wd.path, purpose="cinecut analyze"):
        replace_in_place(film.path)
        pending = wait_for(lambda: _pending(d), what="pending invalidation shown")
        assert pending[0]["film"] == str(film.path) and pending[0]["since"] > 0
        detail = d.film_status(film.path)
        assert detail["pending"] is not None and detail["locked"] is True
        # Nothing is touched while the pipeline holds the lock.
        s = work_state(film)
        assert s.cache_file and s.proxy and s.keyframes and s.stages
        assert stays(lambda: work_state(film).cache_file, 0.5)
        released = time.monotonic()

    wait_for(lambda: video_invalidated(film), what="applied once the lock freed")
    assert time.monotonic() - released < 5.0
    assert wait_for(lambda: _pending(d) == [], what="pending cleared")
    st = d.status()
    assert st["counters"]["deferred"] >= 1 and st["counters"].get("errors", 0) == 0
    assert d.film_status(film.path)["pending"] is None


def test_lock_held_at_startup_defers_the_reconcile_fix(runner: DaemonRunner) -> None:
    lib = runner.library()
    film = make_film_with_work_dir(lib / "Heat (1995)", "Heat (1995)")
    replace_in_place(film.path)  # changed while the daemon was down

    with lock_held(film.wd.path):
        d = runner.start([Library(lib)])
        assert [p["film"] for p in _pending(d)] == [str(film.path)]  # known at READY, not applied
        assert work_state(film).cache_file

    wait_for(lambda: video_invalidated(film), what="applied once the lock freed")
    assert _pending(d) == []


def test_a_locked_film_does_not_hold_up_the_others(runner: DaemonRunner) -> None:
    lib = runner.library()
    busy = make_film_with_work_dir(lib / "Heat (1995)", "Heat (1995)")
    free = make_film_with_work_dir(lib / "Ronin (1998)", "Ronin (1998)")
    d = runner.start([Library(lib)])

    with lock_held(busy.wd.path):
        replace_in_place(busy.path)
        wait_for(lambda: _pending(d), what="pending")
        replace_in_place(free.path)
        wait_for(lambda: video_invalidated(free), what="the unlocked film is invalidated at once")
        assert warm(busy) is False and work_state(busy).cache_file
    wait_for(lambda: video_invalidated(busy), what="the locked one follows")
