"""The control socket server on a real Unix socket: protocol, socket file safety, hostile clients."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cinecutd.control import (
    COMMANDS,
    MAX_OUTPUT_BUFFER,
    ControlError,
    ControlServer,
    ControlSocketError,
    Later,
    Router,
    parse_request,
)


def toy_handler(request: dict[str, Any]) -> dict[str, Any]:
    cmd = request["cmd"]
    if cmd == "ping":
        return {"pong": True}
    if cmd == "echo":
        return {"echo": request}
    if cmd == "refuse":
        raise ControlError("not_found", "no such film")
    if cmd == "boom":
        raise RuntimeError("handler bug")
    if cmd == "notdict":
        return [1, 2]  # type: ignore[return-value]
    if cmd == "unserialisable":
        return {"x": object()}
    if cmd == "path":
        return {"p": Path("/a/b"), "s": {2, 1}}
    if cmd == "slow":  # work done elsewhere (as the daemon hands it to its engine thread)
        seconds = request.get("seconds", 0.6)
        return Later(lambda done: threading.Timer(seconds, done, ({"slept": True}, None)).start())
    if cmd == "stuck":  # the engine never answers in time; its late answer must be dropped
        return Later(lambda done: threading.Timer(0.5, done, ({"late": True}, None)).start(), timeout=0.2,
                     busy_message="still working")
    if cmd == "later_fails":
        return Later(lambda done: done(None, ControlError("not_found", "no such film")))
    if cmd == "engine_busy":
        raise TimeoutError("the daemon is busy; try again")
    raise ControlError("unknown_command", cmd)


class Peer:
    """A raw protocol client with a read deadline."""

    def __init__(self, path: Path, timeout: float = 3.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(self.buf)
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def ask(self, obj: Any) -> dict[str, Any]:
        self.send(json.dumps(obj).encode() + b"\n")
        return self.line()

    def at_eof(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "run" / "cinecutd.sock"


@pytest.fixture
def server(sock_path: Path) -> Iterator[ControlServer]:
    srv = ControlServer(sock_path, toy_handler)
    srv.start()
    yield srv
    srv.close()


# --------------------------------------------------------------------------------------------- protocol


def test_requests_and_answers(server: ControlServer, sock_path: Path) -> None:
    p = Peer(sock_path)
    assert p.ask({"cmd": "ping"}) == {"ok": True, "result": {"pong": True}}
    assert p.ask({"cmd": "echo", "film": "Heat (1995).mkv", "n": 1}) == {
        "ok": True, "result": {"echo": {"cmd": "echo", "film": "Heat (1995).mkv", "n": 1}}}
    assert p.ask({"cmd": "refuse"}) == {"ok": False, "error": {"code": "not_found", "message": "no such film"}}
    assert p.ask({"cmd": "path"})["result"] == {"p": "/a/b", "s": [1, 2]}
    # several requests in one write, CRLF and blank lines tolerated, answers in order
    p.send(b'{"cmd":"ping"}\r\n\n  \n{"cmd":"echo","i":2}\n{"cmd":"echo","i":3}\n')
    assert [p.line()["result"] for _ in range(3)] == [
        {"pong": True}, {"echo": {"cmd": "echo", "i": 2}}, {"echo": {"cmd": "echo", "i": 3}}]
    p.close()


def test_last_request_without_newline_is_answered_at_eof(server: ControlServer, sock_path: Path) -> None:
    p = Peer(sock_path)
    p.send(b'{"cmd":"ping"}\n{"cmd":"echo","last":true}')
    p.sock.shutdown(socket.SHUT_WR)
    assert p.line()["result"] == {"pong": True}
    assert p.line()["result"] == {"echo": {"cmd": "echo", "last": True}}
    assert p.at_eof()


@pytest.mark.parametrize("raw", [
    b"garbage", b"[1, 2]", b'"status"', b"{}", b'{"cmd": 5}', b'{"cmd": "ping"', b"\xff\xfe{}",
    b'{"cmd": "ping", "x": NaN}', b'{"cmd": "ping", "n": ' + b"9" * 5000 + b"}",
    b"[" * 20000 + b"]" * 20000,
])
def test_malformed_requests_are_bad_request_and_the_connection_lives_on(
        server: ControlServer, sock_path: Path, raw: bytes) -> None:
    p = Peer(sock_path)
    p.send(raw + b"\n")
    reply = p.line()
    assert reply["ok"] is False and reply["error"]["code"] == "bad_request", reply
    assert reply["error"]["message"]
    assert p.ask({"cmd": "ping"})["ok"] is True
    p.close()


def test_handler_failures_become_internal_errors_and_the_server_goes_on(
        server: ControlServer, sock_path: Path) -> None:
    p = Peer(sock_path)
    for cmd in ("boom", "notdict", "unserialisable"):
        err = p.ask({"cmd": cmd})
        assert err["ok"] is False and err["error"]["code"] == "internal", err
    assert "handler bug" in p.ask({"cmd": "boom"})["error"]["message"]
    assert p.ask({"cmd": "ping"})["ok"] is True
    assert server.stats["errors"] >= 4


def test_a_slow_command_does_not_block_other_clients(sock_path: Path) -> None:
    with ControlServer(sock_path, toy_handler, request_timeout=0.2):
        slow = Peer(sock_path)
        slow.send(b'{"cmd": "slow", "seconds": 0.5}\n{"cmd": "ping"}\n')
        time.sleep(0.05)
        t0 = time.monotonic()
        other = Peer(sock_path)
        assert other.ask({"cmd": "ping"})["ok"] and other.ask({"cmd": "engine_busy"})["error"] == {
            "code": "busy", "message": "the daemon is busy; try again"}
        assert time.monotonic() - t0 < 0.1
        # the slow client is not timed out while the daemon works for it, and its answers stay in order;
        # the server idles meanwhile (its deadline has passed, but it must not spin on it)
        cpu = time.process_time()
        assert slow.line() == {"ok": True, "result": {"slept": True}}
        assert time.process_time() - cpu < 0.15
        assert slow.line() == {"ok": True, "result": {"pong": True}}


def test_engine_answers_arrive_by_callback_without_worker_threads(sock_path: Path) -> None:
    """No thread of the server waits for the engine: an answer that does not come in time is "busy" (with the
    command's own message), the late one is dropped, and the client's next answers stay in order."""
    before = {t.name for t in threading.enumerate()}
    with ControlServer(sock_path, toy_handler) as srv:
        grown = {t.name for t in threading.enumerate()} - before
        assert grown == {"cinecutd-control"}, grown  # the selector thread only, no worker pool
        p = Peer(sock_path)
        p.send(b'{"cmd": "stuck"}\n{"cmd": "echo", "i": 1}\n')
        t0 = time.monotonic()
        assert p.line() == {"ok": False, "error": {"code": "busy", "message": "still working"}}
        assert 0.15 <= time.monotonic() - t0 < 0.45
        assert p.line() == {"ok": True, "result": {"echo": {"cmd": "echo", "i": 1}}}
        time.sleep(0.5)  # the stuck request's answer arrives now and must not reach the client
        assert p.ask({"cmd": "later_fails"}) == {"ok": False, "error": {"code": "not_found", "message": "no such film"}}
        assert p.ask({"cmd": "ping"}) == {"ok": True, "result": {"pong": True}}
        assert srv.stats["errors"] >= 2


def test_oversized_request_is_refused_then_closed(sock_path: Path) -> None:
    with ControlServer(sock_path, toy_handler, max_request_bytes=1024):
        p = Peer(sock_path)
        p.send(json.dumps({"cmd": "echo", "x": "a" * 2000}).encode() + b"\n")
        reply = p.line()
        assert reply["error"]["code"] == "too_large" and "1024" in reply["error"]["message"]
        assert p.at_eof()
        # without any newline at all
        p = Peer(sock_path)
        p.send(b"x" * 5000)
        assert p.line()["error"]["code"] == "too_large"
        assert p.at_eof()
        # a request of exactly the limit is fine
        p = Peer(sock_path)
        body = json.dumps({"cmd": "echo", "x": ""}).encode()
        req = json.dumps({"cmd": "echo", "x": "a" * (1024 - len(body))}).encode()
        assert len(req) == 1024
        p.send(req + b"\n")
        assert p.line()["ok"] is True


def test_slow_and_silent_clients_are_cut_off_at_the_deadline(sock_path: Path) -> None:
    with ControlServer(sock_path, toy_handler, request_timeout=0.3) as srv:
        silent, partial = Peer(sock_path), Peer(sock_path)
        partial.send(b'{"cmd": "pi')
        t0 = time.monotonic()
        for p in (silent, partial):
            reply = p.line()
            assert reply["error"]["code"] == "timeout"
            assert p.at_eof()
        assert 0.25 <= time.monotonic() - t0 < 1.5
        # a connection used for several requests gets a fresh deadline after each answer
        p = Peer(sock_path)
        for _ in range(4):
            time.sleep(0.15)
            assert p.ask({"cmd": "ping"})["ok"] is True
        p.close()
        deadline = time.monotonic() + 2
        while srv.client_count and time.monotonic() < deadline:
            time.sleep(0.01)
        assert srv.client_count == 0


def test_client_limit(sock_path: Path) -> None:
    with ControlServer(sock_path, toy_handler, max_clients=3) as srv:
        held = [Peer(sock_path) for _ in range(3)]
        for p in held:
            assert p.ask({"cmd": "ping"})["ok"]
        extra = Peer(sock_path)
        assert extra.line()["error"]["code"] == "busy"
        assert extra.at_eof()
        held.pop().close()
        deadline = time.monotonic() + 2
        while srv.client_count > 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert Peer(sock_path).ask({"cmd": "ping"})["ok"]


def test_a_client_that_never_reads_has_bounded_buffers(server: ControlServer, sock_path: Path) -> None:
    flood = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    flood.connect(str(sock_path))
    flood.setblocking(False)
    line = b'{"cmd":"echo","pad":"' + b"p" * 200 + b'"}\n'
    sent = 0
    blocked_since = None
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        try:
            sent += flood.send(line * 64)
            blocked_since = None
        except BlockingIOError:
            blocked_since = blocked_since or time.monotonic()
            if time.monotonic() - blocked_since > 0.3:
                break  # the server stopped reading from it: back pressure, not unbounded buffering
            time.sleep(0.005)
    assert blocked_since is not None, "the server kept reading from a client that never reads"
    assert MAX_OUTPUT_BUFFER / 2 < sent < 4 * MAX_OUTPUT_BUFFER
    time.sleep(0.2)
    for conn in list(server._conns.values()):
        assert len(conn.outbuf) <= MAX_OUTPUT_BUFFER + 65536 * 2
        assert len(conn.inbuf) <= 65536 * 2 + server.max_request_bytes
    t0 = time.monotonic()
    assert Peer(sock_path).ask({"cmd": "ping"})["ok"]
    assert time.monotonic() - t0 < 0.1
    flood.close()


def test_fifty_hostile_clients_do_not_delay_a_ping(server: ControlServer, sock_path: Path) -> None:
    """Silent, partial, slow-loris, oversized, garbage, flooding and half-open clients at once."""
    hostile: list[socket.socket] = []

    def connect() -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(sock_path))
        s.setblocking(False)
        hostile.append(s)
        return s

    for _ in range(10):  # silent
        connect()
    for _ in range(10):  # a request that never ends
        connect().send(b'{"cmd": "status", "film": "')
    lorises = [connect() for _ in range(10)]
    for _ in range(5):  # oversized
        s = connect()
        try:
            s.send(b"A" * 200_000)
        except BlockingIOError:
            pass
    garbage = bytes(range(256)) * 4
    for _ in range(5):  # binary garbage with newlines, never reading the error answers
        connect().send((garbage + b"\n") * 20)
    floods = [connect() for _ in range(5)]  # pipelined pings, never reading
    for _ in range(5):  # half-open: a partial request, then shutdown of the writing side
        s = connect()
        s.send(b'{"cmd": "pi')
        s.shutdown(socket.SHUT_WR)
    assert len(hostile) == 50

    stop = threading.Event()

    def torment() -> None:
        while not stop.is_set():
            for s in lorises:
                try:
                    s.send(b"x")
                except OSError:
                    pass
            for s in floods:
                try:
                    s.send(b'{"cmd":"ping"}\n' * 500)
                except OSError:
                    pass
            time.sleep(0.01)

    t = threading.Thread(target=torment, daemon=True)
    t.start()
    try:
        time.sleep(0.3)
        assert server.client_count >= 35  # the hostile ones are still connected while we measure
        latencies = []
        for _ in range(20):
            t0 = time.monotonic()
            p = Peer(sock_path)
            assert p.ask({"cmd": "ping"}) == {"ok": True, "result": {"pong": True}}
            latencies.append(time.monotonic() - t0)
            p.close()
        keep = Peer(sock_path)
        for _ in range(20):
            t0 = time.monotonic()
            assert keep.ask({"cmd": "ping"})["ok"]
            latencies.append(time.monotonic() - t0)
        print(f"ping under attack: max {max(latencies) * 1000:.2f} ms, median {sorted(latencies)[20] * 1000:.2f} ms")
        assert max(latencies) < 0.1, f"ping latencies under attack: max {max(latencies) * 1000:.1f} ms"
    finally:
        stop.set()
        t.join()
        for s in hostile:
            s.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=400))
def test_fuzzed_lines_get_exactly_one_well_formed_answer(server: ControlServer, sock_path: Path,
                                                          blob: bytes) -> None:
    p = Peer(sock_path)
    line = blob.replace(b"\n", b" ")
    p.send(line + b"\n" + b'{"cmd":"ping"}\n')
    if line.strip():
        first = p.line()
        assert set(first) in ({"ok", "result"}, {"ok", "error"})
        if not first["ok"]:
            assert set(first["error"]) == {"code", "message"}
    assert p.line() == {"ok": True, "result": {"pong": True}}
    p.close()


@given(st.binary(max_size=200))
def test_parse_request_only_raises_bad_request(blob: bytes) -> None:
    try:
        req = parse_request(blob)
    except ControlError as e:
        assert e.code == "bad_request"
    else:
        assert isinstance(req, dict) and isinstance(req["cmd"], str)


# --------------------------------------------------------------------------------------------- router


def test_router_checks_commands_and_arguments(sock_path: Path) -> None:
    calls: list[tuple[str, dict[str, Any]]] = []

    def status(film: str | None = None) -> dict[str, Any]:
        calls.append(("status", {"film": film}))
        return {"film": film}

    def prewarm(film: str, now: bool = False, retry: bool = False) -> dict[str, Any]:
        calls.append(("prewarm", {"film": film, "now": now, "retry": retry}))
        return {"queued": True}

    with pytest.raises(ValueError, match="frobnicate"):
        Router({"frobnicate": lambda: {}})
    with ControlServer(sock_path, Router({"status": status, "prewarm": prewarm})):
        p = Peer(sock_path)
        assert p.ask({"cmd": "ping"})["result"]["pong"] is True  # built in
        assert p.ask({"cmd": "status"})["result"] == {"film": None}
        assert p.ask({"cmd": "status", "film": "/f.mkv"})["result"] == {"film": "/f.mkv"}
        assert p.ask({"cmd": "prewarm", "film": "/f.mkv", "now": True})["ok"]
        assert calls[-1] == ("prewarm", {"film": "/f.mkv", "now": True, "retry": False})
        n = len(calls)
        for bad, code, text in [
            ({"cmd": "gc"}, "unknown_command", "unknown command 'gc'"),
            ({"cmd": "launch"}, "unknown_command", "known: ping, prewarm, status"),
            ({"cmd": "status", "film": 3}, "bad_request", "'film' must be a string"),
            ({"cmd": "status", "verbose": True}, "bad_request", "unknown argument 'verbose'"),
            ({"cmd": "prewarm"}, "bad_request", "missing argument 'film'"),
            ({"cmd": "prewarm", "film": "/f", "now": "yes"}, "bad_request", "'now' must be a boolean"),
            ({"cmd": "prewarm", "film": "/f", "now": 1}, "bad_request", "'now' must be a boolean"),
        ]:
            err = p.ask(bad)["error"]
            assert err["code"] == code and text in err["message"], (bad, err)
        assert len(calls) == n  # no handler ran for a refused request


# --------------------------------------------------------------------------------------------- socket file


def test_socket_mode_and_parent_dir_do_not_depend_on_the_umask(sock_path: Path) -> None:
    old = os.umask(0)
    try:
        srv = ControlServer(sock_path, toy_handler)
        srv.start()
    finally:
        os.umask(old)
    try:
        st_ = os.lstat(sock_path)
        assert stat.S_ISSOCK(st_.st_mode) and stat.S_IMODE(st_.st_mode) == 0o660
        assert stat.S_IMODE(os.stat(sock_path.parent).st_mode) == 0o755
        assert os.listdir(sock_path.parent) == [sock_path.name]  # no temp dir left behind
    finally:
        srv.close()
    old = os.umask(0o077)
    try:
        with ControlServer(sock_path.parent / "deeper" / "c.sock", toy_handler, mode=0o600) as srv:
            assert stat.S_IMODE(os.lstat(srv.path).st_mode) == 0o600
            assert stat.S_IMODE(os.stat(srv.path.parent).st_mode) == 0o755
    finally:
        os.umask(old)


def test_close_removes_the_socket_file(sock_path: Path) -> None:
    srv = ControlServer(sock_path, toy_handler)
    srv.start()
    assert sock_path.exists()
    srv.close()
    assert not os.path.lexists(sock_path)
    with pytest.raises(OSError):
        Peer(sock_path)


def test_stale_socket_of_a_dead_daemon_is_replaced(sock_path: Path) -> None:
    sock_path.parent.mkdir()
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(sock_path))
    dead.close()  # the file stays, nobody listens: connect gives ECONNREFUSED
    assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
    with ControlServer(sock_path, toy_handler):
        assert Peer(sock_path).ask({"cmd": "ping"})["ok"]


def test_a_live_daemon_socket_is_not_stolen(server: ControlServer, sock_path: Path) -> None:
    with pytest.raises(ControlSocketError, match="already listening"):
        ControlServer(sock_path, toy_handler).start()
    assert Peer(sock_path).ask({"cmd": "ping"})["ok"]


@pytest.mark.parametrize("kind", ["file", "dir", "symlink", "fifo"])
def test_non_socket_files_are_never_replaced(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "cinecutd.sock"
    target = tmp_path / "precious.txt"
    target.write_text("user data")
    if kind == "file":
        path.write_text("not a socket")
    elif kind == "dir":
        path.mkdir()
    elif kind == "symlink":
        path.symlink_to(target)
    else:
        os.mkfifo(path)
    before = os.lstat(path)
    with pytest.raises(ControlSocketError, match="refusing to replace it"):
        ControlServer(path, toy_handler).start()
    after = os.lstat(path)
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    assert target.read_text() == "user data"
    assert sorted(os.listdir(tmp_path)) == ["cinecutd.sock", "precious.txt"]


def test_close_leaves_a_successors_socket_alone(sock_path: Path) -> None:
    first = ControlServer(sock_path, toy_handler)
    first.start()
    os.unlink(sock_path)  # e.g. an admin removed it, and a new daemon took the path
    with ControlServer(sock_path, toy_handler):
        first.close()
        assert Peer(sock_path).ask({"cmd": "ping"})["ok"]


def test_overlong_socket_path_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / ("d" * 120) / "cinecutd.sock"
    with pytest.raises(ControlSocketError, match="too long"):
        ControlServer(path, toy_handler).start()


def test_protocol_doc_covers_every_command_and_error_code() -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "protocol.md").read_text()
    for cmd, args in COMMANDS.items():
        assert f"`{cmd}`" in doc, cmd
        for arg in args:
            assert f"`{arg}`" in doc, (cmd, arg)
    for code in ("bad_request", "unknown_command", "too_large", "timeout", "busy", "internal"):
        assert f"| `{code}` |" in doc, code
