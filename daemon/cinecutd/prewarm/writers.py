"""Is a film still open for writing? Asked once, right before a job would start on it.

The settle time (no size/mtime change for ``prewarm.settle_seconds``) is the main guard. On top of it, a
Linux read lease answers "does any process have this file open for writing?" for the price of one open
and two fcntl calls, where walking ``/proc/*/fd`` would cost a syscall per descriptor of every process.
A download client that stalls for longer than the settle time with the file still open is caught here.

Leases need the file's owner or CAP_LEASE (root has it) and a filesystem that supports them (NFS and
SMB mounts often do not); where the kernel refuses, the answer is "unknown" and the settle time alone
decides. While the lease exists (microseconds) a writer opening the file would break it and the kernel
would signal us: the break signal is set to SIGURG, whose default action is to ignore it, so that race
can never terminate the daemon (SIGIO, the default break signal, would).
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
from pathlib import Path
from typing import Final

_F_SETLEASE: Final = getattr(fcntl, "F_SETLEASE", 1024)
_F_SETSIG: Final = getattr(fcntl, "F_SETSIG", 10)
_BREAK_SIGNAL: Final = signal.SIGURG


def open_for_writing(path: str | os.PathLike[str]) -> bool | None:
    """True if some process has ``path`` open for writing, False if none, None if it cannot be told."""
    try:
        fd = os.open(Path(path), os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError:
        return None
    try:
        try:
            fcntl.fcntl(fd, _F_SETSIG, int(_BREAK_SIGNAL))
            fcntl.fcntl(fd, _F_SETLEASE, fcntl.F_RDLCK)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EBUSY):
                return True
            return None  # EACCES (not the owner), EINVAL (no lease support on this filesystem), ...
        try:
            fcntl.fcntl(fd, _F_SETLEASE, fcntl.F_UNLCK)
        except OSError:
            pass  # closing the descriptor drops the lease anyway
        return False
    finally:
        os.close(fd)
