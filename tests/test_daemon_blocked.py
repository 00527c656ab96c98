"""Blocked films and `cinecutd status --check`, with the real daemon.

A box where the service cannot read upstream's 0600 checkpoint (CineCut run by the library's owner, the
service as its own user) must never fail silently: the film is shown as ``blocked: <why>; <remedy>``, a
warning with path and errno is logged once, ``status --check`` exits 6, and once permissions allow, the
retry resets the stale stages without a restart. As root the daemon runs as ``nobody`` and upstream as
another uid; unprivileged, both are this user and the files are made unreadable with chmod.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import upstream_reader
from upstream_user import OTHER_GID, OTHER_UID, chown_tree, run_as, upstream_resume_reuses

from cinecut.workdir import CHECKPOINT_NAME
from tests.harness.films import make_film, make_film_with_work_dir
from tests.harness.runner import DaemonRunner, Library, daemon_command, render_config, unprivileged_problem
from tests.harness.waiting import wait_for

ROOT = os.geteuid() == 0


def check(socket: Path) -> subprocess.CompletedProcess[str]:
    """`cinecutd status --check`, as a monitoring probe runs it."""
    return subprocess.run([*daemon_command(), "status", "--check", "--socket", str(socket)],
                          capture_output=True, text=True, timeout=30)


def _replace(film: Path) -> None:
    tmp = film.with_name(film.name + ".part")
    tmp.write_bytes(os.urandom(70_000))
    os.replace(tmp, film)


def test_unreadable_upstream_files_block_the_film_until_permissions_allow() -> None:
    if ROOT and (why := unprivileged_problem("nobody")):
        pytest.skip(f"the daemon cannot run unprivileged here: {why}")
    with DaemonRunner(public=True) as runner:
        lib = runner.library()
        film = make_film(lib / "Heat (1995)", "Heat (1995)").path
        if ROOT:
            chown_tree(lib, OTHER_UID, OTHER_GID)
            wd = run_as(OTHER_UID, OTHER_GID, upstream_reader.run_pipeline, film)
        else:
            old = os.umask(0o022)
            try:
                wd = upstream_reader.run_pipeline(film)
            finally:
                os.umask(old)
            (wd / CHECKPOINT_NAME).chmod(0o000)
            (wd / "Heat (1995).scenedesc.msgpack").chmod(0o000)
            for d in (wd, wd / "keyframes"):
                d.chmod(0o555)
        try:
            d = runner.start([Library(lib)], user="nobody" if ROOT else None)
            # blocked from the start: its stages cannot be checked, let alone reset
            wait_for(lambda: d.status()["films"]["blocked"] == 1, what="the film shown as blocked")
            detail = d.film_status(film)
            assert detail["blocked"].startswith(f"blocked: {wd / CHECKPOINT_NAME}: ")
            assert "EACCES" in detail["blocked"] and "cinecutd systemd-dropin --run-as" in detail["blocked"]
            assert any(p["path"] == str(wd) and p["errno"] == "EACCES" for p in detail["problems"])
            warned = d.logs("blocked")
            assert warned and all(r["level"] == "warning" for r in warned)
            assert {r["path"] for r in warned} >= {str(wd / CHECKPOINT_NAME), str(wd)}
            assert all(r["errno"] and r["remedy"] for r in warned)
            r = check(runner.socket)
            assert r.returncode == 6 and str(film) in r.stdout, (r.returncode, r.stdout, r.stderr)

            # the film is replaced: nothing can be reset, and the daemon keeps saying so
            _replace(film)
            d.sync()  # the replacement's events were handled
            assert d.film_status(film)["last_event"] is not None
            assert d.film_status(film)["blocked"] and check(runner.socket).returncode == 6
            n_warned = len(d.logs("blocked"))

            # permissions fixed: the retry resets the stale stages, no restart needed
            if ROOT:
                subprocess.run(["chmod", "-R", "a+rwX", str(wd)], check=True)
            else:
                for d_ in (wd, wd / "keyframes"):
                    d_.chmod(0o755)
                (wd / CHECKPOINT_NAME).chmod(0o600)
                (wd / "Heat (1995).scenedesc.msgpack").chmod(0o600)
            wait_for(lambda: d.status()["films"]["blocked"] == 0, timeout=30, what="the retry to unblock it")
            assert not (wd / "Heat (1995)_proxy.mp4").exists()
            assert upstream_resume_reuses(wd) == []
            ckpt = upstream_reader.load_checkpoint_strict(wd)
            assert "proxy" not in ckpt.stages_complete and "keyframes" not in ckpt.stages_complete
            assert d.logs("unblocked") and len(d.logs("blocked")) == n_warned  # each problem warned once
            r = check(runner.socket)
            assert r.returncode == 0 and r.stdout.startswith("healthy"), (r.stdout, r.stderr)
        finally:
            for d_ in (wd, wd / "keyframes"):
                if d_.exists():
                    d_.chmod(0o755)


def test_a_half_done_invalidation_is_finished_by_the_retry() -> None:
    """The work dir is writable but its keyframes folder is not: the replacement resets the checkpoint and
    deletes the cache, the old frames stay (upstream would reuse them: it extracts only missing frames).
    The film is blocked until the retry, once the folder is writable, deletes them."""
    if ROOT and (why := unprivileged_problem("nobody")):
        pytest.skip(f"the daemon cannot run unprivileged here: {why}")
    with DaemonRunner(public=True) as runner:
        lib = runner.library()
        film = make_film(lib / "Heat (1995)", "Heat (1995)").path
        if ROOT:
            chown_tree(lib, OTHER_UID, OTHER_GID)
            wd = run_as(OTHER_UID, OTHER_GID, upstream_reader.run_pipeline, film)
        else:
            wd = upstream_reader.run_pipeline(film)
        for name in (CHECKPOINT_NAME, "Heat (1995).scenedesc.msgpack"):
            (wd / name).chmod(0o666)
        wd.chmod(0o777)
        frames = wd / "keyframes"
        frames.chmod(0o755 if ROOT else 0o555)
        try:
            d = runner.start([Library(lib)], user="nobody" if ROOT else None)
            assert check(runner.socket).returncode == 0
            _replace(film)
            wait_for(lambda: d.status()["films"]["blocked"] == 1, what="the half-done invalidation reported")
            assert list(frames.glob("frame_*.jpg")) and not (wd / "Heat (1995).scenedesc.msgpack").exists()
            assert "keyframes/frame_" in d.film_status(film)["blocked"]
            assert check(runner.socket).returncode == 6
            frames.chmod(0o777)
            wait_for(lambda: d.status()["films"]["blocked"] == 0, timeout=30, what="the retry to finish it")
            assert not list(frames.glob("frame_*.jpg"))
            assert check(runner.socket).returncode == 0
        finally:
            if frames.exists():
                frames.chmod(0o755)


def test_status_check_codes(tmp_path: Path) -> None:
    """0 healthy, 5 a root missing, 3 the daemon down: what a monitor or a container health check sees."""
    with DaemonRunner(tmp_path) as runner:
        lib = runner.library()
        make_film_with_work_dir(lib / "Heat (1995)", "Heat (1995)")
        d = runner.start([Library(lib)])
        r = check(runner.socket)
        assert (r.returncode, r.stdout.strip()) == (0, "healthy"), r.stderr

        unplugged = runner.base / "unplugged"
        unplugged.mkdir()
        d.reload(render_config([Library(lib), Library(unplugged)], socket=runner.socket))
        wait_for(lambda: any(x["path"] == str(unplugged) and x["state"] == "watching"
                             for x in d.status()["roots"]), what="the second root watched")
        assert check(runner.socket).returncode == 0
        shutil.rmtree(unplugged)
        wait_for(lambda: check(runner.socket).returncode == 5, what="a missing root reported")
        assert f"root {unplugged}: missing" in check(runner.socket).stdout

        d.stop()
        r = check(runner.socket)
        assert r.returncode == 3 and "not running" in r.stdout
