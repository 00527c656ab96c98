"""A REAL ``cinecutd run`` process: its config, its lifecycle, its control socket and its logs.

Behaviour tests and the soak start the installed entry point exactly as systemd does, talk to it through
the real control socket (``sync`` waits for the daemon to catch up, exactly) and stop it with real
signals; :class:`DaemonRunner` owns one test's folders and daemons and asserts the service's stop
contract at teardown. Running the daemon as another user (root only) lives here too.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cinecutd.client import ClientError, ControlClient
from cinecutd.cookies import sync_root

REPO = Path(__file__).resolve().parents[2]
STOP_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Library:
    """One ``[[library]]`` table. ``poll_interval`` is only written for ``watch = "poll"``."""

    path: Path
    watch: str = "inotify"
    poll_interval: float = 0.2
    extra: dict[str, Any] = field(default_factory=dict)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def render_config(
    libraries: Sequence[Library],
    *,
    socket: Path,
    settle_seconds: float = 0.3,
    rescan_interval: float = 0,
    log_level: str = "info",
    daemon: dict[str, Any] | None = None,
    control: dict[str, Any] | None = None,
) -> str:
    """A cinecutd TOML config. Periodic rescans are off by default so tests see the watchers' work."""
    lines = ["[daemon]"]
    d = {"settle_seconds": settle_seconds, "rescan_interval": rescan_interval, "log_format": "json",
         "log_level": log_level, **(daemon or {})}
    lines += [f"{k} = {_toml(v)}" for k, v in d.items()]
    for lib in libraries:
        lines += ["", "[[library]]", f"path = {_toml(lib.path)}", f"watch = {_toml(lib.watch)}"]
        if lib.watch == "poll":
            lines.append(f"poll_interval = {_toml(lib.poll_interval)}")
        lines += [f"{k} = {_toml(v)}" for k, v in lib.extra.items()]
    lines += ["", "[control]", f"socket = {_toml(socket)}"]
    lines += [f"{k} = {_toml(v)}" for k, v in (control or {}).items()]
    return "\n".join(lines) + "\n"


def daemon_command() -> list[str]:
    """The installed console script beside this interpreter, else the module entry point."""
    script = Path(sys.executable).parent / "cinecutd"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "cinecutd.cli"]


