"""Renames and moves keep the expensive results; deletions leave orphans that only ``gc --apply`` reclaims.

A film renamed or moved with unchanged content (same inode, same stamp) must keep its cache: the work dir
follows it, the cache file gets the new stem, every absolute path upstream stores is rewritten, and
upstream's own reader (``tests/upstream_reader.py``) still accepts the cache as valid.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import upstream_reader

from cinecut.inference.cache import read_cache_file
from tests.harness.checks import snapshot, stamps_current, warm, work_state
from tests.harness.films import ALL_STAGES, KEPT_IN_WORK_DIR, Film, make_film_with_work_dir
from tests.harness.runner import DaemonRunner, Library, daemon_command
from tests.harness.waiting import stays, wait_for

MODES = ["inotify", "poll"]


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[DaemonRunner]:
    with DaemonRunner(tmp_path) as r:
        yield r


def _moved(film: Film, new_path: Path) -> Film:
    """The same film at its new path, its subtitles renamed along (as Radarr does)."""
    subs = tuple(new_path.with_name(new_path.stem + s.name[len(film.stem):]) for s in film.subtitles)
    trailer = film.trailer and new_path.parent / film.trailer.name.replace(film.stem, new_path.stem, 1)
    return Film(new_path, subs, trailer)


def results_followed(old: Film, new: Film) -> bool:
    """The work dir now belongs to ``new``: renamed dir and cache, rewritten paths, still valid upstream."""
    if os.path.lexists(old.wd.path) and old.wd.path != new.wd.path:
        return False
    s = work_state(new)
    if not (s.stages == tuple(ALL_STAGES) and s.cache_valid and s.checkpoint_source == str(new.path)):
        return False
    if s.cache_source != str(new.path) or not s.proxy or not stamps_current(new):
        return False
    _, results = read_cache_file(new.wd.cache_path)
    return all(Path(rec.frame_path).parent == new.wd.keyframes_dir for rec, _ in results)


def assert_upstream_accepts(film: Film) -> None:
    """Upstream's reader loads the cache as valid (mtime/size) and its frames and checkpoint paths exist."""
    wd = film.wd.path
    results = upstream_reader.load_cache(film.path, wd)
    assert results is not None, "upstream would treat the cache as stale"
    assert all(Path(rec.frame_path).is_file() for rec, _ in results)
    ckpt = upstream_reader.load_checkpoint_strict(wd)
    assert ckpt.source_file == str(film.path)
    assert ckpt.proxy_path is not None and Path(ckpt.proxy_path).is_file()
    assert ckpt.manifest_path is not None and Path(ckpt.manifest_path).is_file()
    assert not any(p.name.endswith("_cinecut_work") for p in wd.parent.iterdir() if p != wd and p.stem == film.stem)


@pytest.mark.parametrize("mode", MODES)
def test_film_renamed_in_place_keeps_its_results(runner: DaemonRunner, mode: str) -> None:
    lib = runner.library()
    film = make_film_with_work_dir(lib / "Heat (1995)", "Heat (1995)", subtitles=())
    kept = snapshot([film.wd.path / n for n in KEPT_IN_WORK_DIR])
    d = runner.start([Library(lib, watch=mode)])

    new = _moved(film, film.path.with_name("Heat (1995) Bluray-1080p.mkv"))
    os.rename(film.path, new.path)

    wait_for(lambda: results_followed(film, new), what="work dir moved to the new stem")
    assert_upstream_accepts(new)
    assert snapshot([new.wd.path / n for n in KEPT_IN_WORK_DIR]) == dict(
        zip([new.wd.path / n for n in KEPT_IN_WORK_DIR], kept.values(), strict=True)
    )
    st = d.status()
    assert st["counters"].get("migrations") == 1
    assert st["counters"].get("invalidations", 0) == 0
    assert st["films"]["orphaned"] == 0


@pytest.mark.parametrize("mode", MODES)
def test_radarr_rename_film_then_subtitles_keeps_results(runner: DaemonRunner, mode: str) -> None:
    """Radarr renames the film, then each subtitle: the moment in between must not wipe the cache."""
    lib = runner.library()
    film = make_film_with_work_dir(lib / "Heat (1995)", "Heat (1995)", subtitles=(".en.srt", ".fr.srt"))
    d = runner.start([Library(lib, watch=mode)])

    new = _moved(film, film.path.with_name("Heat.1995.mkv"))
    os.rename(film.path, new.path)
    time.sleep(0.2)  # Radarr renames the sidecars one by one after the film
    for old_sub, new_sub in zip(film.subtitles, new.subtitles, strict=True):
        os.rename(old_sub, new_sub)
        time.sleep(0.05)

    wait_for(lambda: results_followed(film, new), what="results followed film and subtitles")
    assert stays(lambda: warm(new), 1.0), work_state(new)
    assert d.status()["counters"].get("invalidations", 0) == 0


