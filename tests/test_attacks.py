"""Symlink attacks, check-then-use races and control-socket access, against the real daemon.

Someone who can write into a work dir (the library's group, which the upstream CLI needs) replaces a
piece of it with a symlink to a file outside the library, ideally one owned by another user, and then
makes the daemon act (replaces the film so it invalidates). The daemon must never follow, write or
delete through the link: the target keeps its bytes, mtime and existence; the daemon reports the refusal
and goes on serving and invalidating other films. The race variant swaps the work dir for a symlink in a
tight loop while the daemon invalidates over and over. Finally, the control socket: mode 0660, so the
owner and the socket's group connect, anyone else is refused by the kernel.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cinecut import safefs
from cinecut.workdir import LOCK_NAME, STAMPS_NAME
from tests.harness.checks import video_invalidated
from tests.harness.films import Film, make_film_with_work_dir
from tests.harness.mutate import replace_in_place
from tests.harness.runner import DaemonRunner, Library
from tests.harness.waiting import wait_for


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[DaemonRunner]:
    with DaemonRunner(tmp_path) as r:
        yield r


def _nobody() -> tuple[int, int] | None:
    try:
        pw = pwd.getpwnam("nobody")
    except KeyError:
        return None
    return pw.pw_uid, pw.pw_gid


def _bait(folder: Path) -> dict[Path, tuple[bytes, int]]:
    """Files and a folder outside the library, owned by another user when we can arrange it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "keyframes").mkdir(exist_ok=True)
    files = [folder / "precious.txt", folder / "keyframes" / "frame_0000001000.jpg", folder / "frame_0000002000.jpg"]
    for f in files:
        f.write_bytes(b"someone else's data " + f.name.encode())
        os.utime(f, (1_600_000_000, 1_600_000_000))
    owner = _nobody() if os.geteuid() == 0 else None
    if owner is not None:
        for p in [folder, folder / "keyframes", *files]:
            os.chown(p, *owner)
    return {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in files}


def _intact(bait: dict[Path, tuple[bytes, int]]) -> list[str]:
    out = []
    for f, (data, mtime) in bait.items():
        if not f.exists():
            out.append(f"{f} deleted")
        elif f.read_bytes() != data or f.stat().st_mtime_ns != mtime:
            out.append(f"{f} changed")
    return out


def _plant(film: Film, what: str, bait_dir: Path) -> Path:
    """Replace one piece of the film's work dir with a symlink into ``bait_dir``; returns the link."""
    wd = film.wd
    target = bait_dir / "precious.txt"
    if what == "work dir":
        shutil.rmtree(wd.path)
        link, target = wd.path, bait_dir
    elif what == "keyframes dir":
        shutil.rmtree(wd.keyframes_dir)
        link, target = wd.keyframes_dir, bait_dir / "keyframes"
    elif what == "keyframe":
        link = sorted(wd.keyframes_dir.iterdir())[0]
        link.unlink()
        target = bait_dir / "frame_0000002000.jpg"
    else:
        link = {"cache": wd.cache_path, "checkpoint": wd.checkpoint_path, "lock file": wd.path / LOCK_NAME,
                "proxy": wd.proxy_path, "stamps": wd.path / STAMPS_NAME, "timestamps": wd.timestamps_path}[what]
        if link.exists() or link.is_symlink():
            link.unlink()
    link.symlink_to(target)
    return link


PIECES = ["work dir", "cache", "keyframes dir", "keyframe", "checkpoint", "lock file", "proxy", "stamps",
          "timestamps"]


@pytest.mark.parametrize("what", PIECES)
def test_symlinked_piece_of_a_work_dir_is_never_followed(runner: DaemonRunner, what: str) -> None:
    lib = runner.library()
    film = make_film_with_work_dir(lib / "Heat", "Heat")
    bystander = make_film_with_work_dir(lib / "Ronin", "Ronin")
    bait = _bait(runner.base / "other-user")
    link = _plant(film, what, runner.base / "other-user")
    d = runner.start([Library(lib)], settle_seconds=0.2)
    assert _intact(bait) == []  # the startup reconcile already looked at it

    replace_in_place(film.path)
    wait_for(lambda: d.counter("revalidations") >= 2, what="the replacement revalidated")
    time.sleep(0.4)  # and the final revalidation after the burst
    assert _intact(bait) == [], f"{what}: the link was followed"
    assert d.running
    if what in ("work dir", "lock file"):
        assert d.film_status(film.path)["refused"], "the refusal is reported"
    if what not in ("stamps", "checkpoint"):
        assert link.is_symlink(), "the planted link is reported, not silently removed"

    replace_in_place(bystander.path)  # the daemon goes on with everything else
    wait_for(lambda: video_invalidated(bystander), what="the other film invalidated")
    assert _intact(bait) == []


