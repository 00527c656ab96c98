"""Renames that race a film's arrival and a pipeline's run: the results follow the film in every order.

The churn soak found valid results lost when a film arrived, a pipeline started on it at once (under the
film's first name) and the film was renamed while the pipeline ran. The daemon may not have registered
the first name yet (its arrival events are still queued when the rename comes), and the pipeline's
commit mark (our stamps sidecar, written last) is not in the work dir yet, so nothing says the results
are this file's. They must still follow the film once the pipeline commits; before the fix they stayed
behind under the old name, and the next run recomputed them from the very same inputs.

Each case drives a real ``cinecutd`` with real inotify, and a pipeline that holds the real work-dir lock.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cinecut import safefs
from cinecut.locks import work_dir_lock
from cinecut.stamps import current_stamps, write_stamps_at
from tests.harness.checks import warm, work_state
from tests.harness.films import Film, build_work_dir, make_film
from tests.harness.runner import DaemonRunner, Library
from tests.harness.waiting import wait_for

#: How long the pipeline goes on holding the lock after the rename: none (it commits before the daemon
#: sees the rename), a little, and long enough that the daemon surely handles the rename while it runs.
HOLDS = (0.0, 0.02, 0.3)


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[DaemonRunner]:
    with DaemonRunner(tmp_path) as r:
        yield r


def _renamed(film: Film, new_stem: str) -> Film:
    folder = film.path.parent
    subs = tuple(folder / (new_stem + s.name[len(film.stem):]) for s in film.subtitles)
    return Film(folder / f"{new_stem}{film.path.suffix}", subs)


def _rename(film: Film, new_stem: str) -> Film:
    """Radarr's rename: the film, then its subtitles, one by one."""
    new = _renamed(film, new_stem)
    for src, dest in zip([film.path, *film.subtitles], [new.path, *new.subtitles], strict=True):
        os.rename(src, dest)
    return new


def _pipeline_renamed_midway(film: Film, new_stems: list[str], hold: float) -> Film:
    """A pipeline run on ``film`` under its current name, during which the film is renamed (once per stem
    in ``new_stems``); the run commits (stamps sidecar, written last) after ``hold`` seconds. Returns the
    film as it is named at the end."""
    wd = film.wd
    wd.path.mkdir()
    with safefs.work_dir_fd(wd.path) as fd:
        lock = work_dir_lock(wd, purpose="test pipeline", dir_fd=fd)
        lock.acquire(5.0)  # the daemon may be looking at the new work dir for a moment
        try:
            stamps = current_stamps(film.path, film.subtitles)  # the inputs, stamped when the run starts
            build_work_dir(film, record_stamps=False)  # the results, under the name the run started on
            now = film
            for stem in new_stems:
                now = _rename(now, stem)
                time.sleep(hold / len(new_stems))
            write_stamps_at(fd, stamps)
        finally:
            lock.release()
    return now


def _followed(old: Film, new: Film) -> bool:
    s = work_state(new)
    return not os.path.lexists(old.wd.path) and warm(new) and s.checkpoint_source == str(new.path)


def _assert_all_followed(d: object, pairs: list[tuple[Film, Film]]) -> None:
    def done() -> bool:
        return all(_followed(old, new) for old, new in pairs)

    try:
        wait_for(done, 15, what="every film's results to follow its renames")
    except AssertionError:
        lost = [f"{new.path.name}: results in {sorted(p.name for p in new.path.parent.iterdir())}"
                for old, new in pairs if not _followed(old, new)]
        raise AssertionError(f"results left behind: {lost}\n{d.log_text()[-4000:]}") from None  # type: ignore[attr-defined]


def test_film_renamed_while_its_first_pipeline_run_writes(runner: DaemonRunner) -> None:
    """New films, each analysed at once and renamed mid-run: the results follow, whatever the daemon had
    seen of the first name, and whether the run commits before or after the daemon handles the rename."""
    lib = runner.library("films")
    d = runner.start([Library(lib)])
    pairs = []
    for i, hold in enumerate(HOLDS * 2):
        film = make_film(lib / f"Arrival {i} (2001)", f"Arrival {i} (2001)", seed=i, trailer=None)
        new = _pipeline_renamed_midway(film, [f"Arrival {i} (2001) Remux"], hold)
        pairs.append((film, new))
    _assert_all_followed(d, pairs)
    assert d.counter("errors") == 0
    assert not d.logs("migration_skipped"), d.logs("migration_skipped")


