"""Writing only through files this process created: never through a name that may be a hard link.

``O_NOFOLLOW`` stops a symlink, not a hard link. A name in a work dir (or a state dir) hard-linked to a film
(dedupe tools and ``cp -al`` make such links) opened for writing writes the film. So every write of ours
goes into a file created here with ``O_CREAT | O_EXCL | O_NOFOLLOW`` (a new inode nobody else can name
yet) and reaches its final name by ``rename(2)``, which replaces the name and never the bytes of the file
the name pointed to. A file is written in place (appended to) only when it is provably ours: a regular
file, one link, owned by us, of the size we expect.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat

from cinecut import safefs

_EXCL_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class NotOurs(OSError):
    """A file we were about to write in place is not provably ours (hard link, other owner, other size)."""

    def __init__(self, name: str, why: str) -> None:
        super().__init__(errno.EPERM, f"refusing to write in place: {why}", name)


def not_ours_reason(st: os.stat_result, *, expected_size: int | None = None) -> str | None:
    """Why a file must not be written in place (None: it is provably ours)."""
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_nlink != 1:
        return f"it has {st.st_nlink} hard links (another name, maybe a film, shares its bytes)"
    if st.st_uid != os.geteuid():
        return f"owned by uid {st.st_uid}, not by us"
    if expected_size is not None and st.st_size != expected_size:
        return f"{st.st_size} bytes where {expected_size} were expected"
    return None


def check_ours(fd: int, name: str, *, expected_size: int | None = None) -> None:
    """Raise NotOurs unless the open file ``fd`` may be written in place."""
    why = not_ours_reason(os.fstat(fd), expected_size=expected_size)
    if why is not None:
        raise NotOurs(name, why)


def create_temp(dir_fd: int, tmp_suffix: str, mode: int = 0o644, *, append: bool = False) -> tuple[int, str]:
    """A new, empty temp file ``tmp<12 hex><tmp_suffix>`` in ``dir_fd``: (fd open for writing, name)."""
    flags = _EXCL_FLAGS | (os.O_APPEND if append else 0)
    for _ in range(16):
        name = f"tmp{secrets.token_hex(6)}{tmp_suffix}"
        try:
            fd = os.open(name, flags, mode, dir_fd=dir_fd)
        except FileExistsError:
            continue
        return fd, name
    raise FileExistsError(errno.EEXIST, "no free temp file name", tmp_suffix)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def publish(dir_fd: int, name: str, data: bytes, *, tmp_suffix: str, mode: int = 0o644, durable: bool = True) -> int:
    """Write ``data`` into a fresh file, rename it to ``name`` and return its fd, open for appending.

    The returned descriptor refers to the file created here whatever ``name`` is renamed to or replaced
    by later, so later appends can only ever reach our own bytes.
    """
    fd, tmp = create_temp(dir_fd, tmp_suffix, mode, append=True)
    try:
        os.fchmod(fd, mode)
        _write_all(fd, data)
        if durable:
            os.fsync(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise
    if durable:
        safefs.fsync_dir(dir_fd)
    return fd


def open_append(dir_fd: int, name: str, *, tmp_suffix: str, mode: int = 0o640) -> int:
    """Open ``name`` for appending if it is provably ours, else start it afresh (empty) under that name.

    A name that is a hard link, a symlink, someone else's file or not a regular file is replaced by a new
    file (its old target keeps its bytes); a missing one is created exclusively.
    """
    try:
        fd = os.open(name, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
    except FileNotFoundError:
        try:
            return os.open(name, _EXCL_FLAGS | os.O_APPEND, mode, dir_fd=dir_fd)
        except FileExistsError:
            pass  # appeared meanwhile: replace it below
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENXIO, errno.EACCES, errno.EPERM, errno.EISDIR):
            raise
    else:
        if not_ours_reason(os.fstat(fd)) is None:
            return fd
        os.close(fd)
    return publish(dir_fd, name, b"", tmp_suffix=tmp_suffix, mode=mode, durable=False)
