"""Same-stem twins: only the owner's own rename moves the shared work dir.

``Heat (1995).mkv`` owns ``Heat (1995)_cinecut_work`` (its checkpoint and cache name it); its twin
``Heat (1995).mp4`` maps to the same work dir by name only. Whatever the twin does (renamed in place,
moved to another folder or root, renamed while the daemon is down or while a pipeline holds the owner's
lock, moved together with the owner's folder), the owner keeps its work dir, untouched and warm, the twin
registers under its new name with no results of its own, and the conflict state settles once, without
flapping. Each case runs a real ``cinecutd`` with real inotify.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.checks import snapshot, warm
from tests.harness.films import Film, lock_held, make_film, make_film_with_work_dir
from tests.harness.runner import DaemonRunner, Library
from tests.harness.waiting import stays, wait_for


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[DaemonRunner]:
    with DaemonRunner(tmp_path) as r:
        yield r


def _twins(folder: Path) -> tuple[Film, Film]:
    """The owner (with a finished work dir) and a same-stem twin that arrived later."""
    owner = make_film_with_work_dir(folder, "Heat (1995)", subtitles=(".en.srt",))
    twin = make_film(folder, "Heat (1995)", ext=".mp4", seed=3, size=80 * 1024, subtitles=(), trailer=None)
    return owner, twin


def _work_files(film: Film) -> dict[Path, bytes | None]:
    """Every file of the owner's work dir except the lock file (holder information may change)."""
    return snapshot(p for p in sorted(film.wd.path.rglob("*")) if p.is_file() and p.name != "cinecut.lock")


def _moved_under(film: Film, folder: Path) -> Film:
    return Film(folder / film.path.name, tuple(folder / s.name for s in film.subtitles),
                folder / film.trailer.name if film.trailer else None)


def _registered(d: object, film: Path) -> bool:
    return d.film_status(film)["film"] == str(film)  # type: ignore[attr-defined]


def _conflicts(d: object) -> int:
    return int(d.status()["films"]["conflicts"])  # type: ignore[attr-defined]


WHERE = ["rename", "other_folder", "other_root"]


@pytest.mark.parametrize("where", WHERE)
def test_twin_moved_away_leaves_the_owners_work_dir(runner: DaemonRunner, where: str) -> None:
    lib, other_root = runner.library("films"), runner.library("films-4k")
    owner, twin = _twins(lib / "Heat (1995)")
    before = _work_files(owner)
    d = runner.start([Library(lib), Library(other_root)])
    assert _conflicts(d) == 1

    if where == "rename":
        dest = twin.path.with_name("Other (2000).mp4")
    else:
        folder = (lib if where == "other_folder" else other_root) / "Other (2000)"
        folder.mkdir()
        dest = folder / "Other (2000).mp4"
    os.rename(twin.path, dest)

    wait_for(lambda: _registered(d, dest) and _conflicts(d) == 0, what="the twin registered under its new name")
    assert stays(lambda: warm(owner) and _conflicts(d) == 0, 1.0), "the owner's results or the conflict moved"
    assert _work_files(owner) == before
    assert not os.path.lexists(Film(dest).wd.path)
    st = d.status()
    assert st["counters"].get("invalidations", 0) == 0 and st["counters"].get("migrations", 0) == 0
    assert not d.film_status(owner.path)["conflict"]
    d.request("rescan", timeout=60)
    assert warm(owner) and _work_files(owner) == before and _conflicts(d) == 0


def test_twin_renamed_while_the_daemon_was_down(runner: DaemonRunner) -> None:
    lib = runner.library("films")
    owner, twin = _twins(lib / "Heat (1995)")
    before = _work_files(owner)
    d = runner.start([Library(lib)])
    rc, _ = d.stop()
    assert rc == 0
    dest = twin.path.with_name("Other (2000).mp4")
    os.rename(twin.path, dest)
    d = runner.daemon(d.config).start()
    assert warm(owner) and _work_files(owner) == before
    assert not os.path.lexists(Film(dest).wd.path) and _conflicts(d) == 0
    assert d.counter("migrations") == 0 and d.counter("invalidations") == 0


def test_twin_renamed_while_a_pipeline_holds_the_owners_lock(runner: DaemonRunner) -> None:
    """A move deferred behind the lock is decided by ownership too, when the lock is released."""
    lib = runner.library("films")
    owner, twin = _twins(lib / "Heat (1995)")
    before = _work_files(owner)
    d = runner.start([Library(lib)])
    dest = twin.path.with_name("Other (2000).mp4")
    with lock_held(owner.wd.path):
        os.rename(twin.path, dest)
        wait_for(lambda: _registered(d, dest), what="the renamed twin registered")
    assert stays(lambda: warm(owner) and not d.status()["pending"], 1.0)
    assert _work_files(owner) == before and not os.path.lexists(Film(dest).wd.path)
    assert _conflicts(d) == 0 and d.counter("migrations") == 0 and d.counter("invalidations") == 0


def test_owner_renamed_takes_its_work_dir_and_the_twin_stays_cold(runner: DaemonRunner) -> None:
    lib = runner.library("films")
    owner, twin = _twins(lib / "Heat (1995)")
    d = runner.start([Library(lib)])
    new = Film(owner.path.with_name("Heat (1995) Remux.mkv"))
    os.rename(owner.path, new.path)
    os.rename(owner.subtitles[0], new.path.with_name("Heat (1995) Remux.en.srt"))
    new = Film(new.path, (new.path.with_name("Heat (1995) Remux.en.srt"),))
    wait_for(lambda: warm(new) and _conflicts(d) == 0, what="the owner's results followed it")
    assert not os.path.lexists(owner.wd.path)  # the twin gets no work dir of its own
    assert stays(lambda: warm(new) and _conflicts(d) == 0 and not os.path.lexists(twin.wd.path), 1.0)
    assert d.counter("invalidations") == 0
    assert not d.film_status(twin.path)["conflict"]


@pytest.mark.parametrize("across_roots", [False, True], ids=["same_root", "other_root"])
def test_folder_with_twins_moved_keeps_the_owner(runner: DaemonRunner, across_roots: bool) -> None:
    """The folder moves with both twins and the work dir: the stored paths follow the owner, not the twin,
    whichever of the two the daemon handles first (across roots, the new folder is listed in any order)."""
    lib, other_root = runner.library("films"), runner.library("films-4k")
    owner, twin = _twins(lib / "Heat (1995)")
    d = runner.start([Library(lib), Library(other_root)])
    folder = (other_root if across_roots else lib) / "Heat (1995) {imdb-tt0113277}"
    os.rename(owner.path.parent, folder)
    new_owner, new_twin = _moved_under(owner, folder), _moved_under(twin, folder)
    wait_for(lambda: warm(new_owner) and _registered(d, new_twin.path), what="paths rewritten for the owner")
    # Across roots, two watches report the two halves of the move in no set order: once both are handled
    # (the old root's deletions included), the state must hold still.
    d.sync()
    assert stays(lambda: warm(new_owner) and _conflicts(d) == 1, 1.0)
    assert d.film_status(new_owner.path)["conflict"] and d.counter("invalidations") == 0
    d.request("rescan", timeout=60)
    assert warm(new_owner) and _conflicts(d) == 1
