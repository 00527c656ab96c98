"""Event storms: a slow copy over a watched film is one invalidation, the rest is coalesced, and the final
revalidation after the burst leaves stamps that match the finished file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.checks import invalidations_of, stamps_current, video_invalidated
from tests.harness.films import Film, make_film_with_work_dir
from tests.harness.mutate import slow_copy
from tests.harness.runner import DaemonRunner, Library
from tests.harness.waiting import stays, wait_for

SETTLE = 0.4
SIZE = 50 << 20  # 800 writes of 64 KiB


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[DaemonRunner]:
    with DaemonRunner(tmp_path) as r:
        yield r


@pytest.mark.parametrize("mode", ["inotify", "poll"])
def test_slow_copy_over_a_film_is_one_invalidation(runner: DaemonRunner, mode: str) -> None:
    lib = runner.library()
    film = make_film_with_work_dir(lib / "Heat (1995)", "Heat (1995)")
    d = runner.start([Library(lib, watch=mode)], settle_seconds=SETTLE)

    writes = slow_copy(film.path, SIZE, pause=0.0005)

    wait_for(lambda: video_invalidated(film) and film.path.stat().st_size == SIZE, what="invalidated")
    # The final revalidation runs once the burst has been quiet for settle_seconds.
    assert stays(lambda: video_invalidated(film), SETTLE + 0.4)
    assert stamps_current(film)
    c = d.status()["counters"]
    assert len(invalidations_of(d, film)) == 1 and c["invalidations"] == 1
    assert c["revalidations"] <= 4, c  # startup + first event + final (+ one retry at most)
    if mode == "inotify":
        # The storm really reached the daemon (the kernel merges unread identical events, so fewer than
        # the 800 writes), and events that found the film still growing were coalesced: one stat each.
        assert c["events"] >= 20 and c["coalesced"] >= 10, c
    assert writes == SIZE // (64 * 1024)
    detail = d.film_status(film.path)
    assert detail["stamp"]["size"] == SIZE and detail["stages_complete"] == []


def test_new_film_copied_in_is_found_and_never_gets_a_work_dir_from_us(runner: DaemonRunner) -> None:
    lib = runner.library()
    d = runner.start([Library(lib)], settle_seconds=SETTLE)
    folder = lib / "Heat (1995)"
    folder.mkdir()
    film = Film(folder / "Heat (1995).mkv")

    slow_copy(film.path, 8 << 20, pause=0.0005)

    wait_for(lambda: d.status()["films"]["total"] == 1, what="film found")
    assert stays(lambda: not film.wd.path.exists(), SETTLE + 0.4)
    detail = d.film_status(film.path)
    assert detail["stamp"]["size"] == 8 << 20 and detail["work_dir_exists"] is False
    assert d.status()["counters"].get("invalidations", 0) == 0
