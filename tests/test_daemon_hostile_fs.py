"""Libraries are messy: none of this may crash the daemon, stall it, or make it touch what is not its own.

Unreadable folders, names that are not UTF-8, symlink loops, a work dir that is a symlink to elsewhere,
two films sharing one work dir, a root that vanishes or appears later, a root added by SIGHUP.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import upstream_reader

from tests.harness.checks import (
    invalidations_of,
    no_stale_results,
    snapshot,
    video_invalidated,
    warm,
    work_state,
)
from tests.harness.films import Film, build_work_dir, make_film, make_film_with_work_dir
from tests.harness.mutate import replace_in_place
from tests.harness.runner import DaemonRunner, Library, chown_tree, render_config, unprivileged_problem
from tests.harness.waiting import stays, wait_for

MODES = ["inotify", "poll"]
ROOT_RETRY_WAIT_S = 15.0  # the daemon re-checks missing roots every 5 s


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[DaemonRunner]:
    with DaemonRunner(tmp_path) as r:
        yield r


def _root_state(d, root: Path) -> str | None:
    for r in d.status()["roots"]:
        if r["path"] == str(root):
            return r["state"]
    return None


# --------------------------------------------------------------------------------------------- permissions


def test_unreadable_folder_is_reported_and_the_rest_still_works() -> None:
    """Root ignores permissions, so as root the daemon runs as ``nobody`` (as the packaged unit does not
    run as root either); as another user it simply runs as that user."""
    as_root = os.geteuid() == 0
    if as_root and (why := unprivileged_problem("nobody")):
        pytest.skip(f"root ignores permissions and the daemon cannot run unprivileged here: {why}")
    with DaemonRunner(public=True) as runner:
        lib = runner.library()
        locked = make_film(lib / "Locked (2000)", "Locked (2000)")
        film = make_film(lib / "Heat (1995)", "Heat (1995)")
        build_work_dir(film)
        if as_root:
            chown_tree(runner.base, "nobody")
        locked.path.parent.chmod(0o000)
        try:
            d = runner.start([Library(lib)], user="nobody" if as_root else None)
            st = d.status()
            assert [u["path"] for u in st["unreadable"]] == [str(locked.path.parent)]
            assert "denied" in st["unreadable"][0]["reason"].lower()
            assert st["films"]["total"] == 1

            replace_in_place(film.path)
            wait_for(lambda: video_invalidated(film), what="the readable film is still watched")

            locked.path.parent.chmod(0o755)
            d.request("rescan")
            st = d.status()
            assert st["unreadable"] == [] and st["films"]["total"] == 2
        finally:
            locked.path.parent.chmod(0o755)


# --------------------------------------------------------------------------------------------- names


def _non_utf8_film(lib: Path) -> Film:
    folder = lib / os.fsdecode(b"Am\xe9lie (2001)")
    return make_film(folder, os.fsdecode(b"Le Fabuleux Destin d'Am\xe9lie"))


@pytest.mark.parametrize("mode", MODES)
def test_non_utf8_names_are_watched_and_reported(runner: DaemonRunner, mode: str) -> None:
    lib = runner.library()
    odd = _non_utf8_film(lib)
    film = make_film_with_work_dir(lib / "Heat (1995)", "Heat (1995)")
    d = runner.start([Library(lib, watch=mode)])
    st = d.status()
    assert st["films"]["total"] == 2
    detail = d.film_status(odd.path)  # the client sends the surrogate-escaped path as JSON
    assert detail["film"] == str(odd.path) and detail["work_dir_exists"] is False

    replace_in_place(odd.path)
    (lib / os.fsdecode(b"Caf\xe9 (1999).mkv")).write_bytes(b"new film")
    wait_for(lambda: d.status()["films"]["total"] == 3, what="the new non-UTF-8 film found")
    replace_in_place(film.path)
    wait_for(lambda: video_invalidated(film), what="events keep flowing")
    assert d.status()["counters"].get("errors", 0) == 0


def test_non_utf8_film_with_a_work_dir_is_invalidated(runner: DaemonRunner) -> None:
    """Upstream can run its early stages on such a film (its checkpoint is written with JSON escapes);
    the daemon must start, and a replacement must reset those stages like any other."""
    lib = runner.library()
    odd = _non_utf8_film(lib)
    wd = odd.wd.path
    wd.mkdir()
    (wd / odd.wd.proxy_name).write_bytes(b"proxy")
    upstream_reader.save_checkpoint(
        upstream_reader.PipelineCheckpoint(source_file=str(odd.path), vibe="drama", stages_complete=["proxy"],
                                           proxy_path=str(wd / odd.wd.proxy_name)),
        wd,
    )
    os.utime(wd / odd.wd.proxy_name, (os.stat(odd.path).st_mtime + 1,) * 2)
    d = runner.start([Library(lib)])
    # Started, and the film is known; a first look writes nothing (no evidence to certify it).
    assert d.status()["films"]["total"] == 1
    assert d.film_status(odd.path)["film"] == str(odd.path)

    replace_in_place(odd.path)
    wait_for(lambda: work_state(odd).stages == () and not work_state(odd).proxy, what="reset")
    assert no_stale_results(odd)
    assert d.status()["counters"].get("errors", 0) == 0


# --------------------------------------------------------------------------------------------- symlinks


@pytest.mark.parametrize("mode", MODES)
def test_symlink_loops_neither_trap_nor_stall_the_daemon(runner: DaemonRunner, mode: str) -> None:
    lib = runner.library()
    film = make_film_with_work_dir(lib / "Heat (1995)", "Heat (1995)")
    os.symlink(lib, lib / "loop")
    os.symlink("..", lib / "Heat (1995)" / "up")
    os.symlink("self", lib / "self")  # a link to itself: ELOOP on every stat
    (lib / "Heat (1995)" / "extras").mkdir()
    os.symlink("../../Heat (1995)", lib / "Heat (1995)" / "extras" / "back")
    d = runner.start([Library(lib, watch=mode)])
    assert d.status()["films"]["total"] == 1

    replace_in_place(film.path)
    wait_for(lambda: video_invalidated(film), what="invalidated despite the loops")
    assert d.status()["films"]["total"] == 1  # no film counted twice through a link


@pytest.mark.parametrize("mode", MODES)
def test_symlinked_work_dir_is_refused_and_its_target_untouched(runner: DaemonRunner, mode: str) -> None:
    lib = runner.library()
    film = make_film(lib / "Heat (1995)", "Heat (1995)")
    # Build a complete work dir elsewhere, then link it in place of the real one.
    outside = runner.base / "outside"
    decoy = make_film_with_work_dir(outside, "Heat (1995)", subtitles=(), trailer=None)
    film.wd.path.symlink_to(decoy.wd.path)
    target = snapshot(p for p in decoy.wd.path.rglob("*") if p.is_file())
    d = runner.start([Library(lib, watch=mode)])

    replace_in_place(film.path)
    wait_for(lambda: d.film_status(film.path)["refused"], what="refusal reported")
    assert stays(lambda: snapshot(target) == target, 0.5)
    assert film.wd.path.is_symlink() and warm(decoy)
    assert d.film_status(film.path)["work_dir_exists"] is False


# --------------------------------------------------------------------------------------------- conflicts


@pytest.mark.parametrize("mode", MODES)
def test_same_stem_conflict_is_reported_and_never_flaps(runner: DaemonRunner, mode: str) -> None:
    """``Heat.mkv`` and ``Heat.mp4`` share ``Heat_cinecut_work``; the checkpoint names its owner."""
    lib = runner.library()
    owner = make_film_with_work_dir(lib / "Heat", "Heat", subtitles=())
    other = make_film(lib / "Heat", "Heat", ".mp4", seed=3, subtitles=(), trailer=None)
    d = runner.start([Library(lib, watch=mode)])
    st = d.status()
    assert st["films"]["conflicts"] == 1
    assert sorted(st["conflicts"][0]["films"]) == sorted([str(owner.path), str(other.path)])
    assert warm(owner)

    replace_in_place(other.path)  # not the owner: its changes say nothing about the results
    d.request("rescan")
    assert stays(lambda: warm(owner), 0.6)

    replace_in_place(owner.path)
    wait_for(lambda: video_invalidated(owner), what="owner's replacement invalidates")
    for _ in range(2):
        d.request("rescan")
    replace_in_place(other.path, b"again" * 100)
    assert stays(lambda: video_invalidated(owner), 0.6)
    assert len(invalidations_of(d, owner)) == 1
    assert invalidations_of(d, other) == []


def test_same_stem_twin_appearing_live_does_not_wipe_the_owner(runner: DaemonRunner) -> None:
    lib = runner.library()
    owner = make_film_with_work_dir(lib / "Heat", "Heat", subtitles=())
    d = runner.start([Library(lib)])

    other = make_film(lib / "Heat", "Heat", ".mp4", seed=3, subtitles=(), trailer=None)
    wait_for(lambda: d.status()["films"]["total"] == 2, what="the twin is seen")
    assert stays(lambda: warm(owner), 0.6), work_state(owner)
    st = wait_for(lambda: (s := d.status())["films"]["conflicts"] == 1 and s, what="conflict reported")
    assert str(other.path) in st["conflicts"][0]["films"]


# --------------------------------------------------------------------------------------------- roots


def test_root_that_vanishes_and_comes_back(runner: DaemonRunner) -> None:
    lib = runner.library()
    film = make_film_with_work_dir(lib / "Heat (1995)", "Heat (1995)")
    d = runner.start([Library(lib)])
    away = lib.with_name("films-unmounted")

    os.rename(lib, away)
    wait_for(lambda: _root_state(d, lib) == "missing", ROOT_RETRY_WAIT_S, what="root reported missing")
    st = d.status()
    assert st["films"]["total"] == 0 and st["films"]["orphaned"] == 0  # an unmount deletes nothing

    os.rename(away, lib)
    wait_for(lambda: _root_state(d, lib) == "watching", ROOT_RETRY_WAIT_S, what="root watched again")
    assert d.status()["films"]["total"] == 1 and warm(film)
    replace_in_place(film.path)
    wait_for(lambda: video_invalidated(film), what="the new watch works")


def test_root_missing_at_startup_appears_later(runner: DaemonRunner) -> None:
    lib = runner.base / "not-yet-mounted"
    d = runner.start([Library(lib, watch="poll")])
    assert _root_state(d, lib) == "missing"

    staged = runner.base / "staged"
    film = make_film_with_work_dir(staged / "Heat (1995)", "Heat (1995)")
    os.rename(staged, lib)
    film = Film(lib / "Heat (1995)" / film.path.name, tuple(lib / "Heat (1995)" / s.name for s in film.subtitles))
    wait_for(lambda: _root_state(d, lib) == "watching", ROOT_RETRY_WAIT_S, what="root picked up")
    assert d.status()["films"]["total"] == 1
    replace_in_place(film.path)
    wait_for(lambda: video_invalidated(film), what="the late root is watched")


@pytest.mark.parametrize("mode", MODES)
def test_root_added_by_sighup(runner: DaemonRunner, mode: str) -> None:
    a, b = runner.library("films"), runner.library("films-4k")
    film = make_film_with_work_dir(b / "Heat (1995)", "Heat (1995)")
    d = runner.start([Library(a, watch=mode)])
    assert d.status()["films"]["total"] == 0

    d.reload(render_config([Library(a, watch=mode), Library(b, watch=mode)], socket=d.socket,
                           settle_seconds=0.3, log_level="info"))
    wait_for(lambda: d.status()["films"]["total"] == 1, what="root added without a restart")
    replace_in_place(film.path)
    wait_for(lambda: video_invalidated(film), what="the added root is watched")

    d.reload(render_config([Library(a, watch=mode)], socket=d.socket, settle_seconds=0.3, log_level="info"))
    wait_for(lambda: len(d.status()["roots"]) == 1, what="root removed without a restart")
    assert d.status()["films"]["total"] == 0 and d.running