@pytest.mark.parametrize("mode", MODES)
def test_folder_renamed_rewrites_paths(runner: DaemonRunner, mode: str) -> None:
    """Radarr moves the whole folder; the work dir travels with it and its stored paths must follow."""
    lib = runner.library()
    film = make_film_with_work_dir(lib / "Heat (1995)", "Heat (1995)")
    d = runner.start([Library(lib, watch=mode)])

    new_folder = lib / "Heat (1995) [imdb-tt0113277]"
    os.rename(film.path.parent, new_folder)
    new = Film(new_folder / film.path.name, tuple(new_folder / s.name for s in film.subtitles),
               new_folder / film.trailer.name if film.trailer else None)

    wait_for(lambda: results_followed(film, new), what="paths rewritten after the folder moved")
    assert_upstream_accepts(new)
    st = d.status()
    assert st["counters"].get("invalidations", 0) == 0
    assert st["films"]["orphaned"] == 0 and st["films"]["total"] == 1


@pytest.mark.parametrize("mode", MODES)
def test_moved_to_another_library_root_keeps_results(runner: DaemonRunner, mode: str) -> None:
    a, b = runner.library("films"), runner.library("films-4k")
    film = make_film_with_work_dir(a / "Heat (1995)", "Heat (1995)", subtitles=())
    d = runner.start([Library(a, watch=mode), Library(b, watch=mode)])

    (b / "Heat (1995)").mkdir()
    new = _moved(film, b / "Heat (1995)" / film.path.name)
    os.rename(film.path, new.path)

    wait_for(lambda: results_followed(film, new), what="work dir moved across roots")
    assert_upstream_accepts(new)
    st = wait_for(lambda: (s := d.status())["films"]["total"] == 1 and s, what="one film")
    assert st["films"]["orphaned"] == 0 and st["counters"].get("invalidations", 0) == 0


def test_film_deleted_leaves_a_reported_orphan_and_gc_reclaims_only_ours(runner: DaemonRunner) -> None:
    lib = runner.library()
    film = make_film_with_work_dir(lib / "Heat (1995)", "Heat (1995)")
    keep = make_film_with_work_dir(lib / "Ronin (1998)", "Ronin (1998)")
    kept = snapshot([film.wd.path / n for n in KEPT_IN_WORK_DIR])
    d = runner.start([Library(lib)])

    film.path.unlink()
    st = wait_for(lambda: (s := d.status())["films"]["orphaned"] == 1 and s, what="orphan reported")
    assert st["orphans"][0]["work_dir"] == str(film.wd.path)
    assert work_state(film).cache_file and work_state(film).keyframes  # kept by default
    assert warm(keep)

    cli = [*daemon_command(), "gc", "--socket", str(d.socket)]
    dry = subprocess.run([*cli, "--json"], capture_output=True, text=True, timeout=30)
    assert dry.returncode == 0, dry.stderr
    assert str(film.wd.path) in dry.stdout and film.wd.cache_name in dry.stdout
    assert work_state(film).cache_file  # a dry run deletes nothing

    applied = subprocess.run([*cli, "--apply"], capture_output=True, text=True, timeout=30)
    assert applied.returncode == 0, applied.stderr
    s = work_state(film)
    assert not s.cache_file and not s.proxy and s.keyframes == 0 and not s.timestamps
    assert snapshot(list(kept)) == kept  # manifests, later-stage output, unknown files stay
    assert film.trailer is not None and film.trailer.exists() and all(p.exists() for p in film.subtitles)
    assert warm(keep)  # a watched film's work dir is never an orphan


def test_film_moved_out_of_the_libraries_is_an_orphan(runner: DaemonRunner) -> None:
    lib = runner.library()
    film = make_film_with_work_dir(lib / "Heat (1995)", "Heat (1995)", subtitles=())
    d = runner.start([Library(lib)])
    outside = runner.base / "elsewhere"
    outside.mkdir()
    os.rename(film.path, outside / film.path.name)
    wait_for(lambda: d.status()["films"]["orphaned"] == 1, what="orphan reported")
    assert work_state(dataclasses.replace(film, path=film.path)).cache_file


