"""The worker supervisor against real child processes that crash, hang, ignore SIGTERM or spew garbage.

The children are small stand-in workers speaking the worker's JSON-lines protocol, because the point
here is what the supervisor does with each way a process can end; the real worker is exercised end to
end through the daemon in test_prewarm_daemon.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cinecutd.prewarm.supervisor import Timeouts, WorkerProcess

STAND_IN = textwrap.dedent(
    """
    import json, os, signal, subprocess, sys, time

    mode = sys.argv[1]
    stop = False

    def emit(**ev):
        print(json.dumps(ev), flush=True)

    def on_term(signum, frame):
        global stop
        stop = True

    emit(event="started", film="f.mkv", pid=os.getpid())
    if mode == "ok":
        emit(event="stage", stage="proxy")
        for i in range(1, 4):
            emit(event="progress", done=i, total=3, fps=10.0)
        emit(event="done", cache="c", records=3, frames_computed=3)
    elif mode == "segv":
        emit(event="progress", done=1, total=9, fps=1.0)
        print("native code went wrong here", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGSEGV)
    elif mode == "error":
        print("loading model...", file=sys.stderr, flush=True)
        emit(event="error", reason="model /m.gguf: not a GGUF file")
        sys.exit(1)
    elif mode == "traceback":
        print("Traceback (most recent call last):\\n  File 'x'\\nValueError: boom", file=sys.stderr, flush=True)
        sys.exit(1)
    elif mode == "changed":
        sys.exit(2)
    elif mode == "hang_frame":
        emit(event="progress", done=1, total=9, fps=1.0)
        time.sleep(60)
    elif mode == "hang_stage":
        emit(event="stage", stage="proxy")
        time.sleep(60)
    elif mode == "yield":
        emit(event="progress", done=1, total=2, fps=1.0)
        emit(event="yielded")
        time.sleep(float(sys.argv[2]))
        emit(event="resumed")
        emit(event="progress", done=2, total=2, fps=1.0)
        emit(event="done", cache="c", records=2, frames_computed=2)
    elif mode == "frames":
        signal.signal(signal.SIGTERM, on_term)
        i = 0
        while not stop:
            i += 1
            time.sleep(0.02)
            emit(event="progress", done=i, total=10**6, fps=50.0)
        sys.exit(3)
    elif mode == "ignore_term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen(["sleep", "60"])
        emit(event="child", pid=child.pid)
        emit(event="progress", done=1, total=9, fps=1.0)
        time.sleep(60)
    elif mode == "garbage":
        print("llama.cpp says hello", flush=True)
        sys.stdout.write("x" * (3 << 20) + "\\n")
        print("[1, 2, 3]", flush=True)
        print('{"no_event": 1}', flush=True)
        sys.stdout.write('{"event": "progress", "done": 1, "total": 1, "fps": 1.0}\\n{"event": "done", ')
        sys.stdout.flush()
        time.sleep(0.2)
        sys.stdout.write('"cache": "c", "records": 1, "frames_computed": 1}')  # no final newline
        sys.stdout.flush()
    elif mode == "parent_death":
        signal.signal(signal.SIGTERM, on_term)
        emit(event="progress", done=1, total=9, fps=1.0)
        while not stop:
            time.sleep(0.01)
        with open(sys.argv[2] + ".tmp", "w") as f:  # renamed into place: the test never reads it half-written
            f.write("got SIGTERM")
        os.replace(sys.argv[2] + ".tmp", sys.argv[2])
        sys.exit(3)
    """
)

FAST = Timeouts(frame_s=0.6, stage_s=0.8, stop_grace_s=0.6)


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("stand-in") / "worker.py"
    p.write_text(STAND_IN)
    return p


def run(stand_in: Path, tmp_path: Path, *args: str, timeouts: Timeouts = FAST,
        on_event=None, limit: float = 20.0) -> tuple[WorkerProcess, list[dict]]:
    w = WorkerProcess([sys.executable, str(stand_in), *args], log_path=tmp_path / "logs" / "job.log",
                      timeouts=timeouts)
    w.start()
    events: list[dict] = []
    deadline = time.monotonic() + limit
    while w.running:
        new = w.poll()
        events += new
        for ev in new:
            if on_event is not None:
                on_event(w, ev)
        w.check_deadlines()
        assert time.monotonic() < deadline, f"worker still running after {limit} s: {events[-3:]}"
        time.sleep(0.01)
    return w, events


def test_a_clean_run_is_done_and_every_event_arrives_in_order(stand_in: Path, tmp_path: Path) -> None:
    w, events = run(stand_in, tmp_path, "ok")
    assert [e["event"] for e in events] == ["started", "stage", "progress", "progress", "progress", "done"]
    assert events[0]["pid"] == w.pid  # the launcher exec'd the worker: same process
    assert w.exit is not None and (w.exit.outcome, w.exit.returncode) == ("done", 0)


def test_a_segfault_is_a_failure_naming_the_signal_and_the_last_stderr_line(stand_in: Path, tmp_path: Path) -> None:
    w, _ = run(stand_in, tmp_path, "segv")
    assert w.exit is not None and w.exit.outcome == "failed" and w.exit.returncode == -signal.SIGSEGV
    assert "SIGSEGV" in w.exit.reason and "native code went wrong here" in w.exit.reason
    assert (tmp_path / "logs" / "job.log").read_text().strip() == "native code went wrong here"


def test_the_workers_own_error_event_is_the_reason(stand_in: Path, tmp_path: Path) -> None:
    w, _ = run(stand_in, tmp_path, "error")
    assert w.exit is not None and w.exit.outcome == "failed"
    assert w.exit.reason == "model /m.gguf: not a GGUF file"
    assert w.exit.stderr_tail == ["loading model..."]


def test_without_an_error_event_the_stderr_tail_explains(stand_in: Path, tmp_path: Path) -> None:
    w, _ = run(stand_in, tmp_path, "traceback")
    assert w.exit is not None and w.exit.outcome == "failed"
    assert "status 1" in w.exit.reason and "ValueError: boom" in w.exit.reason


def test_exit_2_means_the_film_changed_and_is_not_a_failure(stand_in: Path, tmp_path: Path) -> None:
    w, _ = run(stand_in, tmp_path, "changed")
    assert w.exit is not None and w.exit.outcome == "discarded"


@pytest.mark.parametrize(("mode", "what"), [("hang_frame", "a frame"), ("hang_stage", "its current stage")])
def test_a_silent_worker_is_killed_as_hung(stand_in: Path, tmp_path: Path, mode: str, what: str) -> None:
    t0 = time.monotonic()
    w, _ = run(stand_in, tmp_path, mode)
    assert w.exit is not None and w.exit.outcome == "failed" and w.exit.returncode == -signal.SIGKILL
    assert f"hung: no progress on {what}" in w.exit.reason
    assert time.monotonic() - t0 < 8


def test_waiting_for_an_interactive_run_is_not_a_hang(stand_in: Path, tmp_path: Path) -> None:
    w, events = run(stand_in, tmp_path, "yield", "1.5")  # yielded for longer than the frame timeout
    assert w.exit is not None and w.exit.outcome == "done"
    assert "resumed" in [e["event"] for e in events]


def test_stop_asks_politely_and_the_worker_exits_3(stand_in: Path, tmp_path: Path) -> None:
    def stop_at_5(w: WorkerProcess, ev: dict) -> None:
        if ev.get("done") == 5:
            w.stop("the window closed")

    w, events = run(stand_in, tmp_path, "frames", on_event=stop_at_5)
    assert w.exit is not None and (w.exit.outcome, w.exit.returncode) == ("stopped", 3)
    assert w.exit.reason == "the window closed"
    assert max(e.get("done", 0) for e in events) <= 7  # stopped within a frame or two, not at the end


def test_a_worker_ignoring_sigterm_is_killed_with_its_children(stand_in: Path, tmp_path: Path) -> None:
    child: list[int] = []

    def on_event(w: WorkerProcess, ev: dict) -> None:
        if ev["event"] == "child":
            child.append(ev["pid"])
        if ev["event"] == "progress":
            w.stop("paused")

    w, _ = run(stand_in, tmp_path, "ignore_term", on_event=on_event)
    assert w.exit is not None and w.exit.outcome == "stopped" and w.exit.returncode == -signal.SIGKILL
    assert "did not stop within" in w.exit.reason
    assert child
    deadline = time.monotonic() + 5
    while _alive(child[0]) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _alive(child[0]), "the worker's child survived the group kill"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_garbage_on_stdout_is_skipped_and_a_last_line_without_newline_counts(stand_in: Path, tmp_path: Path) -> None:
    w, events = run(stand_in, tmp_path, "garbage")
    assert [e["event"] for e in events] == ["started", "progress", "done"]
    assert events[-1]["records"] == 1
    assert list(w.other_output) == ["llama.cpp says hello", f"<a line over {1 << 20} bytes dropped>", "[1, 2, 3]",
                                    '{"no_event": 1}']
    assert w.exit is not None and w.exit.outcome == "done"


def test_a_worker_whose_daemon_dies_gets_sigterm(stand_in: Path, tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG: a SIGKILLed daemon never leaves a worker holding the GPU."""
    marker = tmp_path / "marker"
    parent_code = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from cinecutd.prewarm.supervisor import WorkerProcess
        w = WorkerProcess([sys.executable, {str(stand_in)!r}, "parent_death", {str(marker)!r}],
                          log_path=Path({str(tmp_path / "w.log")!r}))
        w.start()
        while not any(e["event"] == "progress" for e in w.poll()):
            time.sleep(0.01)
        print(w.pid, flush=True)
        time.sleep(60)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    worker_pid = int(parent.stdout.readline())
    parent.kill()
    parent.wait(5)
    deadline = time.monotonic() + 10
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marker.read_text() == "got SIGTERM"
    while _alive(worker_pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _alive(worker_pid)


def test_an_interpreter_that_does_not_exist_fails_the_job_with_why(tmp_path: Path) -> None:
    w = WorkerProcess(["/nonexistent/python3", "-m", "cinecut.worker"], log_path=tmp_path / "j.log", timeouts=FAST)
    w.start()
    while w.running:
        w.poll()
        time.sleep(0.01)
    assert w.exit is not None and w.exit.outcome == "failed"
    assert "No such file" in w.exit.reason or "FileNotFoundError" in w.exit.reason


def test_the_log_file_is_not_world_readable(stand_in: Path, tmp_path: Path) -> None:
    run(stand_in, tmp_path, "ok")
    assert os.stat(tmp_path / "logs" / "job.log").st_mode & 0o007 == 0
