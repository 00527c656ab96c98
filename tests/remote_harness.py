"""Real processes for the remote pre-warm tests: a redis-server of the test's own, and ``cinecut worker``s.

The Redis server listens on a free loopback port with its data in the test's temp dir and persistence
off (``--save ''``), so restarting it loses every key, as a crash of an unpersisted Redis would. Workers
run as separate sessions (a SIGKILL to their group is a power cut of that host) and write their JSON
event lines to a log file the test reads.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.harness.waiting import wait_for

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """``redis-server --port N --bind 127.0.0.1 --save '' --dir TMP``; restartable on the same port."""

    def __init__(self, base: Path, password: str | None = None) -> None:
        exe = shutil.which("redis-server")
        assert exe, "redis-server is not installed (packaging/dev-setup.sh installs it)"
        self.exe = exe
        self.dir = base / "redis"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        argv = [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.dir), "--protected-mode", "yes"]
        if self.password:
            argv += ["--requirepass", self.password]
        log = open(self.dir / "redis.log", "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        log.close()
        wait_for(self.ping, 20, what="redis-server to answer")
        return self

    def client(self) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=5)

    def ping(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, "redis-server exited"
        try:
            return bool(self.client().ping())
        except Exception:
            return False

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
        self.proc = None


class Worker:
    """One ``cinecut worker`` process (its own session) and its event log."""

    def __init__(self, base: Path, name: str, argv: Sequence[str]) -> None:
        self.name = name
        self.log = base / f"worker-{name}.log"
        self.argv = list(argv)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Worker:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        wait_for(lambda: self.events("worker_started"), 30, what=f"worker {self.name} to start")
        return self

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        out = []
        try:
            text = self.log.read_text(errors="replace")
        except FileNotFoundError:
            return []
        for line in text.splitlines():
            if not line.startswith("{"):
                continue
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if isinstance(ev, dict) and (kind is None or ev.get("event") == kind):
                out.append(ev)
        return out

    def kill(self) -> None:
        """A power cut: SIGKILL to the worker's whole process group (ffmpeg children too)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode


def worker_argv(*, name: str, url: str, maps: Sequence[str], model: Path, mmproj: Path, gpu_lock: Path,
                extra: Sequence[str] = ()) -> list[str]:
    argv = [str(BIN / "cinecut"), "worker", "--queue", url, "--name", name, "--model", str(model),
            "--mmproj", str(mmproj), "--gpu-lock", str(gpu_lock), "--n-gpu-layers", "0", "--poll", "0.2",
            "--lease", "1.5", "--heartbeat", "0.5", "--max-keyframes", "4"]
    for m in maps:
        argv += ["--path-map", m]
    return argv + list(extra)


def wait_until(pred: Any, timeout: float, what: str) -> Any:
    return wait_for(pred, timeout, what=what)


def now() -> float:
    return time.monotonic()
