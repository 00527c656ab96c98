"""Library trees of any shape: chains 1,000 folders deep, films 40 levels down, names that look like work
dirs, and a watch thread that dies. A real ``cinecutd`` process, real inotify and polling.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cinecut.workdir import in_work_dir, is_work_dir_name
from cinecutd import inotify_pruned
from cinecutd.treewalk import walk
from tests.harness.checks import invalidations_of, video_invalidated, warm
from tests.harness.films import make_film_with_work_dir
from tests.harness.mutate import mv_over_from_elsewhere, replace_in_place, staging_dir
from tests.harness.runner import DaemonRunner, Library
from tests.harness.waiting import wait_for

MODES = ["inotify", "poll"]
LIVE_S = 10.0  # a live invalidation; periodic rescans are off in these tests


_CHAINS: list[Path] = []


def remove_tree(top: Path) -> None:
    """``shutil.rmtree`` without its recursion (it dies on a 1,000-deep chain, and so would pytest's own
    clean-up of old temp dirs in every later session)."""
    folders = list(walk(str(top)))
    for folder, _, others in reversed(folders):
        for name in others:
            os.unlink(os.path.join(folder, name))
        os.rmdir(folder)


@pytest.fixture(autouse=True)
def _remove_chains() -> Iterator[None]:
    yield
    while _CHAINS:
        top = _CHAINS.pop()
        if top.is_dir():
            remove_tree(top)


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[DaemonRunner]:
    with DaemonRunner(tmp_path) as r:
        yield r


def make_chain(top: Path, depth: int, name: str = "d") -> Path:
    """``top/d/d/.../d`` ``depth`` folders deep, made one level at a time (``os.makedirs`` recurses).
    Removed after the test."""
    _CHAINS.append(top)
    path = top
    path.mkdir(parents=True, exist_ok=True)
    for _ in range(depth):
        path = path / name
        os.mkdir(path)
    return path


def watch_failures(d) -> list[dict]:
    return [r for r in d.logs() if r.get("event") in ("watch_failed", "watch_thread_died")]


def root_state(d, root: Path) -> dict:
    return next(r for r in d.status()["roots"] if r["path"] == str(root))


# ------------------------------------------------------------------------------------------ deep chains


@pytest.mark.parametrize("mode", MODES)
def test_a_1000_deep_chain_at_start_is_watched(runner: DaemonRunner, mode: str) -> None:
    lib = runner.library("films")
    make_chain(lib / "Chain", 1000)
    film = make_film_with_work_dir(lib / "Heat (1995)", "Heat (1995)")
    d = runner.start([Library(lib, watch=mode)])
    assert root_state(d, lib)["state"] == "watching"
    replace_in_place(film.path)
    wait_for(lambda: video_invalidated(film), LIVE_S, what="replacement beside a deep chain invalidated live")
    assert watch_failures(d) == []


@pytest.mark.parametrize("mode", MODES)
def test_a_1000_deep_chain_moved_in_while_running_keeps_the_watch(runner: DaemonRunner, mode: str) -> None:
    lib = runner.library("films")
    film = make_film_with_work_dir(lib / "Heat (1995)", "Heat (1995)")
    other = make_film_with_work_dir(lib / "Ronin (1998)", "Ronin (1998)")
    d = runner.start([Library(lib, watch=mode)])
    outside = staging_dir(film.path)
    bottom = make_chain(outside / "Chain", 1000)
    (bottom / "Deep (2001).mkv").write_bytes(b"a film at the bottom" * 100)
    _CHAINS.append(lib / "Chain")
    os.rename(outside / "Chain", lib / "Chain")
    deep = lib.joinpath("Chain", *["d"] * 1000, "Deep (2001).mkv")
    wait_for(lambda: d.film_status(deep)["film"] == str(deep), LIVE_S, what="film at the bottom of the chain seen")
    replace_in_place(film.path)
    wait_for(lambda: video_invalidated(film), LIVE_S, what="later replacement in that root acted on live")
    mv_over_from_elsewhere(other.path)
    wait_for(lambda: video_invalidated(other), LIVE_S, what="and the next one")
    assert root_state(d, lib)["state"] == "watching"
    assert watch_failures(d) == []
    assert d.running


@pytest.mark.skipif(not inotify_pruned.AVAILABLE, reason="needs watchdog's watch groups (watchdog >= 6)")
def test_a_watch_thread_that_dies_is_noticed_reported_and_replaced(
    runner: DaemonRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first inotify event the daemon's reader thread handles raises, as a bug in the watch code would.
    monkeypatch.setenv("CINECUTD_FAULTS", "raise-once:watch.event")
    lib = runner.library("films")
    film = make_film_with_work_dir(lib / "Heat (1995)", "Heat (1995)")
    d = runner.start([Library(lib, watch="inotify")])
    (lib / "notes.txt").write_text("any event")
    state = wait_for(lambda: (s := root_state(d, lib))["state"] == "degraded" and s, LIVE_S,
                     what="root shown as degraded")
    assert "fault injected at watch.event" in state["detail"] and "restarted" in state["detail"], state
    errors = [r for r in d.logs("watch_failed") if r.get("level") == "error"]
    assert errors and "fault injected" in errors[0]["error"], d.log_text()[-3000:]
    # A rescan catches up what the dead watch missed; then the restarted watch acts on changes live.
    wait_for(lambda: d.logs("reconciled")[-1].get("reason") == "watch restarted", LIVE_S, what="catch-up rescan")
    assert root_state(d, lib)["watch"] == "inotify"
    replace_in_place(film.path)
    wait_for(lambda: video_invalidated(film), LIVE_S, what="replacement acted on after the watch died")
    assert invalidations_of(d, film)[0]["trigger"] != "rescan"
    assert d.running


# ------------------------------------------------------------------------------------------ depth


def test_a_film_40_levels_deep_replaced_while_stopped_is_fixed_before_ready(runner: DaemonRunner) -> None:
    lib = runner.library("films")
    folder = make_chain(lib / "Collections", 40, name="level")
    film = make_film_with_work_dir(folder, "Deep Film (2004)")
    shallow = make_film_with_work_dir(lib / "Heat (1995)", "Heat (1995)")
    d = runner.start([Library(lib)])
    assert d.film_status(film.path)["film"] == str(film.path)
    rc, _ = d.stop()
    assert rc == 0
    replace_in_place(film.path)
    runner.daemon(d.config).start()
    assert video_invalidated(film)  # READY means caught up, at any depth
    assert warm(shallow)


# ------------------------------------------------------------------------------------------ names


def test_one_work_dir_rule_for_every_name() -> None:
    assert is_work_dir_name("Heat_cinecut_work") and is_work_dir_name(b"Heat_cinecut_work")
    for name in ("Gym_cinecut_workout", "Best_cinecut_works.mkv", "Stem_cinecut_work.mkv", "_cinecut_work"):
        assert not is_work_dir_name(name) and not is_work_dir_name(name.encode())
    for path in ("/lib/Gym_cinecut_workout/Pump.mkv", "/lib/Best_cinecut_works.mkv", "/lib/Stem_cinecut_work.mkv",
                 "/lib/Stem_cinecut_work.mkv.partial"):
        assert not in_work_dir(path) and not in_work_dir(path.encode())
    assert in_work_dir("/lib/Heat_cinecut_work/keyframes/frame_0000001000.jpg")
    assert in_work_dir(b"/lib/Heat_cinecut_work")
    # Only below the root: a root that happens to sit in a folder named like a work dir is a library.
    assert not in_work_dir("/srv/Old_cinecut_work/films/Heat.mkv", "/srv/Old_cinecut_work/films")
    assert in_work_dir(b"/srv/Old_cinecut_work/films/Heat_cinecut_work/x", b"/srv/Old_cinecut_work/films")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("folder", "stem"),
    [("Gym_cinecut_workout", "Pump"), (".", "Best_cinecut_works"), (".", "Stem_cinecut_work")],
)
def test_names_that_contain_the_work_dir_suffix_are_watched_live(
    runner: DaemonRunner, mode: str, folder: str, stem: str
) -> None:
    lib = runner.library("films")
    film = make_film_with_work_dir(lib / folder, stem)
    d = runner.start([Library(lib, watch=mode)])
    assert d.film_status(film.path)["film"] == str(film.path)
    mv_over_from_elsewhere(film.path)
    wait_for(lambda: video_invalidated(film), LIVE_S, what=f"{film.path.name} invalidated live")
    assert [r for r in d.status()["recent_invalidations"] if r["film"] == str(film.path)]
