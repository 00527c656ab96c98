"""The engine's owners driven in-process: one announcement per change, public entries instead of private
ones, timers as callbacks. Real files in a temporary library, synthetic watcher events, no daemon process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cinecutd.config import load_config
from cinecutd.engine import Engine
from cinecutd.registry import FilmState
from tests.harness.checks import video_invalidated, warm
from tests.harness.films import make_film_with_work_dir
from tests.harness.inprocess import post, settle
from tests.harness.mutate import new_content
from tests.harness.runner import Library, render_config


def _announced(engine: Any) -> list[Path]:
    seen: list[Path] = []

    def hook(state: FilmState) -> None:
        seen.append(state.film)

    engine.on_film_changed = hook
    return seen


def test_a_change_is_announced_once(root: Path, make_engine: Any) -> None:
    """A film whose content changed is judged eagerly and again once its burst is quiet: the pre-warm
    scheduler hears of it once, not once per look."""
    film = make_film_with_work_dir(root / "Heat (1995)")
    engine = make_engine()
    seen = _announced(engine)
    film.path.write_bytes(new_content(film.path))
    post(engine, "modified", film.path)
    post(engine, "closed", film.path)
    settle(engine)
    assert video_invalidated(film)
    assert seen == [film.path]


def test_each_of_two_changes_is_announced(root: Path, make_engine: Any) -> None:
    """Once per change, not once ever: a second change after the first settled is announced again."""
    film = make_film_with_work_dir(root / "Heat (1995)")
    engine = make_engine()
    seen = _announced(engine)
    for seed in (3, 4):
        film.path.write_bytes(new_content(film.path, seed=seed))
        post(engine, "closed", film.path)
        settle(engine)
    assert seen == [film.path, film.path]


def test_prewarm_and_service_reach_the_engine_through_public_entries(root: Path, make_engine: Any) -> None:
    """A pre-warm run's end and a root that went missing use public methods: judged and announced like any
    change; the root's films are forgotten and nothing becomes an orphan."""
    film = make_film_with_work_dir(root / "Heat (1995)")
    engine = make_engine()
    seen = _announced(engine)
    film.path.write_bytes(new_content(film.path))  # changed behind the watcher's back
    engine.revalidate(engine.reg.films[film.path], "prewarmed")
    assert video_invalidated(film) and seen == [film.path]
    engine.root_missing(root)
    assert engine.reg.roots[root].state == "missing"
    assert not engine.reg.films and not engine.reg.orphans
    settle(engine)


def test_an_unchanged_film_is_not_announced_again_and_again(root: Path, make_engine: Any) -> None:
    """Events that change nothing (an indexer touching metadata) announce nothing."""
    film = make_film_with_work_dir(root / "Heat (1995)")
    engine = make_engine()
    seen = _announced(engine)
    for _ in range(3):
        post(engine, "modified", film.path)
        settle(engine)
    assert warm(film) and seen == []


def test_rescans_and_root_transitions_are_announced_on_the_bus(root: Path, make_engine: Any) -> None:
    """A rescan's end is one ``Reconciled`` (the pre-warm hook hears of it through the bus), and a root's
    way out and back is one ``RootChanged`` per transition, from their one owner."""
    from cinecutd.states import Reconciled, RootChanged, RootStatus

    make_film_with_work_dir(root / "Heat (1995)")
    engine = make_engine()
    rescans: list[Reconciled] = []
    roots: list[RootChanged] = []
    hooked: list[bool] = []
    engine.bus.subscribe(Reconciled, rescans.append)
    engine.bus.subscribe(RootChanged, roots.append)
    engine.on_reconciled = lambda: hooked.append(True)
    answers: list[dict[str, Any]] = []
    engine.request_reconcile("asked", answers.append)
    settle(engine)
    assert [r.summary["reason"] for r in rescans] == ["asked"] and hooked == [True]
    assert answers and answers[0]["films"] == 1
    engine.root_missing(root)
    engine.reconcile("root available")
    assert [(r.root, r.status) for r in roots] == [(root, RootStatus.MISSING), (root, RootStatus.PENDING_WATCH)]
    assert engine.reg.roots[root].state == RootStatus.PENDING_WATCH
    assert len(rescans) == 2 and len(engine.reg.films) == 1


def test_the_periodic_rescan_catches_what_nobody_reported_once_per_interval(tmp_path: Path, root: Path) -> None:
    """The safety net is a timer like any other: a change no event reported is caught by the periodic
    rescan, and rescans asked for meanwhile push it back instead of stacking periodic rescans up."""
    import time

    from cinecutd.states import Reconciled

    film = make_film_with_work_dir(root / "Heat (1995)")
    cfg = tmp_path / "cinecutd.toml"
    cfg.write_text(render_config([Library(root)], socket=tmp_path / "run" / "d.sock", settle_seconds=0,
                                 rescan_interval=1))
    engine = Engine(load_config(cfg))
    reasons: list[str] = []
    engine.bus.subscribe(Reconciled, lambda ev: reasons.append(ev.summary["reason"]))
    for _ in range(10):
        engine.reconcile("asked")  # each rescan's end sets the next periodic one
    film.path.write_bytes(new_content(film.path))  # behind the watcher's back: no event
    deadline = time.monotonic() + 1.6
    while time.monotonic() < deadline:
        engine.run_once(0.05)
    assert video_invalidated(film)
    assert 1 <= reasons.count("periodic") <= 2, reasons
