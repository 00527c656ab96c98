"""The pre-warm worker as the daemon runs it: a real child process, real signals, real GPU-lock contention."""

from __future__ import annotations

import itertools
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import upstream_reader as up
from test_pipeline import analyzed_film, clone_film_dir, copy_film, partial_count, ready_for_inference_film

from cinecut.demo.tinymodel import TinyLlava
from cinecut.locks import GpuLock, work_dir_lock
from cinecut.workdir import WorkDir

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 60.0


#: The tiny model describes a frame in milliseconds; this fault point holds each frame open 0.1 s.
SLOW_FRAMES = "slow:prewarm.after_frame"


class Worker:
    """A ``python -m cinecut.worker`` child whose JSON lines are parsed as they arrive."""

    def __init__(
        self,
        film: Path,
        tiny: TinyLlava,
        gpu_lock: Path,
        *extra: str,
        model: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        argv = [
            sys.executable,
            "-m",
            "cinecut.worker",
            "--film",
            str(film),
            "--model",
            str(model or tiny.model_path),
            "--mmproj",
            str(tiny.mmproj_path),
            "--n-gpu-layers",
            "0",
            "--n-ctx",
            "4096",
            "--max-tokens",
            "256",
            "--gpu-lock",
            str(gpu_lock),
            "--vibe",
            "action",
            *extra,
        ]
        if env is None:  # each frame 0.1 s longer: a signal sent at the first progress lands mid-inference
            env = {**os.environ, "CINECUTD_FAULTS": SLOW_FRAMES}
        self.proc = subprocess.Popen(
            argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self.stderr = ""
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.raw.append(line)
            self.events.put(json.loads(line))

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        self.stderr = self.proc.stderr.read()

    def next_event(self, event: str, timeout: float = TIMEOUT, **match: Any) -> dict[str, Any]:
        """The next event named ``event`` (with the given field values); earlier ones are kept in ``seen``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                ev = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"no {event!r} event; seen {self.seen}; stderr:\n{self.stderr}"
                ) from None
            self.seen.append(ev)
            if ev["event"] == event and all(ev.get(k) == v for k, v in match.items()):
                return ev

    def wait(self, timeout: float = TIMEOUT) -> int:
        rc = self.proc.wait(timeout)
        time.sleep(0.05)  # let the reader threads drain the pipes
        while not self.events.empty():
            self.seen.append(self.events.get())
        return rc

    def names(self) -> list[str]:
        return [e["event"] for e in self.seen]


@pytest.fixture(scope="module")
def dense(tmp_path_factory, synthetic_film_template, tiny_llava) -> Path:
    return ready_for_inference_film(tmp_path_factory, synthetic_film_template, tiny_llava)


@pytest.fixture
def film(dense: Path, tmp_path: Path) -> Path:
    return clone_film_dir(dense, tmp_path / "lib" / "Demo Film (2024)")


@pytest.fixture
def analyzed_for_cli(tmp_path_factory, synthetic_film_template, tiny_llava, tmp_path: Path) -> Path:
    src, _ = analyzed_film(tmp_path_factory, synthetic_film_template, tiny_llava)
    return clone_film_dir(src, tmp_path / "lib2" / "Other Film", keep_cache=False)


def shared_flock_holders(path: Path) -> set[int]:
    """Pids holding a shared flock on ``path`` now, read from /proc/locks (which takes no lock itself)."""
    try:
        ino = path.stat().st_ino
    except FileNotFoundError:
        return set()
    pids = set()
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        # "1: FLOCK  ADVISORY  READ  1234 fe:00:5678 0 EOF" (blocked waiters have a "->" field first)
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[3] == "READ":
            if fields[5].rsplit(":", 1)[-1] == str(ino):
                pids.add(int(fields[4]))
    return pids


def _total(film: Path) -> int:
    return len(json.loads(WorkDir.for_film(film).timestamps_path.read_text()))


def test_a_full_run_then_a_cache_hit_speak_only_json_lines(
    analyzed_for_cli: Path, tiny_llava, tmp_path: Path
) -> None:
    film = analyzed_for_cli
    lock = tmp_path / "gpu.lock"
    w = Worker(film, tiny_llava, lock)
    assert w.wait() == 0, w.stderr
    total = _total(film)
    assert w.seen[0] == {"event": "started", "film": str(film), "pid": w.proc.pid}
    assert w.names()[1] == "stage" and w.seen[1]["stage"] == "inference"  # stages 1-3 were complete
    progress = [e for e in w.seen if e["event"] == "progress"]
    assert progress and progress[-1]["done"] == progress[-1]["total"] == total
    assert all(a["done"] < b["done"] for a, b in itertools.pairwise(progress))
    assert all(isinstance(e["fps"], float) and e["fps"] >= 0 for e in progress)
    done = w.seen[-1]
    assert done == {
        "event": "done",
        "cache": str(WorkDir.for_film(film).cache_path),
        "records": total,
        "frames_computed": total,
        "frames_salvaged": 0,
    }
    assert all(line.endswith("\n") and json.loads(line) for line in w.raw)  # nothing else on stdout
    assert len(up.load_cache(film, WorkDir.for_film(film).path) or []) == total

    again = Worker(film, tiny_llava, lock, model=tmp_path / "no-such-model.gguf")
    assert again.wait() == 0, again.stderr
    assert again.names() == ["started", "stage", "cache_hit", "done"]
    assert again.seen[-1]["frames_computed"] == 0 and again.seen[-1]["records"] == total


def test_sigkill_mid_inference_leaves_a_partial_the_next_run_resumes(
    film: Path, tiny_llava, tmp_path: Path
) -> None:
    lock = tmp_path / "gpu.lock"
    total = _total(film)
    w = Worker(film, tiny_llava, lock)
    w.next_event("progress")
    w.proc.send_signal(signal.SIGKILL)
    assert w.wait() == -signal.SIGKILL
    k = partial_count(film)
    assert 1 <= k < total, (k, total)
    assert not WorkDir.for_film(film).cache_path.exists()
    again = Worker(film, tiny_llava, lock)
    assert again.wait() == 0, again.stderr
    # Every frame written before the kill is reused; only the one in flight (never written) runs again.
    assert again.seen[-1]["frames_computed"] == total - k
    assert len(up.load_cache(film, WorkDir.for_film(film).path) or []) == total


def test_sigterm_stops_after_the_current_frame_with_exit_3(film: Path, tiny_llava, tmp_path: Path) -> None:
    lock = tmp_path / "gpu.lock"
    total = _total(film)
    w = Worker(film, tiny_llava, lock)
    w.next_event("progress")
    w.proc.send_signal(signal.SIGTERM)
    assert w.wait() == 3, w.stderr
    assert "error" not in w.names() and "done" not in w.names()
    k = partial_count(film)
    assert 1 <= k < total
    assert w.seen[-1] == {"event": "progress", "done": k, "total": total, "fps": w.seen[-1]["fps"],
                          "computed": w.seen[-1]["computed"]}
    again = Worker(film, tiny_llava, lock)
    assert again.wait() == 0, again.stderr
    assert again.seen[-1]["frames_computed"] == total - k  # zero frames re-done


def test_a_crash_just_before_the_cache_is_saved_loses_no_frame(
    analyzed_for_cli: Path, tiny_llava, tmp_path: Path
) -> None:
    film = analyzed_for_cli
    total = _total(film)
    env = {**os.environ, "CINECUTD_FAULTS": "kill:prewarm.before_cache_save"}
    w = Worker(film, tiny_llava, tmp_path / "gpu.lock", env=env)
    assert w.wait() == -signal.SIGKILL
    wd = WorkDir.for_film(film)
    assert partial_count(film) == total and not wd.cache_path.exists()
    # Every frame is in the partial results: the next run saves the cache without loading any model.
    again = Worker(film, tiny_llava, tmp_path / "gpu.lock", model=tmp_path / "no-such-model.gguf")
    assert again.wait() == 0, again.stderr
    assert again.seen[-1] == {
        "event": "done",
        "cache": str(wd.cache_path),
        "records": total,
        "frames_computed": 0,
        "frames_salvaged": 0,
    }
    assert len(up.load_cache(film, wd.path) or []) == total and not wd.partial_cache_path.exists()


def test_sigterm_during_ingestion_stops_at_once(synthetic_film_template, tiny_llava, tmp_path: Path) -> None:
    fresh = copy_film(synthetic_film_template, tmp_path / "lib")
    w = Worker(fresh, tiny_llava, tmp_path / "gpu.lock")
    w.next_event("stage", stage="proxy")
    time.sleep(0.2)  # ffmpeg is encoding
    sent = time.monotonic()
    w.proc.send_signal(signal.SIGTERM)
    assert w.wait() == 3, w.stderr
    assert time.monotonic() - sent < 5
    wd = WorkDir.for_film(fresh)
    assert not wd.proxy_path.exists()
    assert not [n for n in os.listdir(wd.path) if n.endswith(".proxy.tmp")]  # ffmpeg's output removed
    assert "proxy" not in (up.load_checkpoint(wd.path) or up.PipelineCheckpoint("", "")).stages_complete


def test_film_modified_mid_inference_exits_2_and_saves_nothing(
    film: Path, tiny_llava, tmp_path: Path
) -> None:
    w = Worker(film, tiny_llava, tmp_path / "gpu.lock")
    w.next_event("progress")
    with open(film, "ab") as f:
        f.write(b"\0" * 4096)
    assert w.wait() == 2, w.stderr
    err = w.seen[-1]
    assert err["event"] == "error" and "changed during analysis" in err["reason"]
    wd = WorkDir.for_film(film)
    assert not wd.cache_path.exists() and not wd.partial_cache_path.exists()
    assert up.load_checkpoint_strict(wd.path).stages_complete == []


def test_prewarm_hands_the_gpu_to_an_interactive_cli_within_one_frame(
    film: Path, analyzed_for_cli: Path, tiny_llava, tmp_path: Path
) -> None:
    lock = tmp_path / "gpu.lock"
    total = _total(film)
    interactive_film = analyzed_for_cli
    # The interactive run first waits on its own work dir (held here), so it can be released the moment
    # the worker is mid-inference: the GPU request then follows within milliseconds.
    held = work_dir_lock(WorkDir.for_film(interactive_film), purpose="test")
    assert held.try_acquire()
    cli = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cinecut.cli",
            "analyze",
            str(interactive_film),
            "--gpu-lock",
            str(lock),
            "--model",
            str(tiny_llava.model_path),
            "--mmproj",
            str(tiny_llava.mmproj_path),
            "--n-gpu-layers",
            "0",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert cli.stdout is not None
    assert "Waiting for the work dir" in cli.stdout.readline()
    w = Worker(film, tiny_llava, lock)
    w.next_event("progress")
    request: dict[str, int] = {}

    want = lock.with_name(lock.name + ".want")

    def watch_want() -> None:
        # Watched in /proc/locks rather than by probing the lock: a probe would itself look like a waiter.
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if cli.pid in shared_flock_holders(want):
                request["frames"] = partial_count(film)
                return
            time.sleep(0.001)

    watcher = threading.Thread(target=watch_want)
    watcher.start()
    held.release()
    w.next_event("yielded")
    at_yield = partial_count(film)  # stable: the worker is waiting for the GPU
    watcher.join()
    out, err = cli.communicate(timeout=TIMEOUT)
    assert cli.returncode == 0, err
    assert "Waiting for the GPU: held by prewarm" in out and "Saved" in out
    assert at_yield < total, "the worker finished before the interactive run asked"
    frames_between = at_yield - request["frames"]
    assert 0 <= frames_between <= 1, frames_between
    w.next_event("resumed")
    assert w.wait() == 0, w.stderr
    assert w.seen[-1]["frames_computed"] == total  # nothing was redone around the hand-over
    assert len(up.load_cache(interactive_film, WorkDir.for_film(interactive_film).path) or []) > 0


def test_a_gpu_busy_before_the_first_frame_is_reported_as_yielded(
    analyzed_for_cli: Path, tiny_llava, tmp_path: Path
) -> None:
    lock = tmp_path / "gpu.lock"
    interactive = GpuLock(lock, purpose="cinecut analyze", interactive=True)
    interactive.acquire(5)
    try:
        w = Worker(analyzed_for_cli, tiny_llava, lock)
        w.next_event("yielded")
        time.sleep(0.3)
        assert partial_count(analyzed_for_cli) == 0  # it waits, without touching the GPU
    finally:
        interactive.release()
    w.next_event("resumed")
    assert w.wait() == 0, w.stderr
    assert w.seen[-1]["frames_computed"] == _total(analyzed_for_cli)


def test_failures_are_error_events_with_exit_1(film: Path, tiny_llava, tmp_path: Path) -> None:
    missing = Worker(tmp_path / "absent.mkv", tiny_llava, tmp_path / "gpu.lock")
    assert missing.wait() == 1
    assert missing.names() == ["started", "error"] and "no such file" in missing.seen[-1]["reason"]
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a model")
    bad_model = Worker(film, tiny_llava, tmp_path / "gpu.lock", model=broken)
    assert bad_model.wait() == 1
    assert bad_model.seen[-1]["event"] == "error" and "broken.gguf" in bad_model.seen[-1]["reason"]
    assert partial_count(film) == 0
    usage = subprocess.run(
        [sys.executable, "-m", "cinecut.worker", "--film", str(film)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert usage.returncode == 1
    event = json.loads(usage.stdout)
    assert event["event"] == "error" and "--model" in event["reason"]
