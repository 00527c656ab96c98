"""Crash consistency: SIGKILL the daemon at every fault point of an edit, restart it, check everything.

``cinecut.faults`` (env ``CINECUTD_FAULTS``) makes the real daemon kill itself at a named point:
inside an invalidation (before/after the checkpoint, after each artifact), before the stamps sidecar is
committed, at every step of a work-dir migration after a rename or a folder move, and between writing an
atomic temp file and renaming it into place (which leaves a temp file behind). After each kill a clean
daemon starts; once its startup reconcile is done (it answers only then) every invariant must hold:

- no stale cache, stage, proxy or keyframe (the film or its subtitle changed before the kill);
- a renamed or moved film has its results (migration journals are resumed, orphans re-adopted);
- manifests, unknown files, trailers and subtitles are byte-identical;
- no temp file of ours and no migration journal is left.

Also: a disk that fills up while a checkpoint or cache is written leaves the previous file intact, says
so, and the daemon keeps running.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cinecut import safefs
from cinecut.checkpoint import PipelineCheckpoint, read_checkpoint, save_checkpoint
from cinecut.inference.cache import read_cache_metadata, save_cache
from cinecut.inference.models import SceneDescription
from cinecut.models import KeyframeRecord
from tests.harness.checks import (
    changed_files,
    no_stale_results,
    sacred_files,
    snapshot,
    subtitles_invalidated,
    video_invalidated,
    warm,
    work_state,
)
from tests.harness.films import SRT, Film, make_film_with_work_dir
from tests.harness.mutate import new_content
from tests.harness.runner import Daemon, DaemonRunner, Library
from tests.harness.waiting import wait_for

INVALIDATION_POINTS = (
    "invalidate.before_checkpoint",
    "invalidate.after_checkpoint",
    "invalidate.after_artifact",
    "revalidate.before_stamps",
    "atomic_write.before_rename",
)
MIGRATION_POINTS = (
    "migrate.before_rename",
    "migrate.after_rename",
    "migrate.after_cache",
    "migrate.after_checkpoint",
    "atomic_write.before_rename",
)
FOLDER_POINTS = ("migrate.after_cache", "migrate.after_checkpoint", "atomic_write.before_rename")
OUR_TEMP_SUFFIXES = (".ckpt.tmp", ".cache.tmp", ".stamps.tmp", ".journal.tmp")


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[DaemonRunner]:
    with DaemonRunner(tmp_path) as r:
        yield r


def _start(runner: DaemonRunner, config: Path, faults: str | None) -> Daemon | None:
    """Start a daemon (with ``faults`` in its environment); None if it killed itself before it was ready."""
    old = os.environ.pop("CINECUTD_FAULTS", None)
    if faults:
        os.environ["CINECUTD_FAULTS"] = faults
    try:
        d = runner.daemon(config)
        try:
            return d.start()
        except AssertionError as exc:
            assert d.proc is not None and d.proc.returncode == -signal.SIGKILL, str(exc)[-3000:]
            return None
    finally:
        os.environ.pop("CINECUTD_FAULTS", None)
        if old is not None:
            os.environ["CINECUTD_FAULTS"] = old


def _wait_killed(d: Daemon, timeout: float = 10.0) -> bool:
    """True once the daemon died of its SIGKILL fault; False if it is still running after ``timeout``."""
    assert d.proc is not None
    try:
        rc = d.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return False
    assert rc == -signal.SIGKILL, f"exit {rc}:\n{d.log_text()[-3000:]}"
    return True


def our_leftovers(root: Path) -> list[Path]:
    """Temp files and migration journals of ours anywhere under ``root``."""
    out = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if name.endswith(OUR_TEMP_SUFFIXES) or name == "cinecut_migration.json":
                out.append(Path(dirpath) / name)
    return out


@dataclass
class Case:
    """One film, what was done to it, and what must hold after the restart."""

    film: Film
    expect: str  # "video" | "subtitles" | "warm"
    before: dict[Path, bytes | None] = field(default_factory=dict)
    label: str = ""


def _renamed(film: Film, new_path: Path) -> Film:
    subs = tuple(new_path.parent / (new_path.stem + s.name[len(film.stem):]) for s in film.subtitles)
    trailer = new_path.parent / film.trailer.name if film.trailer is not None else None
    return Film(new_path, subs, trailer)


def _act(kind: str, film: Film, i: int) -> Film:
    """Do ``kind`` to the film; return the film as it is afterwards."""
    if kind == "replace":
        tmp = film.path.with_name(film.path.name + ".partial")
        tmp.write_bytes(new_content(film.path, seed=100 + i))
        os.replace(tmp, film.path)
        return film
    if kind == "subtitle":
        film.subtitles[0].write_text(SRT.replace("Hello", f"Edited {i}"))
        return film
    if kind == "rename":
        new = _renamed(film, film.path.with_name(f"Renamed {i}.mkv"))
        for old_sub, new_sub in zip(film.subtitles, new.subtitles, strict=True):
            os.rename(old_sub, new_sub)
        os.rename(film.path, new.path)
        return new
    if kind == "folder":
        folder = film.path.parent.with_name(film.path.parent.name + f" moved{i}")
        os.rename(film.path.parent, folder)
        return Film(folder / film.path.name, tuple(folder / s.name for s in film.subtitles),
                    folder / film.trailer.name if film.trailer is not None else None)
    raise AssertionError(kind)


EXPECT = {"replace": "video", "subtitle": "subtitles", "rename": "warm", "folder": "warm"}


def _check(case: Case) -> list[str]:
    film, problems = case.film, []
    state = work_state(film)
    if not no_stale_results(film):
        problems.append(f"stale results: {state}")
    if case.expect == "video" and not video_invalidated(film):
        problems.append(f"not invalidated: {state}")
    if case.expect == "subtitles" and not subtitles_invalidated(film):
        problems.append(f"not reset from subtitles: {state}")
    if case.expect == "warm":
        if not warm(film) or state.checkpoint_source != str(film.path) or state.cache_source != str(film.path):
            problems.append(f"results did not follow the rename: {state}")
    expected = dict(case.before)
    if case.expect == "warm":  # they moved with the work dir (or the folder): compare at the new paths
        expected = {}
        for p, data in case.before.items():
            if "_cinecut_work" in str(p):
                expected[film.wd.path / p.relative_to(_wd_root(p))] = data
            elif film.trailer is not None and p.name == film.trailer.name:
                expected[film.trailer] = data
    bad = changed_files(expected)
    if bad:
        problems.append(f"user files changed: {bad}")
    return [f"{case.label}: {p}" for p in problems]


def _wd_root(p: Path) -> Path:
    for parent in p.parents:
        if parent.name.endswith("_cinecut_work"):
            return parent
    raise AssertionError(p)


def _new_case(lib: Path, kind: str, i: int) -> Case:
    film = make_film_with_work_dir(lib / f"Film {i:03d}", f"Film {i:03d}")
    assert warm(film)
    return Case(film, EXPECT[kind], snapshot(sacred_files(film)))


def _plan() -> list[tuple[str, str, bool]]:
    """(action, fault point, daemon down during the action): every point of every kind of edit, live and
    at the startup reconcile, then random ``kill:*`` rounds."""
    plan = [(kind, point, False) for kind, points in (("replace", INVALIDATION_POINTS),
                                                       ("subtitle", INVALIDATION_POINTS),
                                                       ("rename", MIGRATION_POINTS),
                                                       ("folder", FOLDER_POINTS)) for point in points]
    plan += [(kind, point, True) for kind in ("replace", "subtitle") for point in INVALIDATION_POINTS]
    rng = random.Random(6)
    plan += [(rng.choice(["replace", "subtitle", "rename", "folder"]), "*@0.5", rng.random() < 0.3)
             for _ in range(6)]
    return plan


@pytest.mark.slow
def test_sigkill_at_every_fault_point_then_restart_keeps_every_invariant(runner: DaemonRunner) -> None:
    lib = runner.library()
    config = runner.config([Library(lib)], settle_seconds=0.2, log_level="info")
    cases: list[Case] = []
    kills = 0
    plan = _plan()
    for i, (kind, point, down) in enumerate(plan):
        case = _new_case(lib, kind, i)
        case.label = f"#{i} {kind} {'while down' if down else 'live'} kill:{point}"
        cases.append(case)
        if down:
            case.film = _act(kind, case.film, i)
            d = _start(runner, config, f"kill:{point}")
            if d is None:
                kills += 1
            else:
                d.stop()
        else:
            d = _start(runner, config, f"kill:{point}")
            if d is None:  # a random kill:* fired during the startup reconcile
                kills += 1
                case.film = _act(kind, case.film, i)
            else:
                case.film = _act(kind, case.film, i)
                if _wait_killed(d, timeout=3.0):
                    kills += 1
                else:
                    d.stop()  # this point was not on the path taken; the clean daemon still must agree
        clean = _start(runner, config, None)
        assert clean is not None
        problems = [p for c in cases for p in _check(c)]
        leftovers = our_leftovers(lib)
        assert not problems, "\n".join(problems) + "\n" + clean.log_text()[-4000:]
        assert not leftovers, leftovers
        st = clean.status()
        assert st["films"]["orphaned"] == 0, st["orphans"]
        clean.stop()
    print(f"{len(plan)} crash rounds, {kills} SIGKILLs at fault points, {len(cases)} films checked each round")
    assert kills >= len(plan) - 8  # nearly every point is on the path of its action


def test_our_temp_files_are_swept_at_startup_and_upstreams_are_not(runner: DaemonRunner) -> None:
    """Ours (``tmp`` + 12 hex, written under the lock) go at the next start; upstream's mkstemp files stay
    until they are older than the grace period; a live writer's file (lock held) is never touched."""
    lib = runner.library()
    idle = make_film_with_work_dir(lib / "Idle", "Idle")
    busy = make_film_with_work_dir(lib / "Busy", "Busy")
    ours = [idle.wd.path / "tmp0123456789ab.ckpt.tmp", idle.wd.path / "tmpabcdefabcdef.stamps.tmp",
            idle.wd.path / "tmp00ff00ff00ff.journal.tmp", idle.wd.path / "tmpfedcba987654.cache.tmp"]
    upstream = idle.wd.path / "tmpa1b2_c3d.cache.tmp"  # mkstemp's 8 characters
    in_use = busy.wd.path / "tmp111111111111.cache.tmp"
    for p in [*ours, upstream, in_use]:
        p.write_bytes(b"half-written")
    outside = lib / "Idle" / "tmp222222222222.ckpt.tmp"  # not in a work dir: not ours to judge
    outside.write_bytes(b"someone else's")
    from tests.harness.films import lock_held

    with lock_held(busy.wd.path):
        d = runner.start([Library(lib)])
        assert [p for p in ours if p.exists()] == []
        assert upstream.exists() and in_use.exists() and outside.exists()
        assert d.counter("temp_files_removed") == len(ours)
    assert warm(idle) and warm(busy)


