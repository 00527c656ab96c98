"""poll_acquire: every wait of the pipeline for a lock, against a flock really held by another process."""

from __future__ import annotations

import itertools
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cinecut.locks import FileLock
from cinecut.polling import Polled, poll_acquire

#: Holds an exclusive flock on argv[1] until its stdin closes (then exits, and the kernel drops the lock).
HOLD = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()
"""

#: Exit 0 if argv[1] can be flocked right now, 1 if someone holds it.
PROBE = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_CREAT, 0o644)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
except BlockingIOError:
    sys.exit(1)
"""


@pytest.fixture
def lock_path(tmp_path: Path) -> Path:
    return tmp_path / "cinecut.lock"


@pytest.fixture
def holder(lock_path: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding the lock (it holds it until its stdin is closed)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(lock_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline() == "held\n"
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def free_for_others(path: Path) -> bool:
    return subprocess.run([sys.executable, "-c", PROBE, str(path)], timeout=30).returncode == 0


def test_a_lock_held_by_another_process_times_out_at_the_deadline(
    holder: subprocess.Popen[str], lock_path: Path
) -> None:
    lock = FileLock(lock_path, purpose="test")
    waits: list[tuple[int, float]] = []
    start = time.monotonic()
    polled = poll_acquire(lock.try_acquire, timeout=0.4, interval=0.02, on_wait=lambda n, s: waits.append((n, s)))
    elapsed = time.monotonic() - start
    assert polled is Polled.TIMED_OUT and not lock.held
    assert elapsed >= 0.4
    assert elapsed < 0.4 + 10  # the deadline ends the wait, not the holder (who never lets go)
    assert waits[0][0] == 0 and [n for n, _ in waits] == list(range(len(waits)))  # announced once, counted
    assert all(a[1] <= b[1] for a, b in itertools.pairwise(waits)) and waits[-1][1] < 0.4
    assert holder.poll() is None and not free_for_others(lock_path)


def test_the_lock_is_taken_once_the_other_process_lets_go(holder: subprocess.Popen[str], lock_path: Path) -> None:
    lock = FileLock(lock_path, purpose="test")
    failed: list[int] = []

    def on_wait(n: int, _waited: float) -> None:
        failed.append(n)
        if n == 2:
            assert holder.stdin is not None
            holder.stdin.close()  # the holder exits; the kernel drops its flock

    try:
        assert poll_acquire(lock.try_acquire, timeout=30, interval=0.02, on_wait=on_wait) is Polled.ACQUIRED
        assert lock.held and failed[:3] == [0, 1, 2]
        assert not free_for_others(lock_path)  # ours now, for real
    finally:
        lock.release()
    assert free_for_others(lock_path)


def test_a_stop_request_ends_the_wait_without_the_lock(holder: subprocess.Popen[str], lock_path: Path) -> None:
    lock = FileLock(lock_path, purpose="test")
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()  # asked from another thread, as a signal handler would
    start = time.monotonic()
    polled = poll_acquire(lock.try_acquire, should_stop=stop.is_set, interval=0.02)  # no deadline at all
    assert polled is Polled.STOPPED and not lock.held
    assert 0.2 <= time.monotonic() - start < 10
    assert holder.poll() is None and not free_for_others(lock_path)


def test_a_stop_request_is_heard_before_the_deadline_and_before_each_wait(
    holder: subprocess.Popen[str], lock_path: Path
) -> None:
    lock = FileLock(lock_path, purpose="test")
    assert poll_acquire(lock.try_acquire, timeout=0, should_stop=lambda: True) is Polled.STOPPED
    assert poll_acquire(lock.try_acquire, timeout=0) is Polled.TIMED_OUT
    waits: list[int] = []
    asked = iter([False, False, True])
    polled = poll_acquire(
        lock.try_acquire, should_stop=lambda: next(asked), interval=0.01, on_wait=lambda n, _: waits.append(n)
    )
    assert polled is Polled.STOPPED and not lock.held
    assert waits == [0, 1]  # the third failed try met the stop request before waiting again


def test_a_free_lock_is_taken_even_with_no_time_and_a_stop_pending(lock_path: Path) -> None:
    lock = FileLock(lock_path, purpose="test")
    try:
        assert poll_acquire(lock.try_acquire, timeout=0, should_stop=lambda: True) is Polled.ACQUIRED
        assert lock.held and not free_for_others(lock_path)
    finally:
        lock.release()


def test_the_wait_backs_off_to_its_longest_interval_and_ends_at_the_deadline(
    holder: subprocess.Popen[str], lock_path: Path
) -> None:
    lock = FileLock(lock_path, purpose="test")
    waits: list[float] = []
    start = time.monotonic()
    polled = poll_acquire(
        lock.try_acquire, timeout=1.0, interval=0.01, max_interval=0.2, on_wait=lambda _, s: waits.append(s)
    )
    assert polled is Polled.TIMED_OUT and 1.0 <= time.monotonic() - start < 10
    # 0.01, 0.02, 0.04, ... 0.2, 0.2: about 9 tries in a second, where a fixed 0.01 would make 100.
    assert 3 <= len(waits) <= 12
    gaps = [b - a for a, b in itertools.pairwise(waits)]
    assert gaps[1] >= 0.02 and max(gaps) >= 0.16  # it did grow
