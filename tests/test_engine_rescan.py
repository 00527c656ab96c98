"""The engine in-process, driven by the events a watcher would post, against a real library on disk:
rescans that scale linearly in a flat folder and that never hold an invalidation behind them.

A rescan runs as a job in slices between queue items. Here a slice is made as small as it gets (one unit
of work), so the order of events and rescan steps is exact, not a matter of timing.
"""

from __future__ import annotations

import cProfile
import os
import pstats
from pathlib import Path
from typing import Any

import pytest

from cinecut.stamps import read_stamps
from cinecutd import reconciler as reconciler_module
from cinecutd.engine import Engine
from tests.harness.checks import video_invalidated, warm
from tests.harness.films import SRT, Film, build_work_dir, make_film
from tests.harness.inprocess import unstarted_engine
from tests.harness.mutate import new_content


def flat_library(root: Path, n: int, *, work_dirs: bool = False) -> list[Film]:
    """``n`` films side by side in one folder, each with an English subtitle."""
    films = []
    for i in range(n):
        film = make_film(root, f"Film {i:04d} (2001)", trailer=None, size=2048, seed=i)
        if work_dirs:
            build_work_dir(film, frames=2)
        films.append(film)
    return films


def replace_by_rename(film: Path, engine: Engine) -> None:
    """An atomic writer's replacement, and the event the watcher posts for it."""
    tmp = film.with_name(f".{film.name}.tmp")
    tmp.write_bytes(new_content(film, seed=99))
    os.replace(tmp, film)
    engine.post_event("moved", str(tmp), str(film))


def run_rescan(engine: Engine, *, until: Any = None) -> int:
    """Drive the loop until the rescan ends; returns how many loop turns it took."""
    turns = 0
    while engine.rescanning:
        engine.run_once(0)
        turns += 1
        assert turns < 100_000
    return turns


@pytest.fixture
def one_unit_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each loop turn runs one unit of a rescan (a film, a batch of registrations)."""
    monkeypatch.setattr(reconciler_module, "SLICE_S", 0.0)


# ------------------------------------------------------------------------------------------ linear


def _reconcile_cost(tmp_path: Path, n: int) -> tuple[int, int]:
    """(function calls, directory listings) of a startup reconcile of ``n`` films in one folder."""
    root = tmp_path / f"flat{n}"
    flat_library(root, n)
    engine = unstarted_engine(tmp_path, root)
    prof = cProfile.Profile()
    prof.enable()
    summary = engine.reconcile("startup")
    prof.disable()
    assert summary["films"] == n
    assert all(len(s.subtitles) == 1 for s in engine.reg.films.values())
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    calls = sum(nc for (_, nc, _, _, _) in stats.values())
    listings = sum(nc for (file, _, name), (_, nc, _, _, _) in stats.items()
                   if file == "~" and ("scandir" in name or "listdir" in name))
    return calls, listings


def test_a_flat_library_reconciles_in_linear_work(tmp_path: Path) -> None:
    small_calls, small_listings = _reconcile_cost(tmp_path, 100)
    big_calls, big_listings = _reconcile_cost(tmp_path, 400)
    assert big_listings == small_listings, "no film may list its folder again"
    # 4x the films: 4x the work, give or take fixed costs (quadratic sibling scans made it 13x).
    assert big_calls < 4.6 * small_calls, (small_calls, big_calls)


# ------------------------------------------------------------------------------------------ interleaving


def test_a_replacement_during_a_long_rescan_is_acted_on_before_the_rescan_ends(
    tmp_path: Path, one_unit_slices: None
) -> None:
    root = tmp_path / "films"
    films = flat_library(root, 40, work_dirs=True)
    engine = unstarted_engine(tmp_path, root)
    engine.reconcile("startup")
    done: list[dict[str, Any]] = []
    engine.request_reconcile("requested", on_done=done.append)
    for _ in range(3):
        engine.run_once(0)
    assert engine.rescanning and not done
    target = films[-1]
    replace_by_rename(target.path, engine)
    engine.run_once(0)
    assert video_invalidated(target), "the event is handled at the next turn of the loop"
    assert engine.rescanning and not done, "...while the rescan is still running"
    records = [r for r in engine.reg.recent if r["film"] == str(target.path)]
    assert records and records[0]["trigger"] != "rescan", records
    run_rescan(engine)
    assert done and done[0]["films"] == 40
    assert all(warm(f) for f in films if f is not target)


def test_what_changed_during_a_rescan_is_not_judged_on_the_scan_s_stale_findings(
    tmp_path: Path, one_unit_slices: None
) -> None:
    root = tmp_path / "films"
    films = flat_library(root, 12, work_dirs=True)
    engine = unstarted_engine(tmp_path, root)
    engine.reconcile("startup")
    engine.request_reconcile("requested")
    engine.run_once(0)  # the folder is listed: the job knows every film and subtitle there now
    assert engine.rescanning
    gone, subbed = films[3], films[7]
    # A film deleted, a film added, a subtitle added: each reported by its event.
    os.unlink(gone.path)
    engine.post_event("deleted", str(gone.path))
    added = make_film(root, "Arrival (2016)", trailer=None, size=2048, seed=500)
    engine.post_event("created", str(added.path))
    extra_sub = root / f"{subbed.stem}.fr.srt"
    extra_sub.write_text(SRT)
    engine.post_event("created", str(extra_sub))
    run_rescan(engine)
    reg = engine.reg
    assert gone.path not in reg.films, "a film deleted meanwhile is not registered again"
    assert gone.wd.path in reg.orphans, "its work dir is an orphan"
    assert added.path in reg.films, "a film added meanwhile is not declared gone"
    assert extra_sub in reg.films[subbed.path].subtitles
    recorded = read_stamps(subbed.wd.path)
    assert recorded is not None
    names = sorted(os.path.basename(n) for n, _ in recorded.subtitles)
    assert len(names) == 2 and names[1].endswith(".fr.srt"), names  # both subtitles, as judged by the event
