"""Filesystems that misbehave: inotify limits, a kernel queue overflow, no inotify at all, unmounts.

Each test runs the real daemon. The inotify limits are lowered for the daemon alone where the kernel
allows it (a user namespace has its own ``user.max_inotify_watches``/``max_inotify_instances``); the
queue length is a global setting, lowered only while the daemon creates its watches and restored at once.
Mount tests bind-mount a folder over a library root. All of these need root and are skipped, with the
reason, where it is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.checks import video_invalidated, warm, work_state
from tests.harness.films import Film, make_film_with_work_dir
from tests.harness.mutate import replace_in_place
from tests.harness.runner import Daemon, DaemonRunner, Library
from tests.harness.waiting import wait_for

QUEUED_EVENTS = Path("/proc/sys/fs/inotify/max_queued_events")


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[DaemonRunner]:
    with DaemonRunner(tmp_path) as r:
        yield r


def _need_root(what: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"{what} needs root")


def _userns_prefix(sysctls: dict[str, int]) -> list[str]:
    """Run the daemon in its own user namespace (root mapped to root) with these ``/proc/sys/user`` limits."""
    _need_root("lowering inotify limits for one process")
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("needs unshare (util-linux)")
    sets = " && ".join(f"echo {v} > /proc/sys/user/{k}" for k, v in sysctls.items())
    probe = subprocess.run([unshare, "--user", "--map-root-user", "sh", "-c", sets], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"no per-namespace inotify limits here: {probe.stderr.strip()}")
    return [unshare, "--user", "--map-root-user", "--", "sh", "-c", f'{sets} && exec "$@"', "sh"]


def _start_with_prefix(runner: DaemonRunner, libraries: list[Library], prefix: list[str], **kw) -> Daemon:
    d = runner.daemon(runner.config(libraries, **kw))
    d.prefix = prefix
    return d.start()


def _films(root: Path, n: int) -> list[Film]:
    return [make_film_with_work_dir(root / f"Film {i:02d}", f"Film {i:02d}", frames=2) for i in range(n)]


# --------------------------------------------------------------------------------------------- limits


def test_watch_limit_exhausted_falls_back_to_polling_with_one_warning(runner: DaemonRunner) -> None:
    """Not enough watches for the library: one clear warning naming the sysctl, the root is polled, and a
    replacement is still caught (at the polling interval: 30 s by default for a fallback)."""
    lib = runner.library()
    films = _films(lib, 12)  # ~4 watches per film (folder, work dir, keyframes): far more than allowed
    d = _start_with_prefix(runner, [Library(lib)], _userns_prefix({"max_inotify_watches": 8}))
    root = d.status()["roots"][0]
    assert (root["state"], root["watch"]) == ("poll-fallback", "poll"), root
    warnings = [r for r in d.logs() if r.get("event") == "inotify_limit"]
    assert len(warnings) == 1 and "fs.inotify.max_user_watches" in warnings[0]["detail"], warnings
    replace_in_place(films[5].path)
    wait_for(lambda: video_invalidated(films[5]), timeout=45, what="the polling fallback catches the change")
    assert all(warm(f) for f in films if f is not films[5])
    assert len([r for r in d.logs() if r.get("event") == "inotify_limit"]) == 1  # one warning, not one per poll


def test_no_inotify_at_all_poll_roots_still_catch_every_change(runner: DaemonRunner) -> None:
    """A filesystem that reports no events (NFS/SMB for remote writes) is configured as ``watch = "poll"``;
    here inotify is not even available to the daemon, and the poll root still sees replacements, renames
    and new films, while an inotify root degrades to polling with its warning."""
    polled, other = runner.library("nfs"), runner.library("local")
    films = _films(polled, 3)
    local = _films(other, 1)[0]
    d = _start_with_prefix(runner, [Library(polled, watch="poll", poll_interval=0.2), Library(other)],
                           _userns_prefix({"max_inotify_instances": 0}), settle_seconds=0.2)
    roots = {r["path"]: r for r in d.status()["roots"]}
    assert roots[str(polled)]["state"] == "watching" and roots[str(polled)]["watch"] == "poll"
    assert roots[str(other)]["state"] == "poll-fallback"

    replace_in_place(films[0].path)
    wait_for(lambda: video_invalidated(films[0]), what="replacement caught by polling")
    new = films[1].path.with_name("Film 01 (renamed).mkv")
    for sub in films[1].subtitles:
        os.rename(sub, new.with_name(new.stem + sub.name[len(films[1].stem):]))
    os.rename(films[1].path, new)
    wait_for(lambda: work_state(new).checkpoint_source == str(new) and work_state(new).cache_valid,
             what="rename followed by polling")
    arrival = make_film_with_work_dir(polled / "Arrival", "Arrival", frames=2)
    wait_for(lambda: d.film_status(arrival.path)["film"] == str(arrival.path), what="new film found by polling")
    assert warm(local)


@pytest.fixture
def short_queue() -> Iterator[int]:
    """``fs.inotify.max_queued_events`` lowered (it is read when an inotify instance is created), restored
    by the caller right after the daemon started, and in any case at teardown."""
    _need_root("lowering fs.inotify.max_queued_events")
    try:
        old = int(QUEUED_EVENTS.read_text())
        QUEUED_EVENTS.write_text("64\n")
    except OSError as exc:
        pytest.skip(f"cannot change fs.inotify.max_queued_events here: {exc}")
    try:
        yield old
    finally:
        QUEUED_EVENTS.write_text(f"{old}\n")


def test_queue_overflow_is_caught_up_by_the_safety_rescan(runner: DaemonRunner, short_queue: int) -> None:
    """A flood of events overflows the kernel queue; the changes hidden in it are found by the rescan the
    overflow triggers, not 15 minutes later."""
    lib = runner.library()
    films = _films(lib, 6)
    try:
        d = runner.start([Library(lib)], settle_seconds=0.2)
    finally:
        QUEUED_EVENTS.write_text(f"{short_queue}\n")  # other processes get the normal length again
    flood = lib / "flood"
    flood.mkdir()
    for i in range(3500):  # changes to films 0..4 hidden in the flood
        (flood / f"f{i}.txt").write_bytes(b"x")
        if i % 700 == 350:
            replace_in_place(films[i // 700].path)
    wait_for(lambda: d.counter("overflows") >= 1, what="an overflow noticed")
    wait_for(lambda: all(video_invalidated(f) for f in films[:5]), timeout=20,
             what="every change hidden in the overflow caught up")
    assert warm(films[5])
    assert any(r.get("event") == "inotify_overflow" for r in d.logs())
    assert d.counter("rescans") >= 2  # startup + the overflow's


# --------------------------------------------------------------------------------------------- mounts


@pytest.fixture
def bind_root(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(store, mountpoint): a folder bind-mounted over a library root; unmounted at teardown."""
    _need_root("bind mounts")
    store, mnt = tmp_path / "store", tmp_path / "mnt" / "films"
    store.mkdir()
    mnt.mkdir(parents=True)
    proc = subprocess.run(["mount", "--bind", str(store), str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {proc.stderr.strip()}")
    try:
        yield store, mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _tree(root: Path) -> dict[str, tuple[int, bytes | None]]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = (p.stat().st_mtime_ns, p.read_bytes())
    return out


def test_root_unmounted_and_mounted_again(tmp_path: Path, bind_root: tuple[Path, Path]) -> None:
    """Unmounting a root is not deleting its films: nothing is removed or reported orphaned. A change made
    while it was away is caught when it comes back, and live changes after that are caught again."""
    store, mnt = bind_root
    films = _films(mnt, 3)
    in_store = [Film(store / f.path.relative_to(mnt), tuple(store / s.relative_to(mnt) for s in f.subtitles))
                for f in films]
    (tmp_path / "run").mkdir()
    with DaemonRunner(tmp_path / "run") as r:
        d = r.start([Library(mnt)], settle_seconds=0.2)
        before = _tree(store)
        subprocess.run(["umount", str(mnt)], check=True)
        wait_for(lambda: d.status()["films"]["total"] == 0, timeout=15, what="the unmounted films forgotten")
        assert d.status()["films"]["orphaned"] == 0
        assert _tree(store) == before, "an unmount made the daemon delete or change something"

        replace_in_place(in_store[0].path)  # changed while the root was away (on another machine, say)
        subprocess.run(["mount", "--bind", str(store), str(mnt)], check=True)
        wait_for(lambda: d.status()["films"]["total"] == 3, timeout=15, what="the root noticed again")
        wait_for(lambda: video_invalidated(films[0]), timeout=15, what="the offline change caught")
        assert warm(films[1]) and warm(films[2])

        replace_in_place(films[1].path)  # and the root is watched again, live
        wait_for(lambda: video_invalidated(films[1]), timeout=15, what="a live change after the remount")
        assert warm(films[2])
        assert d.running


def test_a_bare_utime_is_caught_live(runner: DaemonRunner) -> None:
    """``utime`` without opening the file (Radarr's "change file date", ``touch -d`` on some tools, rsync
    fixing up times) raises only IN_ATTRIB; upstream's cache is stale from that moment, so it counts."""
    lib = runner.library()
    film = _films(lib, 1)[0]
    d = runner.start([Library(lib)], settle_seconds=0.2)
    st = film.path.stat()
    os.utime(film.path, (st.st_atime, st.st_mtime - 86400))
    wait_for(lambda: video_invalidated(film), timeout=5, what="an mtime-only change invalidated live")
    assert d.counter("rescans") == 1  # caught by the watch, not by a rescan
