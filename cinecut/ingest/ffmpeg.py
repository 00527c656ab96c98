"""Finding and running ffmpeg/ffprobe.

Every ingest step shells out to Debian's ffmpeg. This module is the one place that knows how: it finds the
binaries (with an install hint when they are missing), runs them with stderr captured so a failure can say
*why* in its message, and never leaves a child running after a timeout, an error or a Ctrl-C.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

INSTALL_HINT: Final = "install it with `apt install ffmpeg` (Debian/Ubuntu) or put it on PATH"
_STDERR_TAIL_LINES: Final = 8
_KILL_GRACE_S: Final = 2.0


class IngestError(Exception):
    """Base of every ingest failure; ``exit_code`` is the sysexits code a CLI should exit with."""

    exit_code: int = 65  # EX_DATAERR


class FFmpegMissingError(IngestError):
    """ffmpeg or ffprobe is not installed (or not on PATH)."""

    exit_code = 69  # EX_UNAVAILABLE


class MissingInputError(IngestError, FileNotFoundError):
    """The film or subtitle file given does not exist."""

    exit_code = 66  # EX_NOINPUT


class MediaError(IngestError):
    """An ffmpeg/ffprobe run failed; the message ends with the last lines it wrote to stderr."""


def find_tool(name: str) -> str:
    """Absolute path of ``ffmpeg``/``ffprobe`` on PATH, or FFmpegMissingError with an install hint."""
    found = shutil.which(name)
    if found is None:
        raise FFmpegMissingError(f"{name} not found on PATH: {INSTALL_HINT}")
    return found


def stderr_tail(stderr: bytes | str, lines: int = _STDERR_TAIL_LINES) -> str:
    """The last non-empty stderr lines, which is where ffmpeg says what went wrong."""
    text = stderr.decode("utf-8", "replace") if isinstance(stderr, bytes) else stderr
    kept = [ln.strip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    return "\n".join(kept[-lines:])


class ProcessSet:
    """Children started under this context; all are killed if the block is left by an exception.

    Worker threads cannot see a KeyboardInterrupt (only the main thread gets it), so a parallel caller
    registers its children here and the main thread kills them on the way out.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._procs: set[subprocess.Popen[bytes]] = set()
        self.cancelled = False

    def add(self, proc: subprocess.Popen[bytes]) -> None:
        with self._lock:
            if self.cancelled:
                _kill(proc)
            self._procs.add(proc)

    def discard(self, proc: subprocess.Popen[bytes]) -> None:
        with self._lock:
            self._procs.discard(proc)

    def kill_all(self) -> None:
        """Kill every registered child and refuse new ones."""
        with self._lock:
            self.cancelled = True
            procs = list(self._procs)
        for proc in procs:
            _kill(proc)

    def __enter__(self) -> ProcessSet:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.kill_all()


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """Stop a child: SIGTERM (ffmpeg finalises quickly), then SIGKILL, and reap it."""
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(_KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    except ProcessLookupError:
        pass


@dataclass(frozen=True, slots=True)
class ToolResult:
    """Captured output of a finished ffmpeg/ffprobe run."""

    stdout: bytes
    stderr: bytes


def run_tool(
    tool: str,
    args: Sequence[str | os.PathLike[str]],
    *,
    what: str,
    timeout: float | None = None,
    procs: ProcessSet | None = None,
) -> ToolResult:
    """Run ``tool`` (``ffmpeg``/``ffprobe``) with ``args``; MediaError on a non-zero exit or a timeout.

    ``what`` names the job for the error message ("probing X"). stdin is closed so ffmpeg never waits on
    a terminal. The child is killed and reaped on timeout, error or KeyboardInterrupt.
    """
    argv = [find_tool(tool), *(os.fspath(a) for a in args)]
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
    except OSError as exc:  # found on PATH but not executable, or vanished meanwhile
        raise FFmpegMissingError(f"cannot run {argv[0]}: {exc}; {INSTALL_HINT}") from exc
    if procs is not None:
        procs.add(proc)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        _kill(proc)
        proc.communicate()
        raise MediaError(f"{what}: {tool} timed out after {timeout:g} s") from exc
    except BaseException:
        _kill(proc)
        raise
    finally:
        if procs is not None:
            procs.discard(proc)
    if proc.returncode != 0:
        if procs is not None and procs.cancelled:
            raise MediaError(f"{what}: {tool} was cancelled")
        tail = stderr_tail(err) or "(no output)"
        raise MediaError(f"{what}: {tool} failed with exit status {proc.returncode}:\n{tail}")
    return ToolResult(out, err)


def ffmpeg_args(*args: str | os.PathLike[str]) -> list[str | os.PathLike[str]]:
    """Common leading ffmpeg options: no banner, no stdin interaction, overwrite outputs."""
    return ["-hide_banner", "-nostdin", "-y", *args]


def media_arg(path: str | os.PathLike[str]) -> str:
    """A path as an ffmpeg argument: absolute, so a name starting with ``-`` or ``proto:`` is still a file."""
    return os.path.abspath(path)


def require_file(path: str | os.PathLike[str]) -> Path:
    """``path`` as a Path if it is an existing regular file, else a clear error before ffmpeg runs."""
    p = Path(path)
    if not p.exists():
        raise MissingInputError(f"{p}: no such file")
    if not p.is_file():
        raise MediaError(f"{p}: not a regular file")
    return p