class Daemon:
    """One ``cinecutd run --config`` subprocess, its log file and its control socket."""

    def __init__(self, config: Path, socket: Path, log: Path, *, prefix: Sequence[str] = ()) -> None:
        self.config = config
        self.socket = socket
        self.log_path = log
        self.prefix = list(prefix)
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    # ---------------------------------------------------------------- lifecycle
    def start(self, *, ready_timeout: float = 20.0) -> Daemon:
        """Start the process and wait until it answers ``ping`` (it listens only after its startup
        reconcile, so "ready" means "caught up")."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("NOTIFY_SOCKET", None)
        env.pop("CINECUTD_CONFIG", None)
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it; closed right after spawning
        try:
            self.proc = subprocess.Popen(
                [*self.prefix, *daemon_command(), "run", "--config", str(self.config)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
            )
        finally:
            log.close()
        self.started_at = time.monotonic()
        deadline = time.monotonic() + ready_timeout
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise AssertionError(f"cinecutd exited with {rc} before it was ready:\n{self.log_text()[-4000:]}")
            with contextlib.suppress(ClientError):
                if self.request("ping", timeout=1.0).get("pong"):
                    return self
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"cinecutd not ready after {ready_timeout:g} s:\n{self.log_text()[-4000:]}")
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send(self, sig: int) -> None:
        """Send a signal to the daemon process."""
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S) -> tuple[int, float]:
        """Send ``sig`` and wait; returns (exit code, seconds taken). Kills it (and raises) past ``timeout``."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            return self.proc.returncode, 0.0
        t0 = time.monotonic()
        self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"cinecutd did not stop within {timeout:g} s of signal {sig}") from None
        return rc, time.monotonic() - t0

    def kill(self) -> None:
        """SIGKILL (crash tests, or a daemon that would not stop)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    # ---------------------------------------------------------------- control socket
    def client(self, timeout: float = 10.0) -> ControlClient:
        """A connected client (use as a context manager)."""
        return ControlClient(self.socket, timeout=timeout)

    def request(self, cmd: str, *, timeout: float = 10.0, **args: Any) -> dict[str, Any]:
        with ControlClient(self.socket, timeout=timeout) as c:
            return c.request(cmd, **args)

    def status(self) -> dict[str, Any]:
        return self.request("status")

    def film_status(self, film: Path | str) -> dict[str, Any]:
        return self.request("status", film=str(film))

    def counter(self, name: str) -> int:
        return int(self.status()["counters"].get(name, 0))

    def sync(self, root: Path | None = None, *, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Return once the daemon has handled every change made so far in ``root`` (every root by default):
        a cookie file's event proves it (cinecutd.cookies), instead of a sleep or a poll."""
        with ControlClient(self.socket, timeout=timeout) as c:
            roots = [root] if root is not None else [Path(r["path"]) for r in c.request("status")["roots"]]
            return [sync_root(lambda req: c.request(req.pop("cmd"), **req), Path(r)) for r in roots]

    def reload(self, config_text: str | None = None) -> None:
        """Optionally rewrite the config, then SIGHUP (the daemon reloads it and reconciles)."""
        if config_text is not None:
            tmp = self.config.with_suffix(".tmp")
            tmp.write_text(config_text)
            os.replace(tmp, self.config)
        self.send(signal.SIGHUP)

    # ---------------------------------------------------------------- logs
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def logs(self, event: str | None = None) -> list[dict[str, Any]]:
        """The JSON log records (optionally only those with ``event``); non-JSON lines are skipped."""
        out = []
        for line in self.log_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and (event is None or rec.get("event") == event):
                out.append(rec)
        return out


class DaemonRunner:
    """Owns the folders, configs and daemons of one test; stops every daemon on exit.

    Teardown asserts the contract the service relies on: SIGTERM stops the daemon with exit code 0
    within 5 s. ``public=True`` puts everything in a world-traversable temp dir owned by ``owner`` so a
    daemon can run as an unprivileged user (``start(..., user=...)``).
    """

    def __init__(self, base: Path | None = None, *, public: bool = False) -> None:
        self.public = public
        if public or base is None:
            self.base = Path(tempfile.mkdtemp(prefix="cinecutd-t-", dir="/tmp"))
            self.base.chmod(0o755)
            self._own_base = True
        else:
            self.base = base
            self._own_base = False
        # sun_path is 108 bytes: keep the socket short whatever pytest's tmp path looks like.
        self.sock_dir = Path(tempfile.mkdtemp(prefix="ccd-", dir="/tmp"))
        self.daemons: list[Daemon] = []
        self._n = 0

    def __enter__(self) -> DaemonRunner:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        problems = []
        for d in self.daemons:
            if d.proc is None:
                continue
            if d.proc.poll() is not None:
                continue
            try:
                rc, took = d.stop()
            except AssertionError as e:
                problems.append(str(e))
                continue
            if rc != 0:
                problems.append(f"cinecutd exited {rc} on SIGTERM:\n{d.log_text()[-3000:]}")
            elif took > STOP_TIMEOUT_S:
                problems.append(f"cinecutd took {took:.2f} s to stop")
        shutil.rmtree(self.sock_dir, ignore_errors=True)
        if self._own_base:
            _rmtree_forcefully(self.base)
        if problems and exc_type is None:
            raise AssertionError("; ".join(problems))

    def library(self, name: str = "films") -> Path:
        """Create (if needed) a library root folder under the runner's base."""
        p = self.base / name
        p.mkdir(parents=True, exist_ok=True)
        return p

    @property
    def socket(self) -> Path:
        return self.sock_dir / "d.sock"

    def config(self, libraries: Sequence[Library], **kwargs: Any) -> Path:
        """Write ``cinecutd.toml`` in the base dir and return its path."""
        path = self.base / "cinecutd.toml"
        path.write_text(render_config(libraries, socket=self.socket, **kwargs))
        return path

    def daemon(self, config: Path, *, user: str | None = None) -> Daemon:
        """A daemon object for ``config`` (not started). ``user`` runs it through setpriv (root only)."""
        self._n += 1
        prefix: list[str] = []
        if user is not None:
            prefix = unprivileged_prefix(user)
            uid, gid = _ids(user)
            for p in (self.sock_dir, self.base, config):
                os.chown(p, uid, gid)
        d = Daemon(config, self.socket, self.base / f"cinecutd-{self._n}.log", prefix=prefix)
        if user is not None:
            d.log_path.touch()
            os.chown(d.log_path, *_ids(user))
        self.daemons.append(d)
        return d

    def start(self, libraries: Sequence[Library], *, user: str | None = None, **kwargs: Any) -> Daemon:
        """Write a config for ``libraries`` and start a daemon on it (returns when it is ready)."""
        return self.daemon(self.config(libraries, **kwargs), user=user).start()

    def restart(self, d: Daemon) -> Daemon:
        """Stop ``d`` (asserting a clean exit) and start a new process on the same config."""
        rc, _ = d.stop()
        assert rc == 0, d.log_text()[-3000:]
        return self.daemon(d.config).start()


