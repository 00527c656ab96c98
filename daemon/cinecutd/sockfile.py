"""The control socket's file: created with its final mode before anyone can reach it, removed only if ours.

Kept apart from the server loop (cinecutd.control) because its rules are about the filesystem, not the
protocol: a path that is not a socket is never replaced, a live daemon's socket is never stolen, a stale
one is removed, and the process umask is never touched.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import secrets
import socket
import stat
from pathlib import Path

import structlog

log = structlog.get_logger("cinecutd.control")

SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes including the NUL

Identity = tuple[int, int]  # (st_dev, st_ino) of the socket file we created


class ControlSocketError(Exception):
    """The control socket cannot be created (path taken, another daemon listening, path too long)."""


def prepare_path(path: Path) -> None:
    """Create the runtime directory (0755) and clear a stale socket; refuse anything else in the way."""
    parent = path.parent
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
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "a directory" if stat.S_ISDIR(st.st_mode) \
            else "a file that is not a socket"
        raise ControlSocketError(f"{path} exists and is {kind}; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("control_stale_socket_removed", socket=str(path))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    except OSError as e:
        raise ControlSocketError(f"{path}: cannot probe the existing socket: {e.strerror or e}") from None
    finally:
        probe.close()
    raise ControlSocketError(f"{path}: another cinecutd is already listening there")


def _group_id(path: Path, group: str) -> int:
    if not group:
        return -1
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ControlSocketError(f"{path}: group {group!r} does not exist") from None


def _private_dir(parent: Path) -> Path:
    for _ in range(8):
        tmpdir = parent / f".{secrets.token_hex(3)}"
        try:
            os.mkdir(tmpdir, 0o700)
            return tmpdir
        except FileExistsError:
            continue
    raise ControlSocketError(f"{parent}: cannot create a private temp directory")


def bind_socket(path: Path, mode: int, group: str = "") -> tuple[socket.socket, Identity]:
    """Bind in a private 0700 directory, set mode and group there, then link it into place.

    The socket file is never reachable by anyone but us before it has its final mode, whatever the
    process umask, and the process-wide umask is not touched (other threads may be creating files).
    link(2) never replaces an existing path, so a file that appeared meanwhile is not clobbered.
    """
    final_len = len(os.fsencode(path))
    if final_len > SUN_PATH_MAX:
        raise ControlSocketError(f"{path}: socket path too long ({final_len} bytes, at most {SUN_PATH_MAX})")
    gid = _group_id(path, group)
    tmpdir = _private_dir(path.parent)
    tmp = tmpdir / "s"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if len(os.fsencode(tmp)) > SUN_PATH_MAX:
            raise ControlSocketError(f"{path}: socket path too long (the directory name {path.parent} "
                                     "leaves no room)")
        sock.bind(str(tmp))
        if gid != -1:
            os.chown(tmp, -1, gid, follow_symlinks=False)
        os.chmod(tmp, mode)
        st = os.lstat(tmp)
        try:
            os.link(tmp, path, follow_symlinks=False)
        except FileExistsError:
            raise ControlSocketError(f"{path} appeared while the socket was being created; "
                                     "refusing to replace it") from None
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            os.rename(tmp, path)  # a filesystem without hard links
    except BaseException:
        sock.close()
        raise
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        with contextlib.suppress(OSError):
            os.rmdir(tmpdir)
    return sock, (st.st_dev, st.st_ino)


def unlink_if_ours(path: Path, identity: Identity | None) -> None:
    """Remove the socket file only if it is still the one we created (another daemon may own it now)."""
    if identity is None:
        return
    try:
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == identity:
            os.unlink(path)
    except FileNotFoundError:
        pass
