"""The control socket: newline-delimited JSON over a Unix stream socket, served from one selector thread.

Every client is non-blocking and has a deadline, input and output are bounded, and a client that is slow,
silent, oversized or malformed is answered with an error and cut off, so it can never stall the others.
The protocol is documented in docs/protocol.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

import structlog

from cinecutd.connection import MAX_OUTPUT_BUFFER, Connection, RequestTooLarge
from cinecutd.errors import FilmAmbiguous, FilmNotFound, FilmQueryError
from cinecutd.sockfile import ControlSocketError, Identity, bind_socket, prepare_path, unlink_if_ours

__all__ = ["COMMANDS", "MAX_OUTPUT_BUFFER", "ControlError", "ControlServer", "ControlSocketError", "Later",
           "Router", "encode_line", "error_reply", "parse_request"]

log = structlog.get_logger("cinecutd.control")

REQUESTS_PER_TURN = 16  # a client pipelining many requests gets this many answered, then the others' turn
BUSY = "the daemon is busy; try again"
# Errors of the core (cinecutd.errors), as the protocol names them: the core never raises ControlError.
CORE_ERROR_CODES: dict[type[Exception], str] = {FilmNotFound: "not_found", FilmAmbiguous: "ambiguous"}


class ControlError(Exception):
    """An error a command handler reports to the client as {"code", "message"}."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


Done = Callable[[Any, "BaseException | None"], None]


@dataclass(frozen=True)
class Later:
    """An answer computed elsewhere (on the engine thread), so that no thread of the server waits for it.

    ``start(done)`` begins the work and arranges for ``done(result, error)`` to be called once, from any
    thread. No answer within ``timeout`` seconds is answered ``busy`` with ``busy_message``; an answer that
    comes after that is dropped.
    """

    start: Callable[[Done], None]
    timeout: float = 10.0
    busy_message: str = BUSY


Handler = Callable[[dict[str, Any]], "dict[str, Any] | Later"]


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
    # Wait until every change made in a root before the client created this cookie file was handled
    # (cinecutd.cookies).
    "sync": {"cookie": Arg(str, required=True)},
}


class Router:
    """Turns a request dict into a call `handlers[cmd](**args)` after checking the arguments.

    The daemon supplies one function per command (keyword arguments as in COMMANDS); a command it does not
    supply answers `unknown_command`, a wrong argument `bad_request`. "ping" works without a handler.
    """

    def __init__(self, handlers: Mapping[str, Callable[..., dict[str, Any] | Later]]) -> None:
        unknown = set(handlers) - set(COMMANDS)
        if unknown:
            raise ValueError(f"no such command(s): {', '.join(sorted(unknown))}")
        self.handlers = dict(handlers)
        self.handlers.setdefault("ping", lambda: {"pong": True, "pid": os.getpid()})

    def __call__(self, request: dict[str, Any]) -> dict[str, Any] | Later:
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


