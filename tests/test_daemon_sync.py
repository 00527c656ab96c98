"""``sync``: a cookie file's event proves every earlier change in a root was handled (cinecutd.cookies).

A real ``cinecutd run`` on a real library: the test changes films, syncs, and asserts at once, with no
sleep and no poll-until; the answer itself is the proof. Polled roots answer after a poll that started
after the request.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cinecutd.client import DaemonError
from tests.harness.checks import video_invalidated
from tests.harness.films import make_film_with_work_dir
from tests.harness.mutate import replace_in_place
from tests.harness.runner import DaemonRunner, Library, daemon_command


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[DaemonRunner]:
    with DaemonRunner(tmp_path) as r:
        yield r


@pytest.mark.parametrize("mode", ["inotify", "poll"])
def test_sync_answers_once_every_earlier_change_was_handled(runner: DaemonRunner, mode: str) -> None:
    lib = runner.library()
    films = [make_film_with_work_dir(lib / f"Film {i} (2001)", f"Film {i} (2001)") for i in range(4)]
    d = runner.start([Library(lib, watch=mode, poll_interval=0.5)], settle_seconds=0)
    for f in films:
        replace_in_place(f.path)
    [answer] = d.sync(lib)
    assert answer["synced"] is True and answer["root"] == str(lib) and answer["watch"] == mode
    for f in films:  # no wait_for: the answer came after these events were handled
        assert d.film_status(f.path)["last_event"] is not None, f.path
        assert video_invalidated(f), f.path
    assert not [p for p in os.listdir(lib) if p.startswith(".cinecutd-cookie-")]  # the daemon removed it
    assert d.status()["counters"].get("errors", 0) == 0


def test_sync_of_every_root_and_from_the_cli(runner: DaemonRunner) -> None:
    a, b = runner.library("films"), runner.library("shows")
    film = make_film_with_work_dir(b / "Heat (1995)")
    d = runner.start([Library(a), Library(b)], settle_seconds=0)
    replace_in_place(film.path)
    assert sorted(r["root"] for r in d.sync()) == sorted([str(a), str(b)])
    assert d.film_status(film.path)["last_event"] is not None
    out = subprocess.run([*daemon_command(), "sync", "--socket", str(d.socket), str(a)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert not [p for p in os.listdir(a) if p.startswith(".cinecutd-cookie-")]


def test_sync_refuses_what_is_not_a_cookie_in_a_library(runner: DaemonRunner, tmp_path: Path) -> None:
    lib = runner.library()
    d = runner.start([Library(lib)], settle_seconds=0)
    for cookie, code in [
        (str(lib / "Heat (1995).mkv"), "bad_request"),  # never a user's file
        (".cinecutd-cookie-1-1", "bad_request"),  # relative
        (str(tmp_path / ".cinecutd-cookie-1-1"), "not_found"),  # outside every library
    ]:
        with pytest.raises(DaemonError) as exc:
            d.request("sync", cookie=cookie)
        assert exc.value.code == code, (cookie, exc.value)
    assert d.request("ping")["pong"] is True
