"""Symlink-proof file operations on work directories.

Everything the daemon deletes or rewrites is reached through a directory file descriptor opened with
``O_NOFOLLOW`` and then by name relative to it (``dir_fd=``), never by re-resolving a path. A work dir,
cache, keyframes dir or lock file swapped for a symlink between our check and our use is therefore never
followed: the open fails with ELOOP/ENOTDIR and the operation is refused.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

from cinecut import faults, keepattrs

#: The temp files :func:`atomic_write` creates: ``tmp`` + 12 hex digits + a dotted suffix ending in ``.tmp``.
#: Upstream's ``mkstemp`` names (``tmp`` + 8 characters of ``[a-z0-9_]``) never match, so a leftover that
#: matches is ours: written under the work-dir lock and orphaned by a writer that died.
OWN_TEMP_RE: Final = re.compile(r"^tmp[0-9a-f]{12}(\.[a-z]+)+\.tmp$")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_NOFOLLOW_DIR = _DIR_FLAGS | os.O_NOFOLLOW


class SymlinkRefused(OSError):
    """A path that must be a real file or directory is a symlink (or not what it must be)."""

    def __init__(self, path: str | os.PathLike[str], what: str = "entry") -> None:
        super().__init__(errno.ELOOP, f"refusing to follow a symlinked or non-regular {what}", str(path))


class TooLarge(OSError):
    """A file is larger than the caller is prepared to read."""

    def __init__(self, path: str | os.PathLike[str], size: int, limit: int) -> None:
        super().__init__(errno.EFBIG, f"file is {size} bytes, limit {limit}", str(path))


def open_dir(path: str | os.PathLike[str], *, follow_last: bool = False) -> int:
    """Open a directory and return its fd.

    The last component is not followed unless ``follow_last`` (library roots and film folders may be
    symlinks the user made; work dirs may not). Raises SymlinkRefused if it is a symlink or not a directory,
    judged from the failed open itself: re-checking the path would race with whoever swaps it.
    """
    try:
        return os.open(path, _DIR_FLAGS if follow_last else _NOFOLLOW_DIR)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and not follow_last:
            raise SymlinkRefused(path, "directory") from exc
        raise


def open_subdir(dir_fd: int, name: str) -> int:
    """Open ``name`` inside ``dir_fd`` as a directory, refusing symlinks."""
    try:
        return os.open(name, _NOFOLLOW_DIR, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise SymlinkRefused(name, "directory") from exc
        raise


@contextmanager
def dir_fd(path: str | os.PathLike[str], *, follow_last: bool = False) -> Iterator[int]:
    """Context manager around :func:`open_dir` that always closes the fd."""
    fd = open_dir(path, follow_last=follow_last)
    try:
        yield fd
    finally:
        os.close(fd)


@contextmanager
def work_dir_fd(work_dir: str | os.PathLike[str]) -> Iterator[int]:
    """Open a work dir: the film's folder may be reached through symlinks, the work dir itself not."""
    fd = open_dir(work_dir)
    try:
        yield fd
    finally:
        os.close(fd)


def lstat_in(dir_fd: int, name: str) -> os.stat_result | None:
    """``lstat`` of ``name`` inside ``dir_fd``; None if it does not exist."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def read_bounded(dir_fd: int, name: str, limit: int) -> bytes:
    """Read a whole regular file (no symlink, no FIFO, no device) of at most ``limit`` bytes."""
    fd = open_regular(dir_fd, name)
    try:
        st = os.fstat(fd)
        if st.st_size > limit:
            raise TooLarge(name, st.st_size, limit)
        chunks: list[bytes] = []
        remaining = limit + 1
        while remaining > 0:
            chunk = os.read(fd, min(remaining, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        data = b"".join(chunks)
        if len(data) > limit:
            raise TooLarge(name, len(data), limit)
        return data
    finally:
        os.close(fd)


def open_regular(dir_fd: int, name: str) -> int:
    """Open a regular file read-only, refusing symlinks and special files; returns the fd."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SymlinkRefused(name, "file") from exc
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise SymlinkRefused(name, "file")
    return fd


def fsync_dir(dir_fd: int) -> None:
    """Make a rename or unlink in this directory durable."""
    os.fsync(dir_fd)


def atomic_write(dir_fd: int, name: str, data: bytes, *, tmp_suffix: str, durable: bool = True) -> None:
    """Write ``name`` atomically: temp file in the same dir, fsync, ``rename``, fsync the dir.

    A reader sees the old file or the new one, never a torn one; a crash leaves at most a temp file
    named ``tmp*<tmp_suffix>`` (the upstream naming, so cleanup rules cover both writers). An existing
    file keeps its owner, group and mode (``cinecut.keepattrs``: upstream's 0600 files stay readable to
    whoever ran upstream); a new one gets the umask's mode. The target name is replaced even if it is a
    symlink: rename never follows it, so a planted link is dropped, its target untouched.
    """
    old = lstat_in(dir_fd, name)
    tmp = f"tmp{secrets.token_hex(6)}{tmp_suffix}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, keepattrs.create_mode(old), dir_fd=dir_fd)
    try:
        try:
            keepattrs.apply(fd, name, old, os.fstat(dir_fd))
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        faults.point("atomic_write.before_rename")
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise
    if durable:
        fsync_dir(dir_fd)


def unlink_regular(dir_fd: int, name: str) -> int | None:
    """Delete a regular file inside ``dir_fd`` and return its size; None if absent.

    A symlink or anything not a regular file is refused (SymlinkRefused) and left in place.
    """
    st = lstat_in(dir_fd, name)
    if st is None:
        return None
    if not stat.S_ISREG(st.st_mode):
        raise SymlinkRefused(name, "file")
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    return st.st_size


def file_size_in(dir_fd: int, name: str) -> int:
    """Size of a regular file inside ``dir_fd`` (0 if absent or not regular)."""
    st = lstat_in(dir_fd, name)
    return st.st_size if st is not None and stat.S_ISREG(st.st_mode) else 0
