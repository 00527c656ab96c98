"""One daemon per control socket: a second ``cinecutd run`` on the same config refuses before it acts.

Without this, a second instance would reconcile the libraries (and write into work dirs) before it found the
control socket taken. The first thing ``cinecutd run`` does is take an exclusive ``flock`` on
``<socket>.lock`` beside the control socket; the kernel drops it when the process dies, so a crashed daemon
never blocks the next start. The lock file is never written (see :mod:`cinecut.locks`); the holder's pid is
noted in ``<socket>.lock.holder`` for the refusal message.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

from cinecut.locks import FileLock

#: ``cinecutd run`` exit code when another instance holds the lock (EX_TEMPFAIL: try again later).
EX_ALREADY_RUNNING: Final = 75


class AlreadyRunning(Exception):
    """Another cinecutd holds the instance lock of this control socket."""


def instance_lock_path(socket: Path) -> Path:
    return socket.with_name(socket.name + ".lock")


def _make_parents(path: Path) -> None:
    """Create the runtime dir like the control socket does: every folder we create is 0755 (not umasked),
    so the socket's group can still reach the socket inside it."""
    created = []
    p = path
    while not p.exists():
        created.append(p)
        p = p.parent
    path.mkdir(mode=0o755, parents=True, exist_ok=True)
    for d in created:
        os.chmod(d, 0o755)


def take_instance_lock(socket: Path) -> FileLock:
    """Hold the instance lock for the life of the process; AlreadyRunning (naming the holder) if taken."""
    path = instance_lock_path(socket)
    _make_parents(path.parent)
    lock = FileLock(path, purpose="cinecutd", announce=True)
    if not lock.try_acquire():
        holder = lock.holder() or {}
        pid = f" (pid {holder['pid']})" if holder.get("pid") else ""
        raise AlreadyRunning(f"another cinecutd{pid} is already running with control socket {socket} "
                             f"(it holds {path}); not starting a second one")
    return lock
