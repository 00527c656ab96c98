"""Named states with one owner each, driven in-process: a root's watch transitions are announced by the
watcher as the rescan's are by the reconciler, and a judgement deferred behind a pipeline's lock keeps
its reason (the trigger it replays) apart from the fact that it waits.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from cinecut.locks import work_dir_lock
from cinecutd.states import RootChanged, RootStatus
from cinecutd.watcher import Watchers
from tests.harness.checks import video_invalidated, warm
from tests.harness.films import make_film_with_work_dir
from tests.harness.inprocess import post, settle
from tests.harness.mutate import new_content


def test_a_watch_announces_each_root_transition_it_owns(root: Path, make_engine: Any) -> None:
    """Started, died and replaced (degraded), gone (missing, the reconciler's), back (pending-watch, then
    watched again): every transition is one ``RootChanged``, whichever owner made it."""
    make_film_with_work_dir(root / "Heat (1995)")
    engine = make_engine()
    seen: list[tuple[Path, RootStatus]] = []
    engine.bus.subscribe(RootChanged, lambda ev: seen.append((ev.root, ev.status)))
    watchers = Watchers(engine)
    try:
        watchers.ensure(engine.config.libraries)
        assert engine.reg.roots[root].state == RootStatus.WATCHING
        watch = watchers._watches[root].observer
        watch.stop()
        watch.join(timeout=5)
        watchers.check()  # its thread is gone: replaced, the root shown degraded, a rescan asked for
        assert engine.reg.roots[root].state == RootStatus.DEGRADED
        assert "watch failed" in engine.reg.roots[root].detail
        settle(engine)
        engine.root_missing(root)
        engine.reconcile("root available")
        watchers.ensure(engine.config.libraries)
    finally:
        watchers.stop_all()
    assert seen == [(root, RootStatus.WATCHING), (root, RootStatus.DEGRADED), (root, RootStatus.MISSING),
                    (root, RootStatus.PENDING_WATCH), (root, RootStatus.WATCHING)]
    assert engine.status()["roots"][0]["state"] == "watching"


def test_a_deferred_judgement_keeps_its_trigger_apart_from_waiting(root: Path, make_engine: Any) -> None:
    """While a pipeline holds the work dir, the film waits (``pending`` set, pre-warm leaves it alone) and
    its reason is the trigger that asked; the status shows both as before; once the lock is gone the
    judgement runs with that very trigger and nothing waits any more."""
    from cinecutd.states import Deferral

    film = make_film_with_work_dir(root / "Heat (1995)")
    engine = make_engine()
    assert warm(film)
    before = time.time()
    with work_dir_lock(film.wd, purpose="pipeline"):
        film.path.write_bytes(new_content(film.path))
        post(engine, "modified", film.path)
        engine.run_once(0)
        state = engine.reg.films[film.path]
        assert isinstance(state.pending, Deferral) and state.pending.trigger == "modified"
        assert before <= state.pending.since <= time.time()
        waiting = engine.status()["pending"]
        assert waiting == [{"film": str(film.path), "reason": "modified", "since": state.pending.since}]
        assert engine.film_status(str(film.path))["pending"] == {"reason": "modified", "since": state.pending.since}
        assert not video_invalidated(film)
    settle(engine)
    assert video_invalidated(film)
    assert engine.reg.films[film.path].pending is None and engine.status()["pending"] == []
    assert engine.reg.recent[0]["trigger"] == "modified"


def test_a_deferred_judgement_that_its_film_can_no_longer_make_waits_no_more(root: Path, make_engine: Any) -> None:
    """A film waits for a pipeline's lock; meanwhile a same-stem twin appears and the pipeline holding the
    lock makes the work dir the twin's. Once the lock is gone the waiting film has no judgement to make
    (the results are not its own): its deferral ends, nothing stays pending for ever, and the twin's
    results are left alone."""
    from cinecut.checkpoint import load_checkpoint, save_checkpoint
    from tests.harness.films import make_film

    film = make_film_with_work_dir(root / "Heat (1995)")
    engine = make_engine()
    assert warm(film)
    with work_dir_lock(film.wd, purpose="pipeline"):
        film.path.write_bytes(new_content(film.path))
        post(engine, "modified", film.path)
        engine.run_once(0)
        assert engine.reg.films[film.path].pending is not None
        twin = make_film(film.path.parent, film.path.stem, ext=".mp4", seed=1, subtitles=(), trailer=None)
        post(engine, "created", twin.path)
        post(engine, "closed", twin.path)
        engine.run_once(0)
        ckpt = load_checkpoint(film.wd.path)
        assert ckpt is not None
        ckpt.source_file = str(twin.path.resolve())
        save_checkpoint(ckpt, film.wd.path)  # the pipeline took the work dir over for the twin
        taken = film.wd.checkpoint_path.read_bytes()
    settle(engine)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and engine.status()["pending"]:
        settle(engine)
    assert engine.status()["pending"] == []
    assert engine.reg.films[film.path].pending is None
    assert film.wd.checkpoint_path.read_bytes() == taken  # the twin's results untouched