def _rmtree_forcefully(path: Path) -> None:
    """Remove a test tree even where a test left folders chmod 000."""
    def onerror(fn: Any, p: str, _exc: Any) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(p), 0o755)
            os.chmod(p, 0o755)
            fn(p)

    shutil.rmtree(path, onerror=onerror)


def _ids(user: str) -> tuple[int, int]:
    import pwd

    pw = pwd.getpwnam(user)
    return pw.pw_uid, pw.pw_gid


def unprivileged_prefix(user: str = "nobody") -> list[str]:
    """``setpriv`` arguments that run a command as ``user`` (the caller must be root)."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        raise RuntimeError("running the daemon as another user needs root and setpriv (util-linux)")
    uid, gid = _ids(user)
    return [setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]


def unprivileged_problem(user: str = "nobody") -> str | None:
    """Why a daemon cannot be run as ``user`` here (None when it can): not root, no setpriv, or the
    project and its virtualenv not readable by that user (a checkout in a private home dir)."""
    try:
        prefix = unprivileged_prefix(user)
    except (RuntimeError, KeyError) as e:
        return str(e)
    probe = subprocess.run([*prefix, *daemon_command(), "--version"], capture_output=True, timeout=60, cwd="/")
    if probe.returncode != 0:
        return f"cinecutd cannot run as {user}: {probe.stderr.decode(errors='replace')[-300:]}"
    return None


def chown_tree(path: Path, user: str) -> None:
    """Give a folder tree to ``user`` (for a daemon run through :func:`unprivileged_prefix`)."""
    uid, gid = _ids(user)
    for root, dirs, files in os.walk(path):
        os.chown(root, uid, gid)
        for name in dirs + files:
            os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)


def raw_exchange(socket_path: Path, payload: bytes, *, timeout: float = 5.0, shut_write: bool = True) -> bytes:
    """Send raw bytes on the control socket and return everything the daemon answers before closing."""
    import socket as _socket

    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(socket_path))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(payload)
            if shut_write:
                s.shutdown(_socket.SHUT_WR)
        chunks = []
        with contextlib.suppress(ConnectionResetError):
            while True:
                data = s.recv(65536)
                if not data:
                    break
                chunks.append(data)
        return b"".join(chunks)
    finally:
        s.close()
