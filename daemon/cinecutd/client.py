"""Talking to a running cinecutd over its control socket, and finding that socket.

Failures are sorted into what a user can act on: the daemon is not running, they may not use the socket
(join the group), or the daemon answered with an error.
"""

from __future__ import annotations

import errno
import grp
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cinecutd.config import DEFAULT_SOCKET, SOCKET_GROUP, ConfigError, default_config_path, load_config

MAX_RESPONSE_BYTES = 64 << 20  # a status answer is kilobytes; anything this large is not our daemon


class ClientError(Exception):
    """A problem talking to the daemon; `exit_code` is what the CLI exits with."""

    exit_code = 1


class DaemonNotRunning(ClientError):
    exit_code = 3


class PermissionDenied(ClientError):
    exit_code = 4


class DaemonError(ClientError):
    """The daemon answered {"ok": false, "error": {...}}."""

    exit_code = 1

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} ({code})")
        self.code = code
        self.message = message


class ProtocolError(ClientError):
    exit_code = 1


@dataclass(frozen=True)
class SocketChoice:
    path: Path
    why: str  # where the path came from, for messages
    warning: str | None = None  # a config we could not use and fell back from


def resolve_socket(socket_arg: str | Path | None, config_arg: str | Path | None) -> SocketChoice:
    """--socket wins; else the config's [control].socket; else the default socket.

    An explicit --config must be valid (ConfigError propagates). The implicit config may be unreadable
    for a member of the socket's group (it is root's file): then the default socket is used.
    """
    if socket_arg is not None:
        return SocketChoice(Path(socket_arg), "--socket")
    if config_arg is not None:
        cfg = load_config(Path(config_arg))
        return SocketChoice(cfg.control.socket, f"[control].socket in {cfg.path}")
    path = default_config_path()
    try:
        cfg = load_config(path)
    except ConfigError as e:
        missing_or_private = e.why == "no such file" or e.why.startswith("permission denied")
        warning = None if missing_or_private else f"ignoring the config: {e}"
        return SocketChoice(DEFAULT_SOCKET, "the default socket", warning)
    return SocketChoice(cfg.control.socket, f"[control].socket in {cfg.path}")


class ControlClient:
    """One connection to the daemon; several requests may be sent on it."""

    def __init__(self, path: Path | str, timeout: float = 10.0) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buf = bytearray()

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.path))
        except OSError as e:
            sock.close()
            raise self._connect_error(e) from None
        self._sock = sock

    def _connect_error(self, e: OSError) -> ClientError:
        if e.errno in (errno.ENOENT, errno.ECONNREFUSED):
            return DaemonNotRunning(f"cinecutd is not running (no daemon listening on {self.path}); "
                                    "start it with: systemctl start cinecut-cache")
        if e.errno in (errno.EACCES, errno.EPERM):
            group = self._socket_group()
            return PermissionDenied(f"permission denied on {self.path}: only root and members of the "
                                    f"'{group}' group may use it; join it with "
                                    f"`sudo usermod -aG {group} $USER` and log in again")
        if e.errno == errno.ENOTDIR:
            return DaemonNotRunning(f"cinecutd is not running ({self.path} is not a socket path)")
        if isinstance(e, TimeoutError):
            return ClientError(f"timed out connecting to {self.path}")
        return ClientError(f"cannot connect to {self.path}: {e.strerror or e}")

    def _socket_group(self) -> str:
        """The group that may use the socket: its own group, unless that is root's (then the packaged one)."""
        try:
            gid = os.stat(self.path).st_gid
            return SOCKET_GROUP if gid == 0 else grp.getgrgid(gid).gr_name
        except (OSError, KeyError):
            return SOCKET_GROUP

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> ControlClient:
        if self._sock is None:
            self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, cmd: str, **args: Any) -> dict[str, Any]:
        """Send one request and return its result; raises DaemonError on {"ok": false}."""
        if self._sock is None:
            self.connect()
        assert self._sock is not None
        line = json.dumps({"cmd": cmd, **{k: v for k, v in args.items() if v is not None}}).encode() + b"\n"
        try:
            self._sock.sendall(line)
            reply = self._read_line()
        except TimeoutError:
            raise ClientError(f"the daemon did not answer within {self.timeout:g} s") from None
        except OSError as e:
            raise ClientError(f"connection to {self.path} failed: {e.strerror or e}") from None
        try:
            obj = json.loads(reply)
        except ValueError:
            raise ProtocolError(f"the daemon sent an unreadable answer: {reply[:200]!r}") from None
        if not isinstance(obj, dict) or "ok" not in obj:
            raise ProtocolError(f"the daemon sent an unexpected answer: {reply[:200]!r}")
        if not obj["ok"]:
            err = obj.get("error") if isinstance(obj.get("error"), dict) else {}
            raise DaemonError(str(err.get("code", "error")), str(err.get("message", "unknown error")))
        result = obj.get("result")
        return result if isinstance(result, dict) else {}

    def _read_line(self) -> bytes:
        assert self._sock is not None
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line = bytes(self._buf[:nl])
                del self._buf[: nl + 1]
                return line
            if len(self._buf) > MAX_RESPONSE_BYTES:
                raise ProtocolError("the daemon's answer is too large")
            chunk = self._sock.recv(1 << 16)
            if not chunk:
                raise ClientError("the daemon closed the connection without answering")
            self._buf += chunk


def request(path: Path | str, cmd: str, *, timeout: float = 10.0, **args: Any) -> dict[str, Any]:
    """One request on a fresh connection."""
    with ControlClient(path, timeout) as c:
        return c.request(cmd, **args)
