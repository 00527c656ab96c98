"""The control protocol of the REAL daemon under fuzzed, oversized, slow and numerous clients.

test_control.py exercises ControlServer in-process; this file goes through ``cinecutd run``: the same
socket a user's ``cinecutd status`` uses, with the daemon's real handlers (status, film lookups, rescan,
gc) behind it. Every request line gets exactly one well-formed answer, no input crashes or wedges the
daemon, hostile clients cannot delay a well-behaved one, and afterwards the daemon's descriptors and
memory are back where they were and the library is untouched.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cinecutd.control import COMMANDS
from tests.harness.checks import warm
from tests.harness.films import make_film_with_work_dir
from tests.harness.runner import Daemon, DaemonRunner, Library, raw_exchange

MAX_REQUEST = 4096
TIMEOUT_S = 1.0
CODES = {"bad_request", "unknown_command", "too_large", "timeout", "busy", "internal", "not_found", "ambiguous",
         "prewarm_disabled"}


@pytest.fixture
def live(tmp_path: Path) -> Iterator[tuple[Daemon, list]]:
    with DaemonRunner(tmp_path) as r:
        lib = r.library()
        films = [make_film_with_work_dir(lib / f"Film {i}", f"Film {i}") for i in range(3)]
        d = r.start([Library(lib)], log_level="warning",
                    control={"max_request_bytes": MAX_REQUEST, "request_timeout": TIMEOUT_S})
        yield d, films
        assert d.running and d.request("ping")["pong"]
        assert all(warm(f) for f in films)


class Conn:
    """A raw protocol connection (one line out, one line back)."""

    def __init__(self, path: Path, timeout: float = 5.0) -> None:
        self.path, self.timeout = path, timeout
        self._connect()

    def _connect(self) -> None:
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(self.timeout)
        self.s.connect(str(self.path))
        self.buf = b""

    def ask(self, data: bytes) -> dict:
        """One request, one answer. A connection idle longer than the request deadline (hypothesis
        thinking between examples on a loaded machine) is closed by the daemon, as documented: reconnect."""
        try:
            self.send(data)
            return self.line()
        except (BrokenPipeError, ConnectionError):
            self.close()
            self._connect()
            self.send(data)
            return self.line()

    def send(self, data: bytes) -> None:
        self.s.sendall(data)

    def line(self) -> dict:
        while b"\n" not in self.buf:
            chunk = self.s.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed; buffered {self.buf[:200]!r}")
            self.buf += chunk
        raw, self.buf = self.buf.split(b"\n", 1)
        raw.decode("ascii")  # answers are ASCII-only JSON
        return json.loads(raw)

    def close(self) -> None:
        self.s.close()


def _well_formed(ans: dict) -> None:
    assert set(ans) in ({"ok", "result"}, {"ok", "error"}), ans
    if ans["ok"]:
        assert isinstance(ans["result"], dict)
    else:
        assert set(ans["error"]) == {"code", "message"} and ans["error"]["code"] in CODES, ans
        assert isinstance(ans["error"]["message"], str) and ans["error"]["message"]


arg_values = st.one_of(st.none(), st.booleans(), st.integers(-(2**64), 2**64), st.floats(allow_nan=False),
                       st.text(max_size=40), st.lists(st.integers(), max_size=3),
                       st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
                       st.sampled_from(["Film 1", "film", "/", "..", "\x00", "Film", "é" * 30]))
requests = st.fixed_dictionaries(
    {"cmd": st.one_of(st.sampled_from(sorted(COMMANDS)), st.text(max_size=12))},
    optional={"film": arg_values, "apply": arg_values, "now": arg_values, "retry": arg_values,
              "extra": arg_values},
)


def test_fuzzed_requests_each_get_one_answer(live: tuple[Daemon, list]) -> None:
    d, _ = live
    conn = Conn(d.socket)
    seen: set[str] = set()

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
    @given(req=requests)
    def ask(req: dict) -> None:
        if req.get("cmd") == "gc" and req.get("apply") is True:
            req["apply"] = False  # the library has no orphans; keep the run about the protocol
        ans = conn.ask(json.dumps(req).encode() + b"\n")
        _well_formed(ans)
        seen.add("ok" if ans["ok"] else ans["error"]["code"])

    ask()
    conn.close()
    assert {"ok", "bad_request", "unknown_command"} <= seen, seen


def test_fuzzed_lines_each_get_one_answer(live: tuple[Daemon, list]) -> None:
    d, _ = live
    conn = Conn(d.socket)

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
    @given(blob=st.binary(min_size=1, max_size=MAX_REQUEST - 1).map(lambda b: b.replace(b"\n", b"~"))
           | st.sampled_from([b"[" * 3000, b'{"cmd": "status", "film": ' + b"9" * 3000 + b"}", b"\xff\xfe",
                              b'{"cmd": NaN}', b'{"cmd": "status", "cmd": "ping"}', b"\x00" * 100]))
    def ask(blob: bytes) -> None:
        if not blob.strip(b" \t\r"):
            blob = b"x"
        _well_formed(conn.ask(blob + b"\n"))

    ask()
    assert conn.ask(b'{"cmd":"ping"}\n')["ok"]
    conn.close()


def test_hostile_crowd_cannot_delay_a_well_behaved_client(live: tuple[Daemon, list]) -> None:
    """More clients than allowed, slow writers, silent ones, oversized lines and a client that never reads
    its answers, all at once: pings and status from a normal client stay fast; afterwards descriptors and
    memory are back to their baseline."""
    d, films = live
    proc = psutil.Process(d.pid)
    fds0, rss0 = proc.num_fds(), proc.memory_info().rss
    crowd: list[socket.socket] = []
    stop = threading.Event()

    def connect() -> socket.socket | None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(str(d.socket))
        crowd.append(s)
        return s

    for _ in range(90):  # beyond the 64-client limit: the extra ones get "busy" and are closed
        connect()
    slow = crowd[:20]
    for s in crowd[20:30]:  # oversized
        with contextlib.suppress(OSError):
            s.send(b"A" * (MAX_REQUEST * 4))
    for s in crowd[30:40]:  # pipelined status requests, answers never read
        with contextlib.suppress(OSError):
            s.send(b'{"cmd":"status"}\n' * 200)

    def torment() -> None:
        while not stop.is_set():
            for s in slow:
                with contextlib.suppress(OSError):
                    s.send(b"{")
            time.sleep(0.05)

    t = threading.Thread(target=torment, daemon=True)
    t.start()
    latencies = []
    try:
        time.sleep(0.2)
        for i in range(30):
            t0 = time.monotonic()
            if i % 3 == 0:
                st_ = d.status()
                assert st_["films"]["total"] == len(films)
            else:
                assert d.request("ping", timeout=5)["pong"]
            latencies.append(time.monotonic() - t0)
            time.sleep(0.02)
        # The slow writers are cut off at the request deadline, not served forever.
        time.sleep(TIMEOUT_S + 0.5)
        assert d.request("ping")["pong"]
    finally:
        stop.set()
        t.join()
        for s in crowd:
            s.close()
    print(f"well-behaved client among {len(crowd)} hostile ones: max {max(latencies) * 1000:.1f} ms, "
          f"median {sorted(latencies)[len(latencies) // 2] * 1000:.1f} ms")
    assert max(latencies) < 1.0, latencies
    assert sorted(latencies)[len(latencies) // 2] < 0.1, latencies

    def settled() -> bool:
        return proc.num_fds() <= fds0 + 2

    deadline = time.monotonic() + 5
    while not settled() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.num_fds() <= fds0 + 2, (fds0, proc.num_fds())
    assert proc.memory_info().rss - rss0 < 30 << 20


def test_half_requests_and_garbage_at_eof(live: tuple[Daemon, list]) -> None:
    d, _ = live
    for payload in (b'{"cmd": "pi', b"\xff" * 10, b"", b'{"cmd":"ping"}', b"[1,2,3]\n[4]"):
        out = raw_exchange(d.socket, payload, timeout=5)
        for line in filter(None, out.split(b"\n")):
            _well_formed(json.loads(line))
    out = raw_exchange(d.socket, b"Z" * (MAX_REQUEST + 10), timeout=5)
    assert json.loads(out.split(b"\n")[0])["error"]["code"] == "too_large"
