"""The control socket: newline-delimited JSON over a Unix stream socket, served from one selector thread.

Every client is non-blocking and has a deadline, input and output are bounded, and a client that is slow,
silent, oversized or malformed is answered with an error and cut off, so it can never stall the others.
The protocol is documented in docs/protocol.md.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import json
import os
import queue
import secrets
import selectors
import socket
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger("cinecutd.control")

Handler = Callable[[dict[str, Any]], dict[str, Any]]

MAX_OUTPUT_BUFFER = 1 << 20  # stop reading a client's requests while this much of its output is unread
REQUESTS_PER_TURN = 16  # a client pipelining many requests gets this many answered, then the others' turn
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes including the NUL


class ControlError(Exception):
    """An error a command handler reports to the client as {"code", "message"}."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ControlSocketError(Exception):
    """The control socket cannot be created (path taken, another daemon listening, path too long)."""


# --------------------------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class Arg:
    type: type
    required: bool = False


# The commands and their arguments; the Router validates requests against this before calling a handler.
COMMANDS: dict[str, dict[str, Arg]] = {
    "ping": {},
    "status": {"film": Arg(str)},
    "rescan": {},
    "gc": {"apply": Arg(bool)},
    "prewarm": {"film": Arg(str, required=True), "now": Arg(bool), "retry": Arg(bool)},
    "pause": {},
    "resume": {},
    # A Radarr/Sonarr event forwarded by `cinecutd arr-hook` (cinecutd.hints): paths to look at now.
    "hint": {"event": Arg(str, required=True), "source": Arg(str), "paths": Arg(list), "moves": Arg(list)},
}


class Router:
    """Turns a request dict into a call `handlers[cmd](**args)` after checking the arguments.

    The daemon supplies one function per command (keyword arguments as in COMMANDS); a command it does not
    supply answers `unknown_command`, a wrong argument `bad_request`. "ping" works without a handler.
    """

    def __init__(self, handlers: Mapping[str, Callable[..., dict[str, Any]]]) -> None:
        unknown = set(handlers) - set(COMMANDS)
        if unknown:
            raise ValueError(f"no such command(s): {', '.join(sorted(unknown))}")
        self.handlers = dict(handlers)
        self.handlers.setdefault("ping", lambda: {"pong": True, "pid": os.getpid()})

    def __call__(self, request: dict[str, Any]) -> dict[str, Any]:
        cmd = request["cmd"]
        spec = COMMANDS.get(cmd)
        fn = self.handlers.get(cmd)
        if spec is None or fn is None:
            known = ", ".join(sorted(self.handlers))
            raise ControlError("unknown_command", f"unknown command {cmd!r}; known: {known}")
        args = {k: v for k, v in request.items() if k != "cmd"}
        for name, value in args.items():
            arg = spec.get(name)
            if arg is None:
                raise ControlError("bad_request", f"{cmd}: unknown argument {name!r}")
            if value is None and not arg.required:
                continue
            if type(value) is not arg.type:
                kind = {bool: "a boolean (true or false)", list: "an array"}.get(arg.type, "a string")
                raise ControlError("bad_request", f"{cmd}: {name!r} must be {kind}")
        for name, arg in spec.items():
            if arg.required and args.get(name) is None:
                raise ControlError("bad_request", f"{cmd}: missing argument {name!r}")
        return fn(**{k: v for k, v in args.items() if v is not None})


