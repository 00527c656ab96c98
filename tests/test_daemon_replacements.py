"""Every way a film gets replaced ends with no stale cache and no stale stage, live or while the daemon is down.

A real ``cinecutd run`` watches a real library (inotify and polling); the film is replaced the way real
tools do it (coreutils, rsync, Radarr, atomic writers) and the work dir is checked with the core's readers.
Files that are not ours (manifests, later-stage output, unknown files, the trailer) must stay byte-equal.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.checks import (
    changed_files,
    invalidations_of,
    no_stale_results,
    sacred_files,
    snapshot,
    subtitles_invalidated,
    video_invalidated,
    warm,
)
from tests.harness.films import SRT, Film, make_film_with_work_dir
from tests.harness.mutate import REPLACEMENTS
from tests.harness.runner import DaemonRunner, Library
from tests.harness.waiting import stays, wait_for

SETTLE = 0.2
MODES = ["inotify", "poll"]


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[DaemonRunner]:
    with DaemonRunner(tmp_path) as r:
        yield r


def _setup(runner: DaemonRunner, mode: str) -> tuple[Film, Library]:
    lib = runner.library()
    film = make_film_with_work_dir(lib / "Heat (1995)")
    assert warm(film)
    return film, Library(lib, watch=mode)


def _assert_settled_clean(runner: DaemonRunner, film: Film, before: dict[Path, bytes | None], check) -> None:
    """After the burst settles (final revalidation), the state holds, nothing else changed, and the
    daemon recorded exactly one invalidation for the film."""
    assert stays(lambda: check(film), SETTLE + 0.3), "state changed after the final revalidation"
    assert no_stale_results(film)
    assert changed_files(before) == []
    d = runner.daemons[-1]
    assert len(invalidations_of(d, film)) == 1, invalidations_of(d, film)
    st = d.status()
    assert st["films"]["total"] == 1  # the trailer beside the film is never a film
    assert st["counters"].get("errors", 0) == 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pattern", list(REPLACEMENTS))
def test_replacement_is_invalidated_live(runner: DaemonRunner, mode: str, pattern: str) -> None:
    film, lib = _setup(runner, mode)
    before = snapshot([*sacred_files(film), *film.subtitles])
    d = runner.start([lib], settle_seconds=SETTLE)
    assert d.film_status(film.path)["cache"]["state"] == "valid"

    REPLACEMENTS[pattern](film.path)

    wait_for(lambda: video_invalidated(film), what=f"{pattern}: work dir invalidated")
    _assert_settled_clean(runner, film, before, video_invalidated)
    detail = d.film_status(film.path)
    assert detail["cache"]["state"] == "missing"
    assert detail["stages_complete"] == []


@pytest.mark.parametrize("pattern", ["truncate_write", "mv_partial", "rsync"])
def test_replacement_while_stopped_is_fixed_before_ready(runner: DaemonRunner, pattern: str) -> None:
    film, lib = _setup(runner, "inotify")
    before = snapshot(sacred_files(film))
    d = runner.start([lib], settle_seconds=SETTLE)
    rc, _ = d.stop()
    assert rc == 0

    REPLACEMENTS[pattern](film.path)
    assert not video_invalidated(film)  # nobody was watching

    d = runner.daemon(d.config).start()
    # Ready means caught up: no waiting here.
    assert video_invalidated(film)
    recent = invalidations_of(d, film)
    assert len(recent) == 1 and recent[0]["trigger"] == "rescan"
    assert d.status()["films"]["stale_fixed"] == 1
    assert changed_files(before) == []


def test_subtitle_edited_while_stopped_is_fixed_before_ready(runner: DaemonRunner) -> None:
    film, lib = _setup(runner, "inotify")
    d = runner.start([lib], settle_seconds=SETTLE)
    rc, _ = d.stop()
    assert rc == 0
    film.subtitles[0].write_text(SRT.replace("Goodbye.", "Farewell."))
    d = runner.daemon(d.config).start()
    assert subtitles_invalidated(film)
    assert invalidations_of(d, film)[0]["trigger"] == "rescan"


@pytest.mark.parametrize("mode", MODES)
def test_subtitle_edited_resets_from_subtitles_and_keeps_the_proxy(runner: DaemonRunner, mode: str) -> None:
    film, lib = _setup(runner, mode)
    before = snapshot(sacred_files(film))
    proxy = film.wd.proxy_path.read_bytes()
    d = runner.start([lib], settle_seconds=SETTLE)

    film.subtitles[0].write_text(SRT.replace("Hello there.", "Hello, there!"))

    wait_for(lambda: subtitles_invalidated(film), what="reset from subtitles")
    _assert_settled_clean(runner, film, before, subtitles_invalidated)
    assert film.wd.proxy_path.read_bytes() == proxy
    rec = invalidations_of(d, film)[0]
    assert "proxy" not in rec["stages"] and "subtitles" in rec["stages"]


@pytest.mark.parametrize("mode", MODES)
def test_subtitle_added_resets_from_subtitles(runner: DaemonRunner, mode: str) -> None:
    film, lib = _setup(runner, mode)
    before = snapshot(sacred_files(film))
    runner.start([lib], settle_seconds=SETTLE)

    fr = film.path.with_name(f"{film.stem}.fr.srt")
    fr.write_text(SRT.replace("Hello there.", "Bonjour."))
    film = dataclasses.replace(film, subtitles=(*film.subtitles, fr))

    wait_for(lambda: subtitles_invalidated(film), what="reset from subtitles")
    _assert_settled_clean(runner, film, before, subtitles_invalidated)


def test_subtitle_deleted_resets_from_subtitles_after_a_pause(runner: DaemonRunner) -> None:
    film, lib = _setup(runner, "inotify")
    runner.start([lib], settle_seconds=SETTLE)

    film.subtitles[0].unlink()
    film = dataclasses.replace(film, subtitles=())

    wait_for(lambda: subtitles_invalidated(film), what="reset from subtitles")
    assert no_stale_results(film)


@pytest.mark.parametrize("mode", MODES)
def test_unrelated_files_change_nothing(runner: DaemonRunner, mode: str) -> None:
    """Trailers, in-progress downloads, hidden files and files inside the work dir are not films."""
    film, lib = _setup(runner, mode)
    d = runner.start([lib], settle_seconds=SETTLE)
    folder = film.path.parent
    assert film.trailer is not None
    film.trailer.write_bytes(b"a new cut of the trailer")
    (folder / f"{film.stem}_trailer_drama.mp4").write_bytes(b"another trailer")
    (folder / f"{film.stem}.mkv.part").write_bytes(b"downloading")
    (folder / f".{film.stem}.mkv.abc123").write_bytes(b"rsync temp")
    (folder / "poster.jpg").write_bytes(b"jpeg")
    (film.wd.path / "notes.txt").write_text("edited notes\n")
    d.sync()  # every event above was handled: no sleeping to find out that nothing happened
    assert warm(film)
    st = d.status()
    assert st["films"]["total"] == 1 and st["counters"].get("invalidations", 0) == 0


def test_rename_replacements_are_caught_within_milliseconds(runner: DaemonRunner) -> None:
    """Rename-based replacements are not held back by inotify move pairing (watchdog's default holds
    every rename, and each event queued behind it, for half a second)."""
    lib = runner.library()
    patterns = ["mv_partial", "temp_rename", "hardlink_swap", "rsync"]
    films = [make_film_with_work_dir(lib / f"Film {i}", f"Film {i}") for i in range(len(patterns))]
    runner.start([Library(lib)], settle_seconds=SETTLE)
    latencies = []
    for film, pattern in zip(films, patterns, strict=True):
        REPLACEMENTS[pattern](film.path)
        t0 = time.monotonic()
        wait_for(lambda f=film: not f.wd.cache_path.exists(), interval=0.002, what=f"{pattern}: cache gone")
        latencies.append(time.monotonic() - t0)
    assert min(latencies) < 0.25, latencies
    assert sorted(latencies)[len(latencies) // 2] < 0.45, latencies
