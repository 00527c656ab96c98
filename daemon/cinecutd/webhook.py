"""The Radarr/Sonarr webhook receiver (``[webhook]``): HTTP POSTs of their "Connect" JSON become hints.

Standard library ``http.server`` with a bounded number of request threads: a connection beyond
``[webhook].threads`` is answered 503 at once, every socket read has a timeout, a body larger than
``max_body_bytes`` is refused (413) without being read, requests beyond ``max_requests_per_minute`` get 429.
Nothing here touches the disk or waits for the engine: a payload is parsed, its paths mapped and checked
(``cinecutd.hints``), and the hint is queued for the engine thread. Radarr's "Test" is answered 200.

The token (``token`` or ``token_file``, required off loopback) is accepted as the password of HTTP Basic
auth (Radarr's and Sonarr's webhook has Username/Password fields), as ``Authorization: Bearer``, or as
``?token=`` in the URL, and compared in constant time.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import json
import os
import socket
import stat
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import structlog

from cinecutd.config import WebhookConfig
from cinecutd.hints import HintRefused, HintSink, hint_from_payload

log = structlog.get_logger("cinecutd.webhook")

#: Seconds any one read or write on a client socket may take, and a whole request (a client trickling
#: its request byte by byte is cut off then: it cannot hold one of the few threads for long).
SOCKET_TIMEOUT_S = 5.0
REQUEST_DEADLINE_S = 10.0
_BUSY_BODY = b'{"ok": false, "error": "busy", "message": "too many requests at once; retry"}'
_BUSY = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
         b"Connection: close\r\nContent-Length: " + str(len(_BUSY_BODY)).encode() + b"\r\n\r\n" + _BUSY_BODY)


class WebhookError(Exception):
    """The receiver cannot start (address in use, unreadable or world-readable token file)."""


def read_token(cfg: WebhookConfig) -> str:
    """The configured token: inline, or the first line of ``token_file`` (which others may not read)."""
    if cfg.token_file is None:
        return cfg.token
    try:
        fd = os.open(cfg.token_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise WebhookError(f"{cfg.token_file}: cannot read the token file: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise WebhookError(f"{cfg.token_file}: not a regular file")
        if st.st_mode & 0o007:
            raise WebhookError(f"{cfg.token_file}: readable by others (mode {st.st_mode & 0o777:04o}); chmod 0640")
        lines = f.read(4096).decode("utf-8", "replace").splitlines()
    token = lines[0].strip() if lines else ""
    if len(token) < 16:
        raise WebhookError(f"{cfg.token_file}: the token must be at least 16 characters")
    return token


class _RateLimit:
    """A token bucket: ``per_minute`` requests a minute, up to a minute's worth at once."""

    def __init__(self, per_minute: int) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.tokens = self.capacity
        self.stamp = time.monotonic()
        self.lock = threading.Lock()

    def take(self) -> float:
        """0 when allowed, else the seconds until the next request would be."""
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens >= 1:
                self.tokens -= 1
                return 0.0
            return (1 - self.tokens) / self.rate


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 64
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], receiver: WebhookReceiver) -> None:
        self.address_family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        self.receiver = receiver
        self.slots = threading.BoundedSemaphore(receiver.cfg.threads)
        super().__init__(addr, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        """One thread per request, at most ``threads`` at once; one more gets 503 without a thread."""
        # A moment's grace: a thread that just answered may still be closing its connection.
        if not self.slots.acquire(timeout=0.05):
            self.receiver.count("503")
            try:
                request.settimeout(1.0)
                request.sendall(_BUSY)
                request.shutdown(socket.SHUT_WR)
                # What the client already sent is read (not waited for): closing with unread data would
                # reset the connection and lose the answer.
                while request.recv(65536, socket.MSG_DONTWAIT):
                    pass
            except OSError:
                pass
            self.server_close_request(request)
            return
        threading.Thread(target=self._work, args=(request, client_address), daemon=True,
                         name="cinecutd-webhook").start()

    def server_close_request(self, request: Any) -> None:
        try:
            request.close()
        except OSError:
            pass

    def _work(self, request: Any, client_address: Any) -> None:
        deadline = threading.Timer(REQUEST_DEADLINE_S, _cut, args=(request,))
        deadline.daemon = True
        deadline.start()
        try:
            self.finish_request(request, client_address)
        except Exception as exc:
            self.handle_error(request, client_address, exc)
        finally:
            deadline.cancel()
            self.shutdown_request(request)
            self.slots.release()

    def handle_error(self, request: Any, client_address: Any, exc: BaseException | None = None) -> None:
        if not isinstance(exc, OSError):  # a client that went away is not worth a log line
            log.error("webhook_request_failed", client=str(client_address[0]), error=repr(exc))


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "cinecutd"
    sys_version = ""
    timeout = SOCKET_TIMEOUT_S

    def log_message(self, format: str, *args: Any) -> None:
        pass  # outcomes are counted and logged by the receiver, without the token in the URL

    def do_POST(self) -> None:
        self.server.receiver.handle_post(self)

    def _not_allowed(self) -> None:
        self.server.receiver.reply(self, 405, "method_not_allowed", "POST Radarr/Sonarr webhook JSON here",
                                   headers={"Allow": "POST"})

    do_GET = do_PUT = do_DELETE = do_PATCH = do_HEAD = _not_allowed


class WebhookReceiver:
    """The listening socket, its threads, and what it counted."""

    def __init__(self, cfg: WebhookConfig, sink: HintSink) -> None:
        if cfg.listen is None:
            raise WebhookError("[webhook] listen is not set")
        self.cfg = cfg
        self.sink = sink
        self.token = read_token(cfg).encode()
        self.allow = [ipaddress.ip_network(n) for n in cfg.allow]
        self.limit = _RateLimit(cfg.max_requests_per_minute)
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()
        try:
            self.server = _Server(cfg.listen, self)
        except OSError as exc:
            raise WebhookError(f"cannot listen on {format_addr(cfg.listen)}: {exc.strerror or exc}") from None
        self.address: tuple[str, int] = self.server.server_address[:2]
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.5},
                                        daemon=True, name="cinecutd-webhook-accept")
        self._thread.start()
        log.info("webhook_listening", address=format_addr(self.address), token=bool(self.token),
                 allow=list(self.cfg.allow))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        if self._thread is not None:
            self._thread.join(2.0)

    def count(self, what: str) -> None:
        with self._lock:
            self._counts[what] = self._counts.get(what, 0) + 1

    def status(self) -> dict[str, Any]:
        with self._lock:
            counts = dict(self._counts)
        alive = self._thread is not None and self._thread.is_alive()
        return {"listen": format_addr(self.address), "state": "listening" if alive else "stopped",
                "responses": counts}

    # ------------------------------------------------------------------------- one request
    def reply(self, h: _Handler, status: int, code: str, message: str, *, headers: dict[str, str] | None = None,
              extra: dict[str, Any] | None = None) -> None:
        self.count(str(status))
        ok = status < 300
        body = {"ok": ok, **({"result": extra} if ok and extra else {})}
        if not ok:
            body["error"] = code
        body["message"] = message
        data = json.dumps(body, ensure_ascii=True).encode()
        h.close_connection = True
        try:
            h.send_response(status, HTTPStatus(status).phrase)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(data)))
            h.send_header("Connection", "close")
            for k, v in (headers or {}).items():
                h.send_header(k, v)
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(data)
        except OSError:
            pass

    def _refuse_unread(self, h: _Handler, status: int, code: str, message: str,
                       headers: dict[str, str] | None = None) -> None:
        """Answer before reading the body, then read (and drop) what the client still sends for a moment:
        a client that writes its whole body before reading would otherwise get a reset, not the answer."""
        self.reply(h, status, code, message, headers=headers)
        try:
            h.wfile.flush()
            h.connection.shutdown(socket.SHUT_WR)
            h.connection.settimeout(0.5)
            left, deadline = 1 << 20, time.monotonic() + 1.0
            while left > 0 and time.monotonic() < deadline:
                chunk = h.connection.recv(min(left, 65536))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass

    def _authorised(self, h: _Handler) -> bool:
        if not self.token:
            return True  # loopback without a token (the config refuses anything else)
        offered: list[bytes] = []
        auth = h.headers.get("Authorization", "")
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer":
            offered.append(value.strip().encode("utf-8", "replace"))
        elif scheme.lower() == "basic":
            try:
                _, _, password = base64.b64decode(value.strip(), validate=True).partition(b":")
                offered.append(password)
            except ValueError:
                pass
        for t in parse_qs(urlsplit(h.path).query).get("token", [])[:1]:
            offered.append(t.encode("utf-8", "replace"))
        ok = False
        for candidate in offered:  # every candidate compared, in constant time each
            ok |= hmac.compare_digest(candidate, self.token)
        return ok

    def handle_post(self, h: _Handler) -> None:
        client = h.client_address[0]
        if self.allow:
            try:
                addr = ipaddress.ip_address(client.removeprefix("::ffff:"))
            except ValueError:
                addr = None
            if addr is None or not any(addr in net for net in self.allow):
                self._refuse_unread(h, 403, "forbidden", f"{client} is not in [webhook] allow")
                return
        wait = self.limit.take()
        if wait:
            self._refuse_unread(h, 429, "rate_limited", "too many requests; slow down",
                       headers={"Retry-After": str(max(1, int(wait + 0.999)))})
            return
        if not self._authorised(h):
            log.warning("webhook_unauthorised", client=client)
            self._refuse_unread(h, 401, "unauthorised", "missing or wrong token (send it as the password, a Bearer token "
                       "or ?token=)", headers={"WWW-Authenticate": 'Basic realm="cinecutd"'})
            return
        if h.headers.get("Transfer-Encoding"):
            self._refuse_unread(h, 411, "length_required", "send the body with a Content-Length, not chunked")
            return
        raw_length = h.headers.get("Content-Length")
        if raw_length is None:
            self.reply(h, 411, "length_required", "a Content-Length header is required")
            return
        try:
            length = int(raw_length)
            if length < 0:
                raise ValueError
        except ValueError:
            self.reply(h, 400, "bad_request", "Content-Length is not a number")
            return
        if length > self.cfg.max_body_bytes:
            self._refuse_unread(h, 413, "too_large", f"the body is {length} bytes; at most {self.cfg.max_body_bytes} "
                                            "([webhook] max_body_bytes)")
            return
        try:
            body = h.rfile.read(length)
        except OSError:
            self.count("read_failed")
            return
        if len(body) != length:
            self.reply(h, 400, "bad_request", "the body is shorter than its Content-Length")
            return
        try:
            payload = json.loads(body.decode("utf-8-sig"), parse_constant=_no_constant)
        except (ValueError, RecursionError):
            self.reply(h, 400, "bad_json", "the body is not JSON (UTF-8)")
            return
        try:
            hint = hint_from_payload(payload)
            if hint.event.lower() == "test":
                log.info("webhook_test", client=client, instance=str(payload.get("instanceName", ""))[:100])
                self.reply(h, 200, "ok", "cinecutd received the test event", extra={"event": "Test"})
                return
            result = self.sink.submit(hint)
        except HintRefused as exc:
            log.warning("webhook_refused", client=client, status=exc.status, reason=exc.message[:300])
            self.reply(h, exc.status, exc.code, exc.message,
                       headers={"Retry-After": "5"} if exc.status == 503 else None)
            return
        if result["queued"]:
            self.reply(h, 202, "ok", "the daemon will look at these paths now", extra=result)
        else:
            self.reply(h, 200, "ok", f"{hint.event}: no file named; nothing to do", extra=result)