# --------------------------------------------------------------------------------------------- disk full


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (root only): a disk that fills up."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(fs: Path) -> Path:
    """Fill the filesystem to the last block with one file; returns it (delete it to make room)."""
    filler = fs / "filler.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for chunk in (1 << 20, 1 << 16, 4096, 512, 1):
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    return filler


def test_disk_full_during_checkpoint_and_cache_writes_keeps_the_old_files(small_fs: Path) -> None:
    """The core's writers on a full disk: ENOSPC, the previous checkpoint and cache byte-identical, no
    temp file left behind."""
    film = make_film_with_work_dir(small_fs / "Heat", "Heat", size=4096, frames=3)
    wd = film.wd
    ckpt_before = wd.checkpoint_path.read_bytes()
    cache_before = wd.cache_path.read_bytes()
    filler = _fill(small_fs)
    try:
        big = PipelineCheckpoint(str(film.path), "action", ["proxy"], structural_anchors={"x": "y" * 300_000})
        with pytest.raises(OSError) as exc:
            save_checkpoint(big, wd)
        assert exc.value.errno == errno.ENOSPC
        results = [(KeyframeRecord(float(i), f"/k/{i}.jpg", "scene_change"),
                    SceneDescription("v" * 2000, "m", "a", "s")) for i in range(300)]
        with pytest.raises(OSError) as exc:
            save_cache(results, film.path, wd)
        assert exc.value.errno == errno.ENOSPC
    finally:
        filler.unlink()
    assert wd.checkpoint_path.read_bytes() == ckpt_before
    assert wd.cache_path.read_bytes() == cache_before
    assert read_checkpoint(wd).checkpoint is not None and read_cache_metadata(wd.cache_path) is not None
    assert our_leftovers(small_fs) == []