# --------------------------------------------------------------------------------------------- encoding


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, datetime | date):
        return obj.isoformat()
    if isinstance(obj, set | frozenset):
        return sorted(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def encode_line(obj: dict[str, Any]) -> bytes:
    """One protocol line (compact JSON, ASCII-only, newline-terminated)."""
    return json.dumps(obj, default=_json_default, allow_nan=False, separators=(",", ":")).encode() + b"\n"


def error_reply(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": {"code": code, "message": message}}


def parse_request(line: bytes) -> dict[str, Any]:
    """Decode one request line; every malformation becomes ControlError("bad_request")."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise ControlError("bad_request", "request is not UTF-8") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ControlError("bad_request", "request is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, huge integers, NaN
        raise ControlError("bad_request", f"request is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ControlError("bad_request", 'request must be a JSON object like {"cmd": "status"}')
    if not isinstance(obj.get("cmd"), str):
        raise ControlError("bad_request", 'request needs a "cmd" string')
    return obj


# --------------------------------------------------------------------------------------------- server


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    deadline: float
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytearray = field(default_factory=bytearray)
    eof: bool = False  # the client shut down its writing side: answer what it sent, then close
    closing: bool = False  # close once outbuf is flushed
    in_flight: bool = False  # a request of this client is with a worker; its next ones wait (answers stay in order)
    events: int = 0


class ControlServer:
    """Serves the control protocol on a Unix socket from its own thread.

    All socket I/O happens on one selector thread; handlers run on a few worker threads, so a command
    that waits for the daemon's main loop (a rescan, a gc) does not stop the server from answering pings,
    accepting clients and enforcing deadlines. Each client has at most one request with a worker, so its
    answers come back in order. The handler may raise ControlError(code, message); TimeoutError becomes
    "busy"; any other exception is answered as "internal" and the server goes on.
    """

    def __init__(self, path: Path, handler: Handler, *, mode: int = 0o660, group: str = "",
                 max_request_bytes: int = 65536, request_timeout: float = 5.0, max_clients: int = 64,
                 workers: int = 4) -> None:
        self.path = Path(path)
        self.handler = handler
        self.mode = mode
        self.group = group
        self.max_request_bytes = max_request_bytes
        self.request_timeout = request_timeout
        self.max_clients = max_clients
        self.workers = max(1, workers)
        self._jobs: queue.SimpleQueue[tuple[_Conn, dict[str, Any]] | None] = queue.SimpleQueue()
        self._done: deque[tuple[_Conn, bytes, bool]] = deque()  # answers from workers, for the loop thread
        self._worker_threads: list[threading.Thread] = []
        self._listener: socket.socket | None = None
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket file we created
        self._sel: selectors.BaseSelector | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conns: dict[int, _Conn] = {}
        self._backlog: set[_Conn] = set()  # clients with complete requests still queued in their inbuf
        self.stats = {"connections": 0, "requests": 0, "errors": 0, "rejected": 0}

    # ----------------------------------------------------------------------------------- socket file

    def _prepare_path(self) -> None:
        parent = self.path.parent
        if not parent.is_dir():
            created = []
            p = parent
            while not p.exists():
                created.append(p)
                p = p.parent
            parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            for d in created:  # mkdir's mode is filtered by the umask; the runtime dir must be 0755
                os.chmod(d, 0o755)
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "a directory" if stat.S_ISDIR(st.st_mode) \
                else "a file that is not a socket"
            raise ControlSocketError(f"{self.path} exists and is {kind}; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(self.path))
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("control_stale_socket_removed", socket=str(self.path))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            return
        except OSError as e:
            raise ControlSocketError(f"{self.path}: cannot probe the existing socket: {e.strerror or e}") from None
        finally:
            probe.close()
        raise ControlSocketError(f"{self.path}: another cinecutd is already listening there")

    def _bind(self) -> socket.socket:
        """Bind in a private 0700 directory, set mode and group there, then link it into place.

        The socket file is never reachable by anyone but us before it has its final mode, whatever the
        process umask, and the process-wide umask is not touched (other threads may be creating files).
        link(2) never replaces an existing path, so a file that appeared meanwhile is not clobbered.
        """
        final_len = len(os.fsencode(self.path))
        if final_len > _SUN_PATH_MAX:
            raise ControlSocketError(f"{self.path}: socket path too long ({final_len} bytes, at most "
                                     f"{_SUN_PATH_MAX})")
        gid = -1
        if self.group:
            try:
                gid = grp.getgrnam(self.group).gr_gid
            except KeyError:
                raise ControlSocketError(f"{self.path}: group {self.group!r} does not exist") from None
        for _ in range(8):
            tmpdir = self.path.parent / f".{secrets.token_hex(3)}"
            try:
                os.mkdir(tmpdir, 0o700)
                break
            except FileExistsError:
                continue
        else:
            raise ControlSocketError(f"{self.path.parent}: cannot create a private temp directory")
        tmp = tmpdir / "s"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if len(os.fsencode(tmp)) > _SUN_PATH_MAX:
                raise ControlSocketError(f"{self.path}: socket path too long (the directory name "
                                         f"{self.path.parent} leaves no room)")
            sock.bind(str(tmp))
            if gid != -1:
                os.chown(tmp, -1, gid, follow_symlinks=False)
            os.chmod(tmp, self.mode)
            st = os.lstat(tmp)
            try:
                os.link(tmp, self.path, follow_symlinks=False)
            except FileExistsError:
                raise ControlSocketError(f"{self.path} appeared while the socket was being created; "
                                         "refusing to replace it") from None
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV):
                    raise
                os.rename(tmp, self.path)  # a filesystem without hard links
            self._identity = (st.st_dev, st.st_ino)
        except BaseException:
            sock.close()
            raise
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            with contextlib.suppress(OSError):
                os.rmdir(tmpdir)
        return sock

    # ----------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Create the socket and serve it from a daemon thread; raises ControlSocketError/OSError."""
        if self._thread is not None:
            raise RuntimeError("ControlServer already started")
        self._prepare_path()
        sock = self._bind()
        try:
            sock.listen(min(self.max_clients, socket.SOMAXCONN))
            sock.setblocking(False)
            self._wake_r, self._wake_w = socket.socketpair()
            self._wake_r.setblocking(False)
            self._wake_w.setblocking(False)
            self._sel = selectors.DefaultSelector()
            self._sel.register(sock, selectors.EVENT_READ, None)
            self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        except BaseException:
            sock.close()
            self._unlink_own()
            raise
        self._listener = sock
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="cinecutd-control", daemon=True)
        self._thread.start()
        # Daemon threads: a handler stuck in the daemon must not keep the process from exiting.
        self._worker_threads = [threading.Thread(target=self._work, name=f"cinecutd-control-{i}", daemon=True)
                                for i in range(self.workers)]
        for t in self._worker_threads:
            t.start()
        log.debug("control_listening", socket=str(self.path), mode=f"{self.mode:04o}")

    def close(self, timeout: float = 5.0) -> None:
        """Stop serving, drop all clients and remove the socket file (only if it is still ours)."""
        self._stop.set()
        if self._wake_w is not None:
            with contextlib.suppress(OSError):
                self._wake_w.send(b"x")
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        for _ in self._worker_threads:
            self._jobs.put(None)
        for t in self._worker_threads:
            if t is not threading.current_thread():
                t.join(0.1)  # idle workers exit at once; one inside a slow handler is left to finish
        self._worker_threads = []
        for conn in list(self._conns.values()):
            self._drop(conn)
        for s in (self._listener, self._wake_r, self._wake_w):
            if s is not None:
                s.close()
        if self._sel is not None:
            self._sel.close()
        self._listener = self._wake_r = self._wake_w = None
        self._sel = None
        self._thread = None
        self._unlink_own()

    def _unlink_own(self) -> None:
        if self._identity is None:
            return
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._identity:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        self._identity = None

    def __enter__(self) -> ControlServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def client_count(self) -> int:
        return len(self._conns)

    # ----------------------------------------------------------------------------------- event loop

    def _loop(self) -> None:
        assert self._sel is not None
        while not self._stop.is_set():
            timeout = None
            if self._backlog or self._done:
                timeout = 0.0
            else:
                deadlines = [c.deadline for c in self._conns.values() if not c.in_flight]
                if deadlines:
                    timeout = max(0.0, min(deadlines) - time.monotonic())
            try:
                ready = self._sel.select(timeout)
            except OSError:  # selector closed under us by close()
                break
            for key, mask in ready:
                self._guarded(key.data, self._on_event, key.fileobj, mask)
            self._deliver()
            # Round robin over clients with more complete requests queued: each gets one batch per turn.
            for conn in list(self._backlog):
                self._guarded(conn, self._pump, conn)
            self._expire(time.monotonic())

    def _guarded(self, conn: _Conn | None, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:  # never let one client kill the server
            log.exception("control_loop_error")
            if conn is not None:
                self._drop(conn)

    def _on_event(self, fileobj: Any, mask: int) -> None:
        if fileobj is self._listener:
            self._accept()
        elif fileobj is self._wake_r:
            with contextlib.suppress(OSError):
                self._wake_r.recv(64)
        else:
            conn = self._conns.get(fileobj.fileno()) if fileobj.fileno() != -1 else None
            if conn is None or conn.sock is not fileobj:
                return
            if mask & selectors.EVENT_READ:
                self._on_readable(conn)
            if mask & selectors.EVENT_WRITE and conn.sock.fileno() != -1:
                self._pump(conn)

    def _accept(self) -> None:
        assert self._listener is not None
        for _ in range(self.max_clients):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and friends: try again on the next loop
                log.warning("control_accept_failed", error=e.strerror or str(e))
                return
            sock.setblocking(False)
            if len(self._conns) >= self.max_clients:
                self.stats["rejected"] += 1
                with contextlib.suppress(OSError):
                    sock.send(encode_line(error_reply("busy", "too many clients; try again")))
                sock.close()
                continue
            self.stats["connections"] += 1
            conn = _Conn(sock=sock, deadline=time.monotonic() + self.request_timeout)
            self._conns[sock.fileno()] = conn
            self._set_events(conn)

    def _set_events(self, conn: _Conn) -> None:
        """Read only while the client may still send, has no complete request queued and its unread output
        is bounded (so its input and output buffers stay bounded); write while output waits."""
        assert self._sel is not None
        events = 0
        if (not conn.eof and not conn.closing and len(conn.outbuf) < MAX_OUTPUT_BUFFER
                and conn not in self._backlog
                and not (conn.in_flight and (b"\n" in conn.inbuf or len(conn.inbuf) > self.max_request_bytes))):
            events |= selectors.EVENT_READ
        if conn.outbuf:
            events |= selectors.EVENT_WRITE
        if events == conn.events:
            return
        if conn.events == 0:
            self._sel.register(conn.sock, events, conn)
        elif events == 0:
            self._sel.unregister(conn.sock)
        else:
            self._sel.modify(conn.sock, events, conn)
        conn.events = events

    def _on_readable(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        if not data:
            conn.eof = True
            if conn.inbuf.strip():  # a last request without its newline (e.g. `printf ... | nc -U`)
                conn.inbuf += b"\n"
        else:
            conn.inbuf += data
        self._pump(conn)

    def _pump(self, conn: _Conn) -> None:
        """Answer one batch of the complete requests received, send what the client will take, then decide
        the connection's fate: queued for another batch, waiting for I/O, or closed."""
        if not conn.closing:
            self._process(conn)
        if not self._send(conn):
            return
        more = (not conn.closing and not conn.in_flight and len(conn.outbuf) < MAX_OUTPUT_BUFFER
                and (b"\n" in conn.inbuf or len(conn.inbuf) > self.max_request_bytes))
        if more:
            self._backlog.add(conn)
        else:
            self._backlog.discard(conn)
            if not conn.outbuf and not conn.in_flight and (conn.closing or conn.eof):
                self._drop(conn)
                return
        self._set_events(conn)

    def _process(self, conn: _Conn) -> None:
        for _ in range(REQUESTS_PER_TURN):
            if conn.closing or conn.in_flight or len(conn.outbuf) >= MAX_OUTPUT_BUFFER:
                return
            nl = conn.inbuf.find(b"\n", 0, self.max_request_bytes + 1)
            if nl < 0:
                if len(conn.inbuf) > self.max_request_bytes:
                    self._fail(conn, "too_large", f"request exceeds {self.max_request_bytes} bytes")
                return
            line = bytes(conn.inbuf[:nl]).rstrip(b"\r")
            del conn.inbuf[: nl + 1]
            if not line.strip():
                continue
            self.stats["requests"] += 1
            try:
                request = parse_request(line)
            except ControlError as e:
                self.stats["errors"] += 1
                conn.outbuf += encode_line(error_reply(e.code, e.message))
                # The next request gets a fresh deadline; an idle connection must send it in time.
                conn.deadline = time.monotonic() + self.request_timeout
                continue
            conn.in_flight = True
            self._jobs.put((conn, request))
            return

    def _work(self) -> None:
        """A worker thread: run handlers, hand the encoded answers back to the loop thread."""
        while True:
            job = self._jobs.get()
            if job is None:
                return
            conn, request = job
            data, failed = self._call_handler(request)
            self._done.append((conn, data, failed))
            if self._wake_w is not None:
                with contextlib.suppress(OSError):
                    self._wake_w.send(b"!")

    def _call_handler(self, request: dict[str, Any]) -> tuple[bytes, bool]:
        try:
            result = self.handler(request)
            if not isinstance(result, dict):
                raise TypeError(f"handler returned {type(result).__name__}, not a dict")
            return encode_line({"ok": True, "result": result}), False
        except ControlError as e:
            return encode_line(error_reply(e.code, e.message)), True
        except TimeoutError as e:
            return encode_line(error_reply("busy", str(e) or "the daemon is busy; try again")), True
        except Exception as e:
            log.exception("control_handler_failed", cmd=request.get("cmd"))
            return encode_line(error_reply("internal", f"internal error: {type(e).__name__}: {e}")), True

    def _deliver(self) -> None:
        """Queue the workers' answers on their connections (loop thread)."""
        while self._done:
            conn, data, failed = self._done.popleft()
            conn.in_flight = False
            if failed:
                self.stats["errors"] += 1
            if conn.sock.fileno() == -1:
                continue  # the client went away meanwhile
            conn.outbuf += data
            conn.deadline = time.monotonic() + self.request_timeout
            self._guarded(conn, self._pump, conn)

    def _fail(self, conn: _Conn, code: str, message: str) -> None:
        """Queue an error answer and close the connection once it is out (the caller pumps)."""
        self.stats["errors"] += 1
        conn.inbuf.clear()
        conn.outbuf += encode_line(error_reply(code, message))
        conn.closing = True
        conn.deadline = time.monotonic() + self.request_timeout

    def _send(self, conn: _Conn) -> bool:
        """Send as much output as the socket takes; False when the connection had to be dropped."""
        while conn.outbuf:
            try:
                sent = conn.sock.send(conn.outbuf)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError as e:
                if e.errno not in (errno.EPIPE, errno.ECONNRESET):
                    log.debug("control_send_failed", error=e.strerror or str(e))
                self._drop(conn)
                return False
            del conn.outbuf[:sent]
        return True

    def _expire(self, now: float) -> None:
        for conn in [c for c in self._conns.values() if c.deadline <= now and not c.in_flight]:
            if conn.closing or conn.outbuf:
                self._drop(conn)  # it would not read its answer in time
                continue
            conn.inbuf.clear()
            with contextlib.suppress(OSError):
                conn.sock.send(encode_line(error_reply(
                    "timeout", f"no complete request within {self.request_timeout:g} s")))
            self._drop(conn)

    def _drop(self, conn: _Conn) -> None:
        fd = conn.sock.fileno()
        if fd == -1:
            return
        if conn.events and self._sel is not None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._sel.unregister(conn.sock)
        conn.events = 0
        self._backlog.discard(conn)
        self._conns.pop(fd, None)
        conn.sock.close()