def _cut(request: Any) -> None:
    """A request past its deadline: shut the socket down, so the thread blocked reading it returns."""
    try:
        request.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def format_addr(addr: tuple[str, int] | tuple[Any, ...]) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


class WebhookDown:
    """A configured receiver that could not start: shown as failed in `cinecutd status`, with why."""

    def __init__(self, cfg: WebhookConfig, error: str) -> None:
        self.listen = format_addr(cfg.listen) if cfg.listen else ""
        self.error = error

    def status(self) -> dict[str, Any]:
        return {"listen": self.listen, "state": "failed", "error": self.error}

    def close(self) -> None:
        pass


def start_receiver(cfg: WebhookConfig, sink: HintSink) -> WebhookReceiver | WebhookDown | None:
    """Start the receiver when configured; a failure is logged and shown in status, and the daemon goes on
    without it (cache invalidation does not depend on it)."""
    if cfg.listen is None:
        return None
    try:
        receiver = WebhookReceiver(cfg, sink)
    except WebhookError as exc:
        log.error("webhook_failed", error=str(exc), detail="running without the webhook receiver")
        return WebhookDown(cfg, str(exc))
    receiver.start()
    return receiver


def dropin_lines(cfg: WebhookConfig) -> list[str]:
    """What the hardened unit (PrivateNetwork=yes, IPAddressDeny=any, AF_UNIX only) needs for the webhook:
    the host's network, the listening address's family, and packets only from the allowed clients."""
    if cfg.listen is None:
        return []
    family = "AF_INET6" if ":" in cfg.listen[0] else "AF_INET"
    if cfg.allow:
        allowed = " ".join(cfg.allow)
    elif cfg.loopback:
        allowed = "localhost"
    else:
        allowed = "any"
    lines = [
        f"# [webhook] listen = {format_addr(cfg.listen)}: the receiver needs the host's network (the unit has",
        "# none) and its address family; packets only from the allowed clients (IPAddressDeny=any stays).",
        "PrivateNetwork=no",
        f"RestrictAddressFamilies=AF_UNIX {family}",
        f"IPAddressAllow={allowed}",
    ]
    if cfg.token_file is not None and str(cfg.token_file).startswith("/run/credentials/"):
        lines.append(f"# The token file is a systemd credential: LoadCredential={Path(cfg.token_file).name}:PATH")
    return lines
