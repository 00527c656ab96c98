"""The daemon judges upstream's work on upstream's evidence, says when it cannot, and writes nothing into a
work dir that nothing changed (a first start over a library upstream wrote creates no file in it)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import upstream_reader as up
from test_core_evidence import media, rsync_over, upstream_left  # noqa: F401 - media is a fixture

from cinecut.stamp import SourceStamp
from cinecut.stamps import read_stamps
from cinecut.workdir import WorkDir
from tests.harness.checks import work_state
from tests.harness.runner import DaemonRunner, Library, daemon_command
from tests.harness.waiting import stays, wait_for

OLD = 1_500_000_000.5


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[DaemonRunner]:
    with DaemonRunner(tmp_path) as r:
        yield r


def files_of(work_dirs: list[Path]) -> dict[str, tuple[int, int, int]]:
    """Every entry in the work dirs with inode, mtime and size: a created, rewritten or touched file shows."""
    out = {}
    for wd in work_dirs:
        for p in [wd, *sorted(wd.rglob("*"))]:
            st = p.lstat()
            out[str(p)] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return out


def video_reset(film: Path) -> bool:
    """Every stage reset, the proxy and keyframes gone, and the invalidation recorded (the commit mark)."""
    s = work_state(film)
    done = s.stages == () and not s.proxy and s.keyframes == 0 and not s.timestamps
    return done and s.stamps is not None and s.stamps.video == s.film_stamp


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")
def test_upstream_work_then_an_older_replacement_while_running_is_invalidated(
    runner: DaemonRunner, media: tuple[Path, Path, Path]  # noqa: F811
) -> None:
    lib = runner.library()
    film = upstream_left(lib / "Heat (1995)", media)
    wd = WorkDir.for_film(film)
    d = runner.start([Library(lib)])
    assert d.film_status(film)["verification"] == "proxy"  # checked against the film: recorded
    rsync_over(film, media[1], OLD)  # another cut, with an mtime older than the proxy
    wait_for(lambda: video_reset(film), what="stale stages reset and the reset recorded")
    d.request("rescan")
    rec = read_stamps(wd.path)
    assert rec is not None and rec.video == SourceStamp.of(film)
    assert work_state(film).stages == ()


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")
def test_upstream_work_appearing_while_running_is_judged_by_its_proxy_at_the_next_rescan(
    runner: DaemonRunner, media: tuple[Path, Path, Path]  # noqa: F811
) -> None:
    """Upstream (no lock, no sidecar) leaves its work while the daemon watches, and the film is replaced by
    an older file before any look at that work: neither the event nor the next rescan may record the new
    film as the one those stages came from."""
    lib = runner.library()
    film = upstream_left(lib / "Heat (1995)", media)
    wd = WorkDir.for_film(film)
    staging = runner.base / "staging"
    shutil.move(wd.path, staging)
    d = runner.start([Library(lib)])
    assert d.film_status(film)["verification"] == "nothing"
    shutil.move(staging, wd.path)  # upstream's work appears while the daemon runs
    rsync_over(film, media[1], OLD)
    d.request("rescan")
    wait_for(lambda: video_reset(film), what="stale stages reset and the reset recorded")


def test_unverifiable_stages_are_reported_not_certified_nor_deleted(runner: DaemonRunner) -> None:
    lib = runner.library()
    folder = lib / "Heat (1995)"
    folder.mkdir()
    film = folder / "Heat (1995).mkv"
    film.write_bytes(b"not a film ffprobe can read" * 100)
    os.utime(film, (OLD, OLD))
    wd = Path(up.run_pipeline(film, subtitle=False))
    WorkDir.for_film(film).cache_path.unlink()  # stopped before inference: no cache to prove anything
    before = files_of([wd])
    d = runner.start([Library(lib)])
    st = d.film_status(film)
    assert st["verification"] == "unverified"
    assert d.status()["films"]["unverified"] == 1
    assert files_of([wd]) == before  # no sidecar certifying them, no lock file, nothing deleted
    d.request("rescan")
    assert files_of([wd]) == before
    for args in ([], [str(film)]):  # said in the summary and per film, as a person reads it
        out = subprocess.run([*daemon_command(), "status", "--socket", str(d.socket), *args],
                             capture_output=True, text=True, timeout=30)
        assert "unverified" in out.stdout, out.stdout + out.stderr


def test_first_start_on_an_upstream_library_creates_no_file_in_any_work_dir(runner: DaemonRunner) -> None:
    lib = runner.library()
    films = []
    for i in range(12):
        folder = lib / f"Film {i:02d} (2001)"
        folder.mkdir()
        film = folder / f"Film {i:02d} (2001).mkv"
        film.write_bytes(f"film {i}".encode() * 500)
        up.run_pipeline(film)  # upstream's own writer: checkpoint, cache, proxy, keyframes, no sidecar
        films.append(film)
    wds = [WorkDir.for_film(f).path for f in films]
    before = files_of(wds)
    d = runner.start([Library(lib)])
    status = d.status()["films"]
    assert status["total"] == 12 and status["warm"] == 12 and status["unverified"] == 0
    assert files_of(wds) == before
    d = runner.restart(d)
    d.request("rescan")
    assert files_of(wds) == before

    # A real change is still acted on (and only then is anything written).
    film = films[3]
    film.write_bytes(b"another cut" * 600)
    wait_for(lambda: work_state(film).stages == () and not WorkDir.for_film(film).cache_path.exists(),
             what="replaced film invalidated")
    assert stays(lambda: all(work_state(f).cache_valid for f in films if f != film), 0.5)


def test_film_renamed_while_down_follows_by_upstreams_cache_without_a_sidecar(runner: DaemonRunner) -> None:
    lib = runner.library()
    folder = lib / "Heat (1995)"
    folder.mkdir()
    film = folder / "Heat (1995).mkv"
    film.write_bytes(b"the film" * 800)
    up.run_pipeline(film, subtitle=False)
    d = runner.start([Library(lib)])
    d.stop()
    assert read_stamps(WorkDir.for_film(film).path) is None
    new = folder / "Heat.1995.Bluray.mkv"
    os.rename(film, new)
    d = runner.daemon(d.config).start()
    s = work_state(new)
    assert s.cache_valid and s.checkpoint_source == str(new) and s.proxy and s.keyframes > 0, s
    assert not WorkDir.for_film(film).path.exists()
    assert d.status()["counters"].get("invalidations", 0) == 0
