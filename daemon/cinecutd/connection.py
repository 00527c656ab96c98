"""One control-socket client: its buffers, its deadline and where it stands.

The server loop (cinecutd.control) decides *when* to read, answer or drop; this object owns *what* a
client's state is, so every transition of a connection is written in one place:

    reading --(complete line)--> waiting (one request with the engine) --(answer)--> reading
    reading --(EOF)--> draining (answer what was sent, then close)
    any --(too large / timeout / send error)--> closing or closed
"""

from __future__ import annotations

import errno
import selectors
import socket
import time

import structlog

log = structlog.get_logger("cinecutd.control")

MAX_OUTPUT_BUFFER = 1 << 20  # stop reading a client's requests while this much of its output is unread


class RequestTooLarge(Exception):
    """The client sent more than the request size limit without a newline."""


class Connection:
    """A non-blocking client socket with bounded input/output buffers and a deadline."""

    __slots__ = ("busy_message", "closing", "deadline", "eof", "events", "inbuf", "max_request_bytes",
                 "outbuf", "sock", "ticket", "timeout", "wait_until")

    def __init__(self, sock: socket.socket, *, timeout: float, max_request_bytes: int) -> None:
        self.sock = sock
        self.timeout = timeout
        self.max_request_bytes = max_request_bytes
        self.deadline = time.monotonic() + timeout  # for the next complete request (or for reading the answer)
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.eof = False  # the client shut down its writing side: answer what it sent, then close
        self.closing = False  # close once outbuf is flushed
        self.events = 0  # what the selector watches for now
        # The request being worked on elsewhere (its answers stay in order: the next one waits): a ticket
        # number, so an answer that arrives after the request was given up on is recognised and dropped.
        self.ticket: int | None = None
        self.wait_until = 0.0
        self.busy_message = ""

    # ----------------------------------------------------------------------------------- state
    @property
    def open(self) -> bool:
        return self.sock.fileno() != -1

    @property
    def waiting(self) -> bool:
        """A request of this client is being answered elsewhere."""
        return self.ticket is not None

    def has_request(self) -> bool:
        """A complete request (or an over-long one to refuse) is buffered."""
        return b"\n" in self.inbuf or len(self.inbuf) > self.max_request_bytes

    def may_process(self) -> bool:
        return not self.closing and not self.waiting and len(self.outbuf) < MAX_OUTPUT_BUFFER

    def finished(self) -> bool:
        """Nothing more will happen on this connection: close it."""
        return not self.outbuf and not self.waiting and (self.closing or self.eof)

    def wanted_events(self, backlogged: bool) -> int:
        """Read only while the client may still send, has no complete request queued and its unread output
        is bounded (so its input and output buffers stay bounded); write while output waits."""
        events = 0
        if (not self.eof and not self.closing and len(self.outbuf) < MAX_OUTPUT_BUFFER and not backlogged
                and not (self.waiting and self.has_request())):
            events |= selectors.EVENT_READ
        if self.outbuf:
            events |= selectors.EVENT_WRITE
        return events

    def due(self) -> float:
        """When the server must act on this client if nothing happens."""
        return self.wait_until if self.waiting else self.deadline

    # ----------------------------------------------------------------------------------- transitions
    def receive(self) -> bool:
        """Read what the client sent; False when the connection broke."""
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        if not data:
            self.eof = True
            if self.inbuf.strip():  # a last request without its newline (e.g. `printf ... | nc -U`)
                self.inbuf += b"\n"
        else:
            self.inbuf += data
        return True

    def next_line(self) -> bytes | None:
        """The next non-blank request line, or None; RequestTooLarge past the size limit."""
        while True:
            nl = self.inbuf.find(b"\n", 0, self.max_request_bytes + 1)
            if nl < 0:
                if len(self.inbuf) > self.max_request_bytes:
                    raise RequestTooLarge
                return None
            line = bytes(self.inbuf[:nl]).rstrip(b"\r")
            del self.inbuf[: nl + 1]
            if line.strip():
                return line

    def await_answer(self, ticket: int, timeout: float, busy_message: str) -> None:
        self.ticket = ticket
        self.wait_until = time.monotonic() + timeout
        self.busy_message = busy_message

    def answer(self, data: bytes) -> None:
        """Queue an answer; the next request gets a fresh deadline (an idle client must send it in time)."""
        self.ticket = None
        self.outbuf += data
        self.deadline = time.monotonic() + self.timeout

    def fail(self, data: bytes) -> None:
        """Queue an error answer and close once it is out."""
        self.inbuf.clear()
        self.answer(data)
        self.closing = True

    def flush(self) -> bool:
        """Send as much output as the socket takes; False when the connection broke."""
        while self.outbuf:
            try:
                sent = self.sock.send(self.outbuf)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError as e:
                if e.errno not in (errno.EPIPE, errno.ECONNRESET):
                    log.debug("control_send_failed", error=e.strerror or str(e))
                return False
            del self.outbuf[:sent]
        return True

    def close(self) -> None:
        self.events = 0
        self.ticket = None
        self.sock.close()
