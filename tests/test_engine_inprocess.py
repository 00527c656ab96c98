"""The daemon's engine driven in-process: real files in a temporary library, synthetic watcher events.

No daemon process, no watcher thread, no sleeps: each test posts the events inotify would have delivered
(``Engine.post_event``), steps the loop until it has nothing due (``run_once(0)``), and asserts on the
registry and on the real work dirs. The process-level tests (test_daemon_*.py) prove the same behaviour
end to end; these pin down the engine's decisions exactly and fast.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from cinecut.workdir import WorkDir
from tests.harness.checks import video_invalidated, warm, work_state
from tests.harness.films import Film, make_film_with_work_dir
from tests.harness.inprocess import post, settle
from tests.harness.mutate import new_content


def test_a_replaced_film_is_invalidated(root: Path, make_engine: Any) -> None:
    film = make_film_with_work_dir(root / "Heat (1995)")
    engine = make_engine()
    assert film.path in engine.reg.films and warm(film)
    film.path.write_bytes(new_content(film.path))
    post(engine, "modified", film.path)
    post(engine, "closed", film.path)
    settle(engine)
    assert video_invalidated(film)
    assert engine.reg.counters["invalidations"] >= 1


def test_an_event_for_an_unchanged_film_changes_nothing(root: Path, make_engine: Any) -> None:
    film = make_film_with_work_dir(root / "Heat (1995)")
    engine = make_engine()
    post(engine, "modified", film.path)  # a metadata-only change (an indexer's xattr, an atime)
    settle(engine)
    assert warm(film)
    assert engine.reg.counters["invalidations"] == 0


def test_a_rename_carries_the_results(root: Path, make_engine: Any) -> None:
    film = make_film_with_work_dir(root / "Heat (1995)")
    engine = make_engine()
    new = film.path.with_name("Heat (1995) Remux.mkv")
    os.rename(film.path, new)
    post(engine, "moved", film.path, new)
    subs = []
    for sub in film.subtitles:  # Radarr renames the sidecars after the film
        dest = sub.with_name(sub.name.replace("Heat (1995)", "Heat (1995) Remux"))
        os.rename(sub, dest)
        post(engine, "moved", sub, dest)
        subs.append(dest)
    settle(engine)
    assert new in engine.reg.films and film.path not in engine.reg.films
    moved = Film(new, tuple(subs), film.trailer)
    state = work_state(moved)
    assert state.cache_valid and state.keyframes > 0 and warm(moved), state
    assert not WorkDir.for_film(film.path).path.exists()


def test_a_deleted_film_leaves_its_results_as_an_orphan(root: Path, make_engine: Any) -> None:
    film = make_film_with_work_dir(root / "Heat (1995)")
    engine = make_engine()
    wd = WorkDir.for_film(film.path).path
    for p in [film.path, *film.subtitles]:
        os.unlink(p)
        post(engine, "deleted", p)
    settle(engine)
    assert film.path not in engine.reg.films
    assert wd.is_dir() and any(wd.iterdir())  # kept for gc after its grace period, never deleted at once


def test_same_stem_twins_are_a_conflict_that_does_not_flap(root: Path, make_engine: Any) -> None:
    film = make_film_with_work_dir(root / "Heat (1995)")
    twin = film.path.with_suffix(".mp4")
    twin.write_bytes(new_content(film.path, seed=7))
    engine = make_engine()

    def decision() -> list[tuple[object, ...]]:
        keys = ("conflict", "pending", "blocked", "refused", "checkpoint", "stages_complete")
        return [tuple(str(engine.film_status(str(f))[k]) for k in keys) for f in (film.path, twin)]

    first = decision()
    assert engine.film_status(str(twin))["conflict"] is True
    for _ in range(5):  # the same twin reported again and again decides the same thing every time
        post(engine, "modified", twin)
        post(engine, "closed", twin)
        settle(engine)
        assert decision() == first
    assert warm(film)  # neither twin's events destroy results that may belong to the other
    assert engine.reg.counters["invalidations"] == 0


@pytest.mark.parametrize("at", [0.5, 0.95])
def test_events_during_a_rescan_are_not_lost(root: Path, make_engine: Any, monkeypatch: pytest.MonkeyPatch,
                                             at: float) -> None:
    """Changes reported while a rescan is under way (its slices interleave with queued events): half-way
    (listed, not yet judged) and near its end (already judged: only the event can catch the change)."""
    films = [make_film_with_work_dir(root / f"Film {i} (2001)", f"Film {i} (2001)") for i in range(12)]
    engine = make_engine()
    monkeypatch.setattr("cinecutd.reconciler.SLICE_S", 0.0)  # one step of the rescan per loop turn
    engine.request_reconcile("count")
    steps = 0
    while engine.rescanning:
        engine.run_once(0)
        steps += 1
    assert steps > 10  # the rescan really runs in many slices

    engine.request_reconcile("test")
    for _ in range(int(steps * at)):
        engine.run_once(0)
    assert engine.rescanning
    changed = [films[0], films[-1]]
    for f in changed:
        f.path.write_bytes(new_content(f.path))
        post(engine, "modified", f.path)
        post(engine, "closed", f.path)
    settle(engine)
    assert not engine.rescanning
    assert all(video_invalidated(f) for f in changed)
    assert all(warm(f) for f in films if f not in changed)


def test_a_stop_requested_during_a_storm_returns_before_the_storm_is_handled(root: Path, make_engine: Any) -> None:
    """SIGTERM while thousands of events are queued (a symlink-swapping loop, a big copy): the loop asks
    the stop request before each further item, so the daemon stops within systemd's patience instead of
    after the storm; the next start's rescan rebuilds whatever the dropped events would have told."""
    make_film_with_work_dir(root / "Heat (1995)")
    engine = make_engine()
    storm = 5_000
    for i in range(storm):
        post(engine, "created", root / f"Storm {i} (2020).mkv")
    engine.run_once(0, interrupted=lambda: True)
    assert engine.queue.qsize() == storm - 1  # the first item only: the stop was asked before the next
    engine.run_once(0, interrupted=lambda: False)
    assert engine.queue.empty()  # not interrupted: the storm is drained in one go, as before