class ControlServer:
    """Serves the control protocol on a Unix socket from one selector thread, with no worker threads.

    A handler answers at once (a dict) or returns a :class:`Later`: the work is handed to the daemon's
    engine and its completion callback queues the answer and wakes the selector through a socketpair, so a
    command that waits for the engine (a rescan, a gc) never stops the server from answering pings,
    accepting clients and enforcing deadlines. Each client has at most one request being answered, so its
    answers come back in order. A handler may raise ControlError(code, message); TimeoutError becomes
    "busy"; any other exception is answered as "internal" and the server goes on.
    """

    def __init__(self, path: Path, handler: Handler, *, mode: int = 0o660, group: str = "",
                 max_request_bytes: int = 65536, request_timeout: float = 5.0, max_clients: int = 64) -> None:
        self.path = Path(path)
        self.handler = handler
        self.mode = mode
        self.group = group
        self.max_request_bytes = max_request_bytes
        self.request_timeout = request_timeout
        self.max_clients = max_clients
        self._done: deque[tuple[Connection, int, Any, BaseException | None]] = deque()  # completions, any thread
        self._tickets = 0
        self._listener: socket.socket | None = None
        self._identity: Identity | None = None
        self._sel: selectors.BaseSelector | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conns: dict[int, Connection] = {}
        self._backlog: set[Connection] = set()  # clients with complete requests still queued in their inbuf
        self.stats = {"connections": 0, "requests": 0, "errors": 0, "rejected": 0}

    # ----------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Create the socket and serve it from a daemon thread; raises ControlSocketError/OSError."""
        if self._thread is not None:
            raise RuntimeError("ControlServer already started")
        prepare_path(self.path)
        sock, self._identity = bind_socket(self.path, self.mode, self.group)
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
            unlink_if_ours(self.path, self._identity)
            self._identity = None
            raise
        self._listener = sock
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="cinecutd-control", daemon=True)
        self._thread.start()
        log.debug("control_listening", socket=str(self.path), mode=f"{self.mode:04o}")

    def close(self, timeout: float = 5.0) -> None:
        """Stop serving, drop all clients and remove the socket file (only if it is still ours)."""
        self._stop.set()
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
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
        unlink_if_ours(self.path, self._identity)
        self._identity = None

    def __enter__(self) -> ControlServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def client_count(self) -> int:
        return len(self._conns)

    def _wake(self) -> None:
        """Wake the selector (from any thread): a completion or a stop is waiting."""
        w = self._wake_w
        if w is not None:
            with contextlib.suppress(OSError):
                w.send(b"!")

    # ----------------------------------------------------------------------------------- event loop
    def _loop(self) -> None:
        assert self._sel is not None
        while not self._stop.is_set():
            timeout = None
            if self._backlog or self._done:
                timeout = 0.0
            elif self._conns:
                timeout = max(0.0, min(c.due() for c in self._conns.values()) - time.monotonic())
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

    def _guarded(self, conn: Connection | None, fn: Callable[..., None], *args: Any) -> None:
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
                self._wake_r.recv(4096)
        else:
            conn = self._conns.get(fileobj.fileno()) if fileobj.fileno() != -1 else None
            if conn is None or conn.sock is not fileobj:
                return
            if mask & selectors.EVENT_READ:
                if not conn.receive():
                    self._drop(conn)
                    return
                self._pump(conn)
            if mask & selectors.EVENT_WRITE and conn.open:
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
            conn = Connection(sock, timeout=self.request_timeout, max_request_bytes=self.max_request_bytes)
            self._conns[sock.fileno()] = conn
            self._set_events(conn)

    def _set_events(self, conn: Connection) -> None:
        assert self._sel is not None
        events = conn.wanted_events(conn in self._backlog)
        if events == conn.events:
            return
        if conn.events == 0:
            self._sel.register(conn.sock, events, conn)
        elif events == 0:
            self._sel.unregister(conn.sock)
        else:
            self._sel.modify(conn.sock, events, conn)
        conn.events = events

    def _pump(self, conn: Connection) -> None:
        """Answer one batch of the complete requests received, send what the client will take, then decide
        the connection's fate: queued for another batch, waiting for I/O, or closed."""
        if not conn.closing:
            self._process(conn)
        if not conn.flush():
            self._drop(conn)
            return
        if conn.may_process() and conn.has_request():
            self._backlog.add(conn)
        else:
            self._backlog.discard(conn)
            if conn.finished():
                self._drop(conn)
                return
        self._set_events(conn)

    def _process(self, conn: Connection) -> None:
        for _ in range(REQUESTS_PER_TURN):
            if not conn.may_process():
                return
            try:
                line = conn.next_line()
            except RequestTooLarge:
                self.stats["errors"] += 1
                conn.fail(encode_line(error_reply("too_large", f"request exceeds {self.max_request_bytes} bytes")))
                return
            if line is None:
                return
            self.stats["requests"] += 1
            try:
                request = parse_request(line)
            except ControlError as e:
                self.stats["errors"] += 1
                conn.answer(encode_line(error_reply(e.code, e.message)))
                continue
            self._dispatch(conn, request)

    def _dispatch(self, conn: Connection, request: dict[str, Any]) -> None:
        """Run the handler: an immediate answer is queued now, a Later one when its completion arrives."""
        try:
            outcome = self.handler(request)
        except Exception as e:  # answered as an error; the server goes on
            conn.answer(self._encode(request, None, e))
            return
        if not isinstance(outcome, Later):
            conn.answer(self._encode(request, outcome, None))
            return
        self._tickets += 1
        ticket = self._tickets
        conn.await_answer(ticket, outcome.timeout, outcome.busy_message)

        def done(result: Any, error: BaseException | None = None) -> None:
            self._done.append((conn, ticket, result, error))
            self._wake()

        try:
            outcome.start(done)
        except Exception as e:
            conn.answer(self._encode(request, None, e))

    def _encode(self, request: dict[str, Any], result: Any, error: BaseException | None) -> bytes:
        """The answer line for a handler's result or exception; counts the errors."""
        try:
            if error is not None:
                raise error
            if not isinstance(result, dict):
                raise TypeError(f"handler returned {type(result).__name__}, not a dict")
            return encode_line({"ok": True, "result": result})
        except ControlError as e:
            reply = error_reply(e.code, e.message)
        except FilmQueryError as e:
            reply = error_reply(CORE_ERROR_CODES.get(type(e), "not_found"), e.message)
        except TimeoutError as e:
            reply = error_reply("busy", str(e) or BUSY)
        except Exception as e:
            log.exception("control_handler_failed", cmd=request.get("cmd"))
            reply = error_reply("internal", f"internal error: {type(e).__name__}: {e}")
        self.stats["errors"] += 1
        return encode_line(reply)

    def _deliver(self) -> None:
        """Queue the answers that completed elsewhere on their connections (loop thread)."""
        while self._done:
            conn, ticket, result, error = self._done.popleft()
            if not conn.open or conn.ticket != ticket:
                continue  # the client went away, or was answered "busy" meanwhile
            conn.answer(self._encode({}, result, error))
            self._guarded(conn, self._pump, conn)

    def _expire(self, now: float) -> None:
        for conn in [c for c in self._conns.values() if c.due() <= now]:
            if conn.waiting:  # the engine did not answer in time: say so, and drop its late answer
                self.stats["errors"] += 1
                conn.answer(encode_line(error_reply("busy", conn.busy_message)))
                self._guarded(conn, self._pump, conn)
                continue
            if conn.closing or conn.outbuf:
                self._drop(conn)  # it would not read its answer in time
                continue
            conn.inbuf.clear()
            with contextlib.suppress(OSError):
                conn.sock.send(encode_line(error_reply(
                    "timeout", f"no complete request within {self.request_timeout:g} s")))
            self._drop(conn)

    def _drop(self, conn: Connection) -> None:
        if not conn.open:
            return
        if conn.events and self._sel is not None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._sel.unregister(conn.sock)
        self._backlog.discard(conn)
        self._conns.pop(conn.sock.fileno(), None)
        conn.close()
