"""The running daemon's control socket under hostile clients, its CLI exit codes, and its signals.

Garbage, oversized, nested and silent clients get errors (or are cut off) while ``status`` keeps
answering; SIGTERM and SIGINT stop it with exit 0 within 5 s, also in the middle of a storm; SIGHUP
reloads, and a broken config on reload keeps the running one.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.checks import video_invalidated
from tests.harness.films import make_film_with_work_dir
from tests.harness.mutate import replace_in_place, slow_copy
from tests.harness.runner import DaemonRunner, Library, daemon_command, raw_exchange, render_config
from tests.harness.waiting import wait_for


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[DaemonRunner]:
    with DaemonRunner(tmp_path) as r:
        yield r


def _replies(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.splitlines() if line.strip()]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*daemon_command(), *args], capture_output=True, text=True, timeout=30)


# --------------------------------------------------------------------------------------------- control


def test_garbage_requests_are_answered_with_errors(runner: DaemonRunner) -> None:
    lib = runner.library()
    make_film_with_work_dir(lib / "Heat (1995)", "Heat (1995)")
    d = runner.start([Library(lib)], control={"max_request_bytes": 1024, "request_timeout": 1.0})

    cases = {
        b"garbage\n": "bad_request",
        b"\xff\xfe\x00\x01\n": "bad_request",
        b"[1, 2, 3]\n": "bad_request",
        b'{"cmd": 42}\n': "bad_request",
        b'{"cmd": "status", "film": 7}\n': "bad_request",
        b'{"cmd": "status", "nope": true}\n': "bad_request",
        b'{"cmd": "format_disk"}\n': "unknown_command",
        b"[" * 500 + b"]" * 500 + b"\n": "bad_request",
        b'{"cmd": "status", "x": NaN}\n': "bad_request",
    }
    for payload, code in cases.items():
        replies = _replies(raw_exchange(d.socket, payload))
        assert len(replies) == 1 and replies[0]["ok"] is False, payload
        assert replies[0]["error"]["code"] == code, (payload, replies)
    # Several requests on one connection, one bad among good ones: each answered, in order.
    replies = _replies(raw_exchange(d.socket, b'{"cmd":"ping"}\nnonsense\n{"cmd":"status"}\n'))
    assert [r["ok"] for r in replies] == [True, False, True]
    assert d.status()["films"]["total"] == 1


def test_oversized_and_silent_clients_do_not_block_status(runner: DaemonRunner) -> None:
    lib = runner.library()
    film = make_film_with_work_dir(lib / "Heat (1995)", "Heat (1995)")
    d = runner.start([Library(lib)], control={"max_request_bytes": 1024, "request_timeout": 1.0})

    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.connect(str(d.socket))
    silent.sendall(b'{"cmd": "sta')  # never finishes its request
    try:
        t0 = time.monotonic()
        assert d.status()["films"]["total"] == 1
        assert time.monotonic() - t0 < 1.0

        big = raw_exchange(d.socket, b'{"cmd": "status", "film": "' + b"x" * 200_000 + b'"}\n')
        replies = _replies(big)
        assert replies and replies[0]["error"]["code"] == "too_large"

        # The silent client is cut off after its request timeout; the daemon is unharmed.
        silent.settimeout(5)
        answer = silent.recv(65536)
        assert answer == b"" or json.loads(answer.splitlines()[0])["ok"] is False
    finally:
        silent.close()
    replace_in_place(film.path)
    wait_for(lambda: video_invalidated(film), what="still invalidating")
    assert d.running


def test_many_concurrent_clients_all_get_answers(runner: DaemonRunner) -> None:
    lib = runner.library()
    for i in range(5):
        make_film_with_work_dir(lib / f"Film {i}", f"Film {i}")
    d = runner.start([Library(lib)])
    results: list[int] = []
    errors: list[BaseException] = []

    def ask() -> None:
        try:
            for _ in range(5):
                results.append(d.status()["films"]["total"])
        except BaseException as e:  # collected for the assertion below
            errors.append(e)

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [] and results == [5] * 40


def test_cli_status_exit_codes(runner: DaemonRunner) -> None:
    lib = runner.library()
    film = make_film_with_work_dir(lib / "Heat (1995)", "Heat (1995)")
    config = runner.config([Library(lib)])

    before = _cli("status", "--config", str(config))
    assert before.returncode == 3 and "not running" in before.stderr

    d = runner.daemon(config).start()
    ok = _cli("status", "--config", str(config), "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["films"]["total"] == 1
    one = _cli("status", "--socket", str(d.socket), "--json", str(film.path))
    assert one.returncode == 0 and json.loads(one.stdout)["cache"]["state"] == "valid"
    human = _cli("status", "--socket", str(d.socket))
    assert human.returncode == 0 and str(lib) in human.stdout
    missing = _cli("status", "--socket", str(d.socket), str(lib / "No Such Film.mkv"))
    assert missing.returncode == 1 and "not_found" in missing.stderr

    rc, _ = d.stop()
    assert rc == 0 and not d.socket.exists()  # the socket file goes with the daemon
    after = _cli("status", "--socket", str(d.socket))
    assert after.returncode == 3 and "not running" in after.stderr


# --------------------------------------------------------------------------------------------- signals


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signals_exit_zero_within_five_seconds(runner: DaemonRunner, sig: int) -> None:
    lib = runner.library()
    make_film_with_work_dir(lib / "Heat (1995)", "Heat (1995)")
    d = runner.start([Library(lib), Library(runner.library("polled"), watch="poll")])
    rc, took = d.stop(sig)
    assert rc == 0 and took < 5.0
    assert [r["event"] for r in d.logs()][-2:] == ["stopping", "stopped"]


def test_sigterm_during_a_storm_stops_cleanly(runner: DaemonRunner) -> None:
    lib = runner.library()
    film = make_film_with_work_dir(lib / "Heat (1995)", "Heat (1995)")
    d = runner.start([Library(lib)])
    stop = threading.Event()
    writer = threading.Thread(target=slow_copy, args=(film.path, 64 << 20),
                              kwargs={"chunk": 16384, "pause": 0.001, "stop": stop})
    writer.start()
    try:
        wait_for(lambda: d.counter("events") > 5, what="storm under way")
        rc, took = d.stop()
    finally:
        stop.set()
        writer.join(30)
    assert rc == 0 and took < 5.0


def test_sighup_reload_with_a_broken_config_keeps_the_running_one(runner: DaemonRunner) -> None:
    lib = runner.library()
    film = make_film_with_work_dir(lib / "Heat (1995)", "Heat (1995)")
    d = runner.start([Library(lib)])

    d.reload('[[library]]\npath = "relative/path"\n')
    wait_for(lambda: d.logs("reload_failed"), what="reload failure logged")
    assert "library[0].path" in d.logs("reload_failed")[0]["error"]
    assert d.running and d.status()["films"]["total"] == 1

    replace_in_place(film.path)
    wait_for(lambda: video_invalidated(film), what="still watching with the old config")

    other = runner.library("other")
    film2 = make_film_with_work_dir(other / "Ronin (1998)", "Ronin (1998)")
    d.reload(render_config([Library(lib), Library(other)], socket=d.socket, log_level="info"))
    wait_for(lambda: d.status()["films"]["total"] == 2, what="good config applied")
    replace_in_place(film2.path)
    wait_for(lambda: video_invalidated(film2), what="new root watched")
    assert d.pid == d.proc.pid and os.path.exists(d.socket)  # same process, same socket
