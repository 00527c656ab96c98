"""A second ``cinecutd run`` on the same config refuses before it touches anything.

The first daemon is frozen (SIGSTOP) and a film is replaced meanwhile, so the library holds exactly the
kind of change a reconcile would act on: a second instance that scanned before noticing the first one
would delete the stale cache and rewrite the checkpoint. It must exit at once, naming the running one,
and leave every file and folder of the library as it was (bytes, mtime, inode; no new names).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cinecutd.instance import EX_ALREADY_RUNNING
from tests.harness.checks import warm
from tests.harness.films import make_film_with_work_dir
from tests.harness.mutate import new_content, replace_in_place
from tests.harness.runner import REPO, DaemonRunner, Library, daemon_command
from tests.harness.waiting import wait_for


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[DaemonRunner]:
    with DaemonRunner(tmp_path) as r:
        yield r


def _tree(root: Path) -> dict[str, tuple]:
    """Every entry under ``root``: files by content digest, mtime and inode; folders by their names."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        st = d.stat()
        out[str(d)] = ("dir", st.st_mtime_ns, st.st_ino, tuple(sorted(dirnames + filenames)))
        for name in filenames:
            p = d / name
            st = p.lstat()
            out[str(p)] = ("file", hashlib.sha256(p.read_bytes()).hexdigest(), st.st_mtime_ns, st.st_ino)
    return out


def test_a_second_daemon_on_the_same_config_refuses_before_touching_the_library(runner: DaemonRunner) -> None:
    lib = runner.library()
    film = make_film_with_work_dir(lib / "Heat (1995)")
    first = runner.start([Library(lib)], settle_seconds=0.2)
    first.send(signal.SIGSTOP)
    try:
        replace_in_place(film.path, new_content(film.path))  # stale now; only a reconcile would notice
        before = _tree(lib)
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "CINECUTD_CONFIG")}
        second = subprocess.run([*daemon_command(), "run", "--config", str(first.config)], cwd=REPO, env=env,
                                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
        assert second.returncode == EX_ALREADY_RUNNING, second.stdout + second.stderr
        said = second.stdout + second.stderr
        assert "already running" in said and f"pid {first.pid}" in said, said
        assert "reconciled" not in said and "watching" not in said, said
        assert _tree(lib) == before, "the second daemon changed the library"
    finally:
        first.send(signal.SIGCONT)
    # The first one is unharmed: it catches up with the replacement and keeps answering.
    wait_for(lambda: not warm(film), what="the first daemon invalidated the replaced film")
    assert first.status()["films"]["total"] == 1