def test_renamed_onto_an_existing_work_dir_never_overwrites_it(runner: DaemonRunner) -> None:
    """The target stem already has a work dir (a deleted film's): it is neither merged into, overwritten,
    nor judged against the renamed film. It is parked intact under a hidden name and reported as the
    orphan, and the moving film keeps its own results under its new name."""
    lib = runner.library()
    film = make_film_with_work_dir(lib / "Heat (1995)", "Heat (1995)", subtitles=())
    other = make_film_with_work_dir(lib / "Heat (1995)", "Heat", subtitles=(), seed=5, trailer=None)
    other.path.unlink()  # an old film's results remain under the target stem
    theirs = {p.relative_to(other.wd.path): p.read_bytes() for p in other.wd.path.rglob("*")
              if p.is_file() and p.name != "cinecut.lock"}
    d = runner.start([Library(lib)])

    os.rename(film.path, other.path)
    renamed = Film(other.path)
    wait_for(lambda: results_followed(film, renamed), what="the renamed film's results followed it")
    assert_upstream_accepts(renamed)
    st = wait_for(lambda: (s := d.status())["films"]["orphaned"] == 1 and s, what="orphan reported")
    parked = Path(st["orphans"][0]["work_dir"])
    assert parked.parent == film.path.parent and parked.name.startswith(".")
    assert {p.relative_to(parked): p.read_bytes() for p in parked.rglob("*")
            if p.is_file() and p.name != "cinecut.lock"} == theirs  # every file of theirs, byte for byte
    assert st["counters"].get("invalidations", 0) == 0


def test_renames_while_the_daemon_was_down_keep_results(runner: DaemonRunner) -> None:
    """The startup reconcile recognises films by the inode and stamp recorded in the stamps sidecar: a
    film renamed, a folder renamed and a film moved to another root while the daemon was stopped."""
    a, b = runner.library("films"), runner.library("films-4k")
    renamed = make_film_with_work_dir(a / "Heat (1995)", "Heat (1995)", subtitles=())
    refoldered = make_film_with_work_dir(a / "Ronin (1998)", "Ronin (1998)")
    crossed = make_film_with_work_dir(a / "Alien (1979)", "Alien (1979)", subtitles=())
    d = runner.start([Library(a), Library(b)])
    rc, _ = d.stop()
    assert rc == 0

    new_renamed = _moved(renamed, renamed.path.with_name("Heat.1995.mkv"))
    os.rename(renamed.path, new_renamed.path)
    new_folder = a / "Ronin (1998) {tmdb-8195}"
    os.rename(refoldered.path.parent, new_folder)
    new_refoldered = Film(new_folder / refoldered.path.name, tuple(new_folder / s.name for s in refoldered.subtitles))
    (b / "Alien (1979)").mkdir()
    new_crossed = _moved(crossed, b / "Alien (1979)" / crossed.path.name)
    os.rename(crossed.path, new_crossed.path)

    d = runner.daemon(d.config).start()
    for old, new in ((renamed, new_renamed), (refoldered, new_refoldered), (crossed, new_crossed)):
        assert results_followed(old, new), (new.path, work_state(new))
        assert_upstream_accepts(new)
    st = d.status()
    assert st["films"]["orphaned"] == 0 and st["counters"].get("invalidations", 0) == 0


@pytest.mark.parametrize("across_roots", [False, True], ids=["same_root", "other_root"])
def test_film_moved_into_a_folder_renamed_before_the_move_was_handled_keeps_results(
    runner: DaemonRunner, across_roots: bool
) -> None:
    """The film moves into folder F, and F is renamed at once (a tool tidying up): the daemon handles the
    film's move after F has gone. The work dir must still follow the film to where it now is."""
    a, b = runner.library("films"), runner.library("films-4k")
    film = make_film_with_work_dir(a / "Heat (1995)", "Heat (1995)", subtitles=())
    d = runner.start([Library(a), Library(b)])
    dest_root = b if across_roots else a
    (dest_root / "Incoming").mkdir()
    d.sync()
    for _ in range(3):  # the race is the point: make it likely that the folder moves before the film's turn
        moved_into = dest_root / "Incoming" / film.path.name
        os.rename(film.path, moved_into)
        final = dest_root / "Heat (1995) [tidy]"
        os.rename(dest_root / "Incoming", final)
        new = _moved(film, final / film.path.name)
        wait_for(lambda new=new: results_followed(film, new), what="work dir followed through the vanished folder")
        assert d.counter("invalidations") == 0
        # Back to where it was, for the next round.
        os.rename(final / film.path.name, film.path)
        os.rename(final, dest_root / "Incoming")
        wait_for(lambda new=new: results_followed(new, film), what="and back")
    assert d.status()["films"]["orphaned"] == 0