def test_film_renamed_twice_while_its_first_pipeline_run_writes(runner: DaemonRunner) -> None:
    """Renamed again before the run committed: the results go straight to the final name."""
    lib = runner.library("films")
    d = runner.start([Library(lib)])
    pairs = []
    for i, hold in enumerate(HOLDS):
        film = make_film(lib / f"Twice {i} (2002)", f"Twice {i} (2002)", seed=10 + i, trailer=None)
        new = _pipeline_renamed_midway(film, [f"Twice {i} r1 (2002)", f"Twice {i} r2 (2002)"], max(hold, 0.1))
        pairs.append((film, new))
    _assert_all_followed(d, pairs)
    assert d.counter("errors") == 0


def test_film_moved_across_roots_then_renamed_mid_run(runner: DaemonRunner) -> None:
    """The soak's sequence: a film moved into a new folder of the other root, analysed there at once and
    renamed while the run writes: the results follow the rename."""
    lib_a, lib_b = runner.library("lib-a"), runner.library("lib-b")
    d = runner.start([Library(lib_a), Library(lib_b)])
    pairs = []
    for i, hold in enumerate(HOLDS):
        film = make_film(lib_a / f"Mover {i} (2003)", f"Mover {i} (2003)", seed=20 + i, trailer=None)
        dest = lib_b / f"Mover {i} (2003) ~{i}"
        dest.mkdir()
        moved = Film(dest / film.path.name, tuple(dest / s.name for s in film.subtitles))
        for src, to in zip([film.path, *film.subtitles], [moved.path, *moved.subtitles], strict=True):
            os.rename(src, to)
        new = _pipeline_renamed_midway(moved, [f"Mover {i} r1 (2003)"], hold)
        pairs.append((moved, new))
    _assert_all_followed(d, pairs)
    assert d.counter("errors") == 0


@pytest.mark.parametrize("hold", [None, 0.0, 0.3], ids=["committed", "commits-at-once", "commits-later"])
def test_folder_arrives_with_a_film_renamed_before_its_watch_existed(runner: DaemonRunner, hold: float | None) -> None:
    """The flake of this file's first test, made deterministic: a new folder's watch exists only once the
    daemon handled its creation, so a film renamed in it before that sends no rename event at all. Here the
    folder is analysed and renamed outside the libraries, then moved in (committed already, or with the
    pipeline still holding the lock and committing once it is in): the daemon sees a film and a work dir
    nobody claims, and must still attach the results to the film."""
    lib = runner.library("films")
    outside = runner.base / "incoming"
    d = runner.start([Library(lib)])
    film = make_film(outside / "Arrival (2001)", "Arrival (2001)", seed=40, trailer=None)
    dest = lib / "Arrival (2001)"
    if hold is None:
        new = _pipeline_renamed_midway(film, ["Arrival (2001) Remux"], 0.0)
        os.rename(film.path.parent, dest)
    else:
        wd = film.wd
        wd.path.mkdir()
        with safefs.work_dir_fd(wd.path) as fd:
            lock = work_dir_lock(wd, purpose="test pipeline", dir_fd=fd)
            lock.acquire(5.0)
            try:
                stamps = current_stamps(film.path, film.subtitles)
                build_work_dir(film, record_stamps=False)
                new = _rename(film, "Arrival (2001) Remux")
                os.rename(film.path.parent, dest)
                time.sleep(hold)
                write_stamps_at(fd, stamps)
            finally:
                lock.release()
    moved_new = Film(dest / new.path.name, tuple(dest / s.name for s in new.subtitles))
    moved_old = Film(dest / film.path.name)
    _assert_all_followed(d, [(moved_old, moved_new)])
    assert d.counter("errors") == 0
