"""Advisory ``flock`` locks shared by the CLI, the pre-warm worker and the daemon.

flock locks belong to an open file description and vanish when the holder dies, so a crashed pipeline
never leaves a work dir locked. Lock files are opened read-only with ``O_NOFOLLOW`` and never written: a
lock file swapped for a symlink is refused, and one that is a hard link to a film (dedupe tools, ``cp -al``)
is only locked, never truncated or written through. Who holds a lock lives in a separate file,
``<lock>.holder``, which only a holder that announces itself writes, always as a new file renamed into place.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any, Self

from cinecut import safefs
from cinecut.polling import Polled, poll_acquire
from cinecut.workdir import LOCK_NAME, WorkDir


class LockBusy(Exception):
    """The lock is held by another process (or another open of the file in this one)."""

    def __init__(self, path: str | os.PathLike[str], holder: dict[str, Any] | None = None) -> None:
        who = f" by {holder.get('purpose', 'a process')} (pid {holder.get('pid')})" if holder else ""
        super().__init__(f"{path} is locked{who}")
        self.path = Path(path)
        self.holder = holder


#: Suffix of the file beside a lock that names its holder (pid, purpose, since).
HOLDER_SUFFIX = ".holder"
_HOLDER_TMP_SUFFIX = ".holder.tmp"


class FileLock:
    """An exclusive (or shared) flock on one file, with non-blocking, timeout and blocking acquisition.

    With ``announce``, the holder records its pid and purpose in ``<lock>.holder`` (a file created fresh
    and renamed into place, removed again on release) so others can say who holds it. The lock file itself
    is never written.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        purpose: str = "",
        dir_fd: int | None = None,
        shared: bool = False,
        announce: bool = False,
    ) -> None:
        self.path = Path(path)
        self.purpose = purpose
        self._dir_fd = dir_fd
        self._shared = shared
        self._announce = announce and not shared
        self._announced = False
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _open(self) -> int:
        # Read-only: flock needs no write access, and a descriptor that cannot write cannot damage a file
        # that turns out to be a hard link to someone's film.
        flags = os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        name: str | Path = self.path.name if self._dir_fd is not None else self.path
        try:
            fd = os.open(name, flags, 0o664, dir_fd=self._dir_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise safefs.SymlinkRefused(self.path, "lock file") from exc
            raise
        if not _is_regular(fd):
            os.close(fd)
            raise safefs.SymlinkRefused(self.path, "lock file")
        return fd

    def try_acquire(self) -> bool:
        """Take the lock if it is free right now; False if another holder has it."""
        if self._fd is not None:
            return True
        fd = self._open()
        op = (fcntl.LOCK_SH if self._shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
        try:
            fcntl.flock(fd, op)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        if self._announce:
            self._write_holder()
        return True

    def acquire(self, timeout: float | None = None, *, poll: float = 0.01) -> None:
        """Take the lock, waiting up to ``timeout`` seconds (None: forever); LockBusy when it stays held."""
        if poll_acquire(self.try_acquire, timeout=timeout, interval=poll, max_interval=0.2) is not Polled.ACQUIRED:
            raise LockBusy(self.path, self.holder())

    def release(self) -> None:
        """Drop the lock (idempotent). The file stays: deleting it would race with other openers."""
        if self._fd is not None and self._announced:
            self._announced = False
            try:
                self._in_dir(lambda d: safefs.unlink_regular(d, self._holder_name))  # while still held
            except Exception:  # also from __del__ at interpreter exit; the note is a courtesy
                pass
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    @property
    def _holder_name(self) -> str:
        return self.path.name + HOLDER_SUFFIX

    def _in_dir(self, fn: Any) -> Any:
        """Run ``fn(dir_fd)`` on the lock's directory; None on any OSError (holder info is a courtesy)."""
        try:
            if self._dir_fd is not None:
                return fn(self._dir_fd)
            with safefs.dir_fd(self.path.parent, follow_last=True) as d:
                return fn(d)
        except OSError:
            return None

    def holder(self) -> dict[str, Any] | None:
        """Who holds the lock, if its holder announced itself and is alive (pid, purpose, since); else None."""
        data = self._in_dir(lambda d: safefs.read_bounded(d, self._holder_name, 4096))
        try:
            info = json.loads(data) if data is not None else None
        except ValueError:
            return None
        if not isinstance(info, dict) or not isinstance(info.get("pid"), int) or not _alive(info["pid"]):
            return None  # left behind by a holder that died
        return info

    def _write_holder(self) -> None:
        info = json.dumps({"pid": os.getpid(), "purpose": self.purpose, "since": time.time()}).encode()
        done = self._in_dir(
            lambda d: safefs.atomic_write(d, self._holder_name, info, tmp_suffix=_HOLDER_TMP_SUFFIX, durable=False)
            or True
        )
        self._announced = bool(done)

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def describe_holder(holder: dict[str, Any] | None) -> str:
    """A holder as :meth:`FileLock.holder` reads it, in words for a waiting message."""
    if not holder:
        return "another process"
    purpose = holder.get("purpose") or "a process"
    pid = holder.get("pid")
    return f"{purpose} (pid {pid})" if pid else str(purpose)


def _is_regular(fd: int) -> bool:
    import stat

    return stat.S_ISREG(os.fstat(fd).st_mode)


def work_dir_lock(
    work_dir: WorkDir | str | os.PathLike[str], *, purpose: str, dir_fd: int | None = None, announce: bool = False
) -> FileLock:
    """The lock of a work dir (``<work dir>/cinecut.lock``), held by whoever edits the work dir.

    Pass ``dir_fd`` (the work dir opened with O_NOFOLLOW) to lock through it rather than the path.
    ``announce``: record the holder beside the lock (long holders such as a pipeline run; the daemon's
    brief edits do not, so they write nothing but what they change).
    """
    path = work_dir.path if isinstance(work_dir, WorkDir) else Path(work_dir)
    return FileLock(path / LOCK_NAME, purpose=purpose, dir_fd=dir_fd, announce=announce)


def is_work_dir_locked(work_dir: WorkDir | str | os.PathLike[str]) -> bool:
    """True if a pipeline holds the work dir's lock now (probe without keeping it).

    Probes through the work dir opened with O_NOFOLLOW: a symlinked work dir is not a lockable work dir
    (False), and no lock file is ever created in a symlink's target.
    """
    path = work_dir.path if isinstance(work_dir, WorkDir) else Path(work_dir)
    try:
        with safefs.work_dir_fd(path) as fd:
            if safefs.lstat_in(fd, LOCK_NAME) is None:
                return False  # every holder creates the file first; a question creates nothing
            lock = work_dir_lock(path, purpose="probe", dir_fd=fd)
            if lock.try_acquire():
                lock.release()
                return False
            return True
    except OSError:
        return False


class GpuLock:
    """One GPU shared by the interactive CLI and the overnight pre-warm; interactive runs win.

    ``<path>`` is the GPU itself (exclusive flock). ``<path>.want`` is how an interactive run asks for it:
    it holds a shared flock on the want file while waiting and running. A pre-warm checks
    :meth:`should_yield` between frames (an exclusive non-blocking probe of the want file) and releases
    the GPU within one frame; it re-acquires once nobody wants it.
    """

    def __init__(self, path: str | os.PathLike[str], *, purpose: str, interactive: bool) -> None:
        self.path = Path(path)
        self.interactive = interactive
        self._gpu = FileLock(self.path, purpose=purpose, announce=True)
        self._want = FileLock(self.path.with_name(self.path.name + ".want"), purpose=purpose, shared=True)

    @property
    def held(self) -> bool:
        return self._gpu.held

    def acquire(self, timeout: float | None = None) -> None:
        """Wait for the GPU. An interactive caller first announces itself so a pre-warm yields."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.interactive:
            self._want.acquire(timeout)
        elif self.someone_waiting():
            raise LockBusy(self.path, {"purpose": "an interactive run is waiting", "pid": None})
        try:
            self._gpu.acquire(timeout)
        except BaseException:
            self._want.release()
            raise

    def try_acquire(self) -> bool:
        """Non-blocking acquire (pre-warm): False if the GPU is taken or an interactive run wants it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.interactive and self.someone_waiting():
            return False
        return self._gpu.try_acquire()

    def someone_waiting(self) -> bool:
        """True if an interactive run holds or waits for the GPU."""
        probe = FileLock(self._want.path, purpose="probe")
        if probe.try_acquire():
            probe.release()
            return False
        return True

    def should_yield(self) -> bool:
        """For a non-interactive holder: an interactive run asked for the GPU."""
        return not self.interactive and self.someone_waiting()

    def holder(self) -> dict[str, Any] | None:
        return self._gpu.holder()

    def release(self) -> None:
        self._gpu.release()
        self._want.release()

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