def test_disk_full_while_the_daemon_invalidates_and_migrates(small_fs: Path, tmp_path: Path) -> None:
    """The daemon on a full disk: a replacement it cannot record and a rename it cannot journal are
    reported, nothing is half-done, the daemon answers throughout and finishes both once space is back."""
    lib = small_fs / "films"
    replaced = make_film_with_work_dir(lib / "Replaced", "Replaced", size=4096, frames=3)
    renamed = make_film_with_work_dir(lib / "Renamed", "Renamed", size=4096, frames=3)
    before = snapshot([*sacred_files(replaced), *sacred_files(renamed)])
    (tmp_path / "run").mkdir()
    with DaemonRunner(tmp_path / "run") as r:
        d = r.start([Library(lib)], settle_seconds=0.2)
        filler = _fill(small_fs)
        try:
            with open(replaced.path, "r+b") as f:  # in place: the new bytes need no new blocks
                f.write(b"X" * 4096)
            new_name = renamed.path.with_name("Renamed Again.mkv")
            os.rename(renamed.subtitles[0], new_name.with_suffix(".en.srt"))
            os.rename(renamed.path, new_name)
            wait_for(lambda: d.counter("events") >= 3, what="events seen")
            time.sleep(0.6)
            assert d.request("ping")["pong"]
            # No stale cache survives even on a full disk: deleting frees space, and the checkpoint is
            # either reset or left to say "complete" while the cache that proves it is gone.
            cache = read_cache_metadata(replaced.wd.cache_path)
            assert cache is None or cache.stamp == work_state(replaced).film_stamp
        finally:
            filler.unlink()
        d.request("rescan")
        wait_for(lambda: video_invalidated(replaced), what="invalidation completed once space is back")
        moved = _renamed(renamed, new_name)
        wait_for(lambda: warm(moved) and work_state(moved).checkpoint_source == str(moved.path),
                 what="migration completed once space is back")
        assert d.running and d.request("ping")["pong"]
        assert our_leftovers(small_fs) == []
    assert not [p for p in changed_files(before) if p.exists() or "Renamed" not in str(p)]


def test_safefs_leaves_no_temp_file_on_enospc(small_fs: Path) -> None:
    (small_fs / "wd").mkdir()
    with safefs.dir_fd(small_fs / "wd") as fd:
        safefs.atomic_write(fd, "x.json", b"old", tmp_suffix=".ckpt.tmp")
        filler = _fill(small_fs)
        try:
            with pytest.raises(OSError):
                safefs.atomic_write(fd, "x.json", b"n" * 200_000, tmp_suffix=".ckpt.tmp")
        finally:
            filler.unlink()
    assert sorted(os.listdir(small_fs / "wd")) == ["x.json"]
    assert (small_fs / "wd" / "x.json").read_bytes() == b"old"