def test_work_dir_swapped_for_a_symlink_in_a_loop_never_leaks(runner: DaemonRunner) -> None:
    """Check-then-use race: a thread swaps the work dir (and its keyframes dir) for symlinks to bait
    owned by another user, thousands of times, while the film is replaced again and again so the daemon
    invalidates each time. Directory fds and O_NOFOLLOW mean the bait never changes."""
    lib = runner.library()
    film = make_film_with_work_dir(lib / "Heat", "Heat", frames=4)
    bait_dir = runner.base / "other-user"
    bait = _bait(bait_dir)
    # The bait looks like a work dir, so a daemon that followed the link would find things to delete.
    wd = film.wd
    for name in (wd.cache_name, wd.proxy_name, "keyframe_timestamps.json", "pipeline_checkpoint.json"):
        (bait_dir / name).write_bytes(b"decoy " + name.encode())
        os.utime(bait_dir / name, (1_600_000_000, 1_600_000_000))
        bait[bait_dir / name] = ((bait_dir / name).read_bytes(), (bait_dir / name).stat().st_mtime_ns)
    d = runner.start([Library(lib)], settle_seconds=0.05)
    hidden = lib / "Heat" / ".real_work"
    stop = threading.Event()
    swaps = 0

    def swapper() -> None:
        nonlocal swaps
        while not stop.is_set():
            try:
                os.rename(wd.path, hidden)
                os.symlink(bait_dir, wd.path)
                time.sleep(0.0005)
                os.unlink(wd.path)
                os.rename(hidden, wd.path)
                kdir = wd.keyframes_dir
                if kdir.is_dir() and not kdir.is_symlink():
                    os.rename(kdir, hidden)
                    os.symlink(bait_dir / "keyframes", kdir)
                    time.sleep(0.0005)
                    os.unlink(kdir)
                    os.rename(hidden, kdir)
                swaps += 1
            except OSError:
                continue

    t = threading.Thread(target=swapper, daemon=True)
    t.start()
    try:
        for i in range(40):
            # Give the daemon something to delete each round: regenerable files in the real work dir.
            # (Through a directory fd opened without following links: the test must not write the bait.)
            try:
                with safefs.dir_fd(wd.path) as fd:
                    safefs.atomic_write(fd, wd.proxy_name, b"proxy", tmp_suffix=".t.tmp", durable=False)
                    safefs.atomic_write(fd, wd.cache_name, b"stale cache", tmp_suffix=".t.tmp", durable=False)
            except OSError:
                pass
            replace_in_place(film.path, data=bytes([i]) * film.path.stat().st_size)
            time.sleep(0.03)
            assert _intact(bait) == []
    finally:
        stop.set()
        t.join(5)
    if os.path.islink(wd.path):
        os.unlink(wd.path)
    if hidden.exists() and not wd.path.exists():
        os.rename(hidden, wd.path)
    assert swaps > 50, swaps
    assert _intact(bait) == [], "the daemon followed a swapped-in symlink"
    assert d.running and d.request("ping")["pong"]
    print(f"{swaps} swaps while the daemon ran {d.counter('revalidations')} revalidations: bait intact")


# --------------------------------------------------------------------------------------------- socket


def _connect_as(sock: Path, uid: int, gid: int, groups: list[int]) -> subprocess.CompletedProcess[str]:
    setpriv = shutil.which("setpriv")
    assert setpriv is not None
    code = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n"
        f"    s.connect({str(sock)!r})\n"
        "except PermissionError:\n"
        "    sys.exit(13)\n"
        "s.sendall(b'{\"cmd\":\"ping\"}\\n')\n"
        "print(s.recv(200).decode().strip())\n"
    )
    grp_arg = f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups"
    return subprocess.run([setpriv, f"--reuid={uid}", f"--regid={gid}", grp_arg, sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=30)


def test_control_socket_admits_owner_and_group_only(runner: DaemonRunner) -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None or _nobody() is None:
        pytest.skip("needs root, setpriv and a 'nobody' user to act as an outsider")
    import grp

    group = "users" if _has_group("users") else None
    if group is None:
        pytest.skip("needs a 'users' group to stand for the socket's group")
    gid = grp.getgrnam(group).gr_gid
    lib = runner.library()
    make_film_with_work_dir(lib / "Heat", "Heat")
    d = runner.start([Library(lib)], control={"group": group})
    runner.sock_dir.chmod(0o755)  # let outsiders reach the socket file itself: its mode must stop them
    st = os.stat(d.socket)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == gid
    uid, nogroup = _nobody()  # type: ignore[misc]

    outsider = _connect_as(d.socket, uid, nogroup, [])
    assert outsider.returncode == 13, outsider

    member = _connect_as(d.socket, uid, nogroup, [gid])
    assert member.returncode == 0 and '"pong":true' in member.stdout, member

    cli = subprocess.run(
        [shutil.which("setpriv"), f"--reuid={uid}", f"--regid={nogroup}", "--clear-groups",
         str(Path(sys.executable).parent / "cinecutd"), "status", "--socket", str(d.socket)],
        capture_output=True, text=True, timeout=30)
    assert cli.returncode == 4, cli
    assert "permission" in cli.stderr.lower() and "Traceback" not in cli.stderr
    assert d.request("ping")["pong"]


def _has_group(name: str) -> bool:
    import grp

    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False
