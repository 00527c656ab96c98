"""One supervised inference worker: a child process the daemon watches but never waits on.

llama.cpp and CUDA run native code that can segfault, abort, hang or be OOM-killed; none of that may
reach the daemon, which keeps watching and invalidating. So inference runs in a child process:

* its own session and process group (a terminal's Ctrl-C or a signal to the daemon's group never hits
  it by accident; a hard kill takes its ffmpeg children too),
* stdout is a pipe of JSON lines read without blocking, from the daemon's main loop,
* stderr goes to a per-job log file, whose last lines explain a failure,
* ``PR_SET_PDEATHSIG`` (set by a two-line launcher before ``exec``) sends it SIGTERM if the daemon dies,
  so a SIGKILLed daemon never leaves a worker holding the GPU lock.

Stopping is polite first (SIGTERM: the worker saves its partial after the current frame and exits 3),
then forceful after a grace period (SIGKILL to the group). A worker that sends no event for too long is
hung, is killed, and the job fails with that reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from cinecut import fresh, safefs

#: Exit codes of ``python -m cinecut.worker``.
EXIT_DONE: Final = 0
EXIT_FAILED: Final = 1
EXIT_DISCARDED: Final = 2  # the film changed during the analysis; results were not saved
EXIT_STOPPED: Final = 3  # SIGTERM/SIGINT: stopped after a frame, partial saved

#: No event for this long while frames are being described: hung. A 13B model on a CPU takes minutes per
#: frame at worst; a GPU takes about a second.
FRAME_TIMEOUT_S: Final = 15 * 60.0
#: No event for this long before the first frame (probe, proxy, subtitles, keyframes of a long film on a
#: slow disk): hung.
STAGE_TIMEOUT_S: Final = 4 * 3600.0
#: How long a worker asked to stop may take to finish its frame before it is killed.
STOP_GRACE_S: Final = 120.0

MAX_LINE_BYTES: Final = 1 << 20
MAX_READ_PER_POLL: Final = 4 << 20
STDERR_TAIL_LINES: Final = 6
STDERR_TAIL_BYTES: Final = 16 * 1024

# Runs before the worker: ask the kernel for SIGTERM when the daemon (our parent) dies, then exec.
# If the parent is already gone (it died between fork and prctl), exit at once.
_LAUNCHER: Final = (
    "import ctypes,os,signal,sys\n"
    "try:\n"
    "    ctypes.CDLL(None,use_errno=True).prctl(1,int(signal.SIGTERM))\n"
    "except Exception:\n"
    "    pass\n"
    "if os.getppid()!=int(sys.argv[1]):\n"
    "    sys.exit(3)\n"
    "os.execv(sys.argv[2],sys.argv[2:])\n"
)


@dataclass(frozen=True, slots=True)
class Timeouts:
    frame_s: float = FRAME_TIMEOUT_S
    stage_s: float = STAGE_TIMEOUT_S
    stop_grace_s: float = STOP_GRACE_S


DEFAULT_TIMEOUTS: Final = Timeouts()


@dataclass(slots=True)
class WorkerExit:
    """How a worker ended, sorted into what the scheduler does next."""

    outcome: str  # "done" | "failed" | "discarded" | "stopped"
    returncode: int
    reason: str | None = None
    stderr_tail: list[str] = field(default_factory=list)


def signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


class WorkerProcess:
    """A running (or finished) worker. Every method returns at once; ``poll`` is called every loop turn."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        log_path: Path,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike[str] = "/",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self.timeouts = timeouts
        self._env = env
        self._cwd = cwd
        self._clock = clock
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None
        self.started_at = 0.0
        self.last_event_at = 0.0
        self.stop_reason: str | None = None
        self.stop_sent_at: float | None = None
        self.killed_for: str | None = None
        self.in_frames = False  # a progress event arrived: the frame timeout applies
        self.yielded = False
        self.yielded_to: str | None = None  # whom it yielded to ("Plex Transcoder (pid 42)"), if it said
        self.yield_reason: str | None = None
        self.error_reason: str | None = None
        self.other_output: deque[str] = deque(maxlen=5)  # stdout lines that are not events
        self._buf = bytearray()
        self._skipping = False
        self._fd: int | None = None
        self._exit: WorkerExit | None = None

    # ---------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Spawn the worker; OSError if it cannot be started (bad interpreter path, no memory)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ if self._env is None else self._env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        launcher = [sys.executable, "-c", _LAUNCHER, str(os.getpid())]
        # A log name that is a symlink, a hard link or not ours is replaced by a new file, never written through.
        with safefs.dir_fd(self.log_path.parent, follow_last=True) as log_dir:
            fd = fresh.open_append(log_dir, self.log_path.name, tmp_suffix=".log.tmp", mode=0o640)
        with open(fd, "ab", buffering=0) as err:
            os.fchmod(err.fileno(), 0o640)
            self.proc = subprocess.Popen(
                launcher + self.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                cwd=self._cwd,
                env=env,
                start_new_session=True,
                close_fds=True,
            )
        self.pid = self.proc.pid
        assert self.proc.stdout is not None
        self._fd = self.proc.stdout.fileno()
        os.set_blocking(self._fd, False)
        self.started_at = self.last_event_at = self._clock()

    @property
    def running(self) -> bool:
        return self._exit is None

    @property
    def exit(self) -> WorkerExit | None:
        return self._exit

    def poll(self) -> list[dict[str, Any]]:
        """New events from the worker (never blocks); after its exit, ``exit`` is set."""
        if self.proc is None or self._exit is not None:
            return []
        events = self._read_events()
        if self.proc.poll() is not None:
            events += self._read_events(final=True)
            self._exit = self._classify(self.proc.returncode)
            self._close_pipe()
        return events

    def stop(self, reason: str) -> None:
        """Ask the worker to stop after its current frame (SIGTERM to the worker itself, not its
        children: ffmpeg is the worker's to stop). Idempotent; the first reason is kept."""
        if self.proc is None or self._exit is not None:
            return
        if self.stop_reason is None:
            self.stop_reason = reason
            self.stop_sent_at = self._clock()
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)

    def kill(self, reason: str) -> None:
        """SIGKILL the worker's whole process group (its ffmpeg children too)."""
        if self.proc is None or self._exit is not None:
            return
        if self.killed_for is None:
            self.killed_for = reason
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def check_deadlines(self) -> str | None:
        """Enforce the hang and stop timeouts; returns what was done, if anything."""
        if self.proc is None or self._exit is not None or self.killed_for is not None:
            return None
        now = self._clock()
        if self.stop_sent_at is not None and now - self.stop_sent_at > self.timeouts.stop_grace_s:
            self.kill(f"did not stop within {self.timeouts.stop_grace_s:g} s of SIGTERM")
            return "killed"
        if self.yielded:
            return None  # waiting for an interactive run to release the GPU is not a hang
        limit = self.timeouts.frame_s if self.in_frames else self.timeouts.stage_s
        if now - self.last_event_at > limit:
            what = "a frame" if self.in_frames else "its current stage"
            self.kill(f"hung: no progress on {what} for {limit:g} s")
            return "killed"
        return None

    def wait(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds for the exit, draining events (shutdown only). True if exited."""
        deadline = time.monotonic() + timeout
        while self._exit is None:
            self.poll()
            if self._exit is not None or time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        return self._exit is not None

    # ---------------------------------------------------------------------------------- output
    def _read_events(self, *, final: bool = False) -> list[dict[str, Any]]:
        if self._fd is None:
            return []
        budget = MAX_READ_PER_POLL  # a chatty worker cannot keep the main loop here
        while final or budget > 0:
            try:
                chunk = os.read(self._fd, 1 << 16)
            except BlockingIOError:
                break
            except OSError:
                chunk = b""
            if not chunk:
                final = True
                break
            budget -= len(chunk)
            if self._skipping:  # the rest of an overlong line
                nl = chunk.find(b"\n")
                if nl < 0:
                    continue
                chunk, self._skipping = chunk[nl + 1 :], False
            self._buf += chunk
            if len(self._buf) > MAX_LINE_BYTES and b"\n" not in self._buf:
                self.other_output.append(f"<a line over {MAX_LINE_BYTES} bytes dropped>")
                self._buf.clear()
                self._skipping = True
        lines = self._buf.split(b"\n")
        self._buf = bytearray(lines.pop())
        if final and self._buf and not self._skipping:
            lines.append(bytes(self._buf))
            self._buf.clear()
        events: list[dict[str, Any]] = []
        for raw in lines:
            line = raw.strip()
            if not line:
                continue
            try:
                ev = json.loads(line)
            except ValueError:
                ev = None
            if not isinstance(ev, dict) or not isinstance(ev.get("event"), str):
                self.other_output.append(line[:300].decode("utf-8", "replace"))
                continue
            self._note(ev)
            events.append(ev)
        return events

    def _note(self, ev: dict[str, Any]) -> None:
        self.last_event_at = self._clock()
        kind = ev["event"]
        if kind == "progress":
            self.in_frames = True
            self.yielded = False  # frames are being described: whatever it waited for, it has it
            self.yielded_to = self.yield_reason = None
        elif kind == "yielded":
            self.yielded = True
            to, why = ev.get("to"), ev.get("reason")
            self.yielded_to = to[:200] if isinstance(to, str) and to else None
            self.yield_reason = why[:40] if isinstance(why, str) and why else None
        elif kind == "resumed":
            self.yielded = False
            self.yielded_to = self.yield_reason = None
        elif kind == "error" and ev.get("reason") is not None:
            self.error_reason = str(ev["reason"])[:2000]

    def _close_pipe(self) -> None:
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        self._fd = None

    def stderr_tail(self, lines: int = STDERR_TAIL_LINES) -> list[str]:
        """The last lines the worker wrote to stderr (its log file), for a failure's reason."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - STDERR_TAIL_BYTES))
                data = f.read()
        except OSError:
            return []
        text = data.decode("utf-8", "replace").splitlines()
        if size > STDERR_TAIL_BYTES and text:
            text = text[1:]  # the first line is probably cut
        return [t[:300] for t in text if t.strip()][-lines:]

    # ---------------------------------------------------------------------------------- exit
    def _classify(self, rc: int) -> WorkerExit:
        tail = self.stderr_tail()
        if rc == EXIT_DONE:
            return WorkerExit("done", rc, None, tail)
        if rc == EXIT_DISCARDED:
            return WorkerExit("discarded", rc, self.error_reason or "the film changed during the analysis", tail)
        if self.stop_reason is not None:
            # We asked it to stop: whatever the exit (even a kill after the grace period), it is a stop,
            # not the film's failure; the partial holds every frame that was saved.
            why = self.stop_reason if self.killed_for is None else f"{self.stop_reason}; {self.killed_for}; killed"
            return WorkerExit("stopped", rc, why, tail)
        if self.killed_for is not None:
            return WorkerExit("failed", rc, f"worker {self.killed_for}; killed", tail)
        if rc == EXIT_STOPPED:
            return WorkerExit("stopped", rc, "stopped by a signal from outside the daemon", tail)
        if rc < 0:
            sig = signal_name(-rc)
            why = f"worker crashed: killed by {sig}"
            if -rc == signal.SIGKILL:
                why += " (out of memory? the kernel's OOM killer sends SIGKILL)"
            elif -rc == signal.SIGABRT:
                why += " (aborted by native code)"
            if tail:
                why += f"; last stderr: {tail[-1]}"
            return WorkerExit("failed", rc, why, tail)
        why = self.error_reason or f"worker exited with status {rc}"
        if not self.error_reason and tail:
            why += f"; last stderr: {tail[-1]}"
        return WorkerExit("failed", rc, why, tail)
