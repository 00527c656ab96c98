"""The pre-warm scheduler on a real Engine over real library folders, with an injectable wall clock.

Queue order, window transitions, placement (GPU / CPU / wait), failures and control commands are the
scheduler's; the jobs here are small stand-in workers speaking the worker's protocol (they write a real
cache with the core library, crash, or run until SIGTERM), so each test takes a fraction of a second.
The real worker runs end to end through the daemon in test_prewarm_daemon.py.
"""

from __future__ import annotations

import os
import sys
import textwrap
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from cinecut.stamp import SourceStamp
from cinecutd.config import Config, PrewarmConfig, Window, parse_config
from cinecutd.control import ControlError
from cinecutd.engine import Engine
from cinecutd.prewarm import jobqueue
from cinecutd.prewarm.jobqueue import Failure, Request
from cinecutd.prewarm.scheduler import PrewarmScheduler
from cinecutd.prewarm.supervisor import Timeouts
from cinecutd.prewarm.vram import Gpu, GpuInfo
from cinecutd.registry import FilmState

STAND_IN = textwrap.dedent(
    """
    import json, os, signal, sys, time
    from pathlib import Path

    film, journal = Path(sys.argv[1]), sys.argv[2]
    stop = False

    def emit(**ev):
        print(json.dumps(ev), flush=True)

    def on_term(signum, frame):
        global stop
        stop = True

    with open(journal, "a") as j:
        j.write(f"start\\t{film.name}\\t{time.time()!r}\\n")
    emit(event="started", film=str(film), pid=os.getpid())
    stem = film.stem.lower()
    if "crash" in stem:
        os.kill(os.getpid(), signal.SIGSEGV)
    if "slow" in stem or "stubborn" in stem:
        signal.signal(signal.SIGTERM, signal.SIG_IGN if "stubborn" in stem else on_term)
        i = 0
        while not stop:
            i += 1
            emit(event="progress", done=i, total=10**6, fps=40.0)
            time.sleep(0.025)
        sys.exit(3)
    from cinecut.inference.cache import save_cache
    from cinecut.workdir import WorkDir
    emit(event="stage", stage="inference")
    emit(event="progress", done=1, total=2, fps=100.0)
    emit(event="progress", done=2, total=2, fps=100.0)
    path = save_cache([], film, WorkDir.for_film(film))
    emit(event="done", cache=str(path), records=2, frames_computed=2)
    with open(journal, "a") as j:
        j.write(f"end\\t{film.name}\\t{time.time()!r}\\n")
    """
)

FAST = Timeouts(frame_s=5.0, stage_s=5.0, stop_grace_s=0.5)


class Clock:
    """The scheduler's wall clock (local time), moved by the test."""

    def __init__(self, when: datetime) -> None:
        self.now = when

    def __call__(self) -> datetime:
        return self.now


class Setup:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.lib = tmp_path / "films"
        self.lib.mkdir()
        self.script = tmp_path / "stand_in.py"
        self.script.write_text(STAND_IN)
        self.journal = tmp_path / "journal.txt"
        self.journal.touch()
        self.model = tmp_path / "model.gguf"
        self.mmproj = tmp_path / "mmproj.gguf"
        self.model.write_bytes(b"GGUF" + b"\0" * 1024)
        self.mmproj.write_bytes(b"GGUF" + b"\0" * 512)
        self.clock = Clock(datetime(2024, 5, 1, 2, 0, 0))

    def film(self, stem: str, mtime: float | None = None) -> Path:
        folder = self.lib / stem
        folder.mkdir(exist_ok=True)
        path = folder / f"{stem}.mkv"
        path.write_bytes(stem.encode() * 100)
        if mtime is not None:
            os.utime(path, (mtime, mtime))
        return path

    def config(self, **prewarm: Any) -> Config:
        p = {"enabled": True, "window": "always", "model": str(self.model), "mmproj": str(self.mmproj),
             "settle_seconds": 0, "gpu_lock": str(self.tmp / "gpu.lock"), "n_gpu_layers": 0, **prewarm}
        data = {
            "daemon": {"state_dir": str(self.tmp / "state"), "settle_seconds": 0, "rescan_interval": 0},
            "library": [{"path": str(self.lib)}],
            "control": {"socket": str(self.tmp / "d.sock")},
            "prewarm": p,
        }
        return parse_config(data, self.tmp / "cinecutd.toml")

    def argv(self, state: FilmState, pw: PrewarmConfig) -> list[str]:
        return [sys.executable, str(self.script), str(state.film), str(self.journal)]

    def scheduler(self, config: Config | None = None, **kw: Any) -> tuple[Engine, PrewarmScheduler]:
        config = config or self.config()
        engine = Engine(config)
        sched = PrewarmScheduler(config, engine, clock=self.clock, timeouts=FAST, worker_argv=self.argv, **kw)
        engine.on_film_changed = sched.on_film_changed
        engine.on_reconciled = sched.on_reconciled
        engine.reconcile("startup")
        self.sched = sched
        return engine, sched

    def starts(self) -> list[str]:
        return [line.split("\t")[1] for line in self.journal.read_text().splitlines() if line.startswith("start")]


@pytest.fixture
def s(tmp_path: Path):
    setup = Setup(tmp_path)
    yield setup
    sched = getattr(setup, "sched", None)
    if sched is not None:
        sched.stop(timeout=2.0)


def run_until(sched: PrewarmScheduler, predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        sched.tick()
        result = predicate()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out; status: {sched.status()}"
        time.sleep(0.01)


def idle(sched: PrewarmScheduler) -> bool:
    st = sched.status()
    return st["current"] is None and not st["queue"]


# ------------------------------------------------------------------------------------------ pure queue logic


def state(film: str, mtime: float, **kw: Any) -> FilmState:
    st = FilmState(Path(film), Path("/lib"), Path(film + "_work"), stamp=SourceStamp(mtime, 100))
    for k, v in kw.items():
        setattr(st, k, v)
    return st


def test_order_is_now_requests_then_requests_then_newest_first() -> None:
    films = [state("/lib/old.mkv", 100.0), state("/lib/new.mkv", 300.0), state("/lib/mid.mkv", 200.0),
             state("/lib/asked.mkv", 50.0), state("/lib/urgent.mkv", 10.0), state("/lib/first.mkv", 20.0)]
    requests = {Path("/lib/asked.mkv"): Request(1, False), Path("/lib/urgent.mkv"): Request(3, True),
                Path("/lib/first.mkv"): Request(2, True)}
    order = [s.film.name for s in jobqueue.order(films, requests)]
    assert order == ["first.mkv", "urgent.mkv", "asked.mkv", "new.mkv", "mid.mkv", "old.mkv"]


def test_why_not_names_every_reason_to_wait() -> None:
    now = 1000.0
    ok = dict(now=now, settle_seconds=60.0)
    assert jobqueue.why_not(state("/l/a.mkv", 1.0), **ok) is None
    assert jobqueue.why_not(state("/l/a.mkv", 1.0, cache="valid"), **ok) == "warm"
    assert jobqueue.why_not(state("/l/a.mkv", 1.0, cache="stale"), **ok) is None
    assert jobqueue.why_not(state("/l/a.mkv", 1.0, conflict=True), **ok) == "same-stem conflict"
    assert jobqueue.why_not(state("/l/a.mkv", 1.0, refused="symlink"), **ok) == "work dir refused"
    assert jobqueue.why_not(state("/l/a.mkv", 1.0, pending="video"), **ok) == "waiting for a pipeline's lock"
    assert jobqueue.why_not(state("/l/a.mkv", 1.0, last_change=now - 59), **ok) == "settling"
    assert jobqueue.why_not(state("/l/a.mkv", 1.0, last_change=now - 61), **ok) is None
    assert jobqueue.why_not(state("/l/a.mkv", 1.0, settle_due=now + 1), **ok) == "settling"
    assert jobqueue.why_not(state("/l/a.mkv", 1.0), skip_until=now + 5, now=now, settle_seconds=60) == \
        "open for writing"
    assert jobqueue.why_not(FilmState(Path("/l/x.mkv"), Path("/l"), Path("/w")), **ok) == "unreadable"
    failed = Failure("boom", 0.0, SourceStamp(1.0, 100), ())
    assert jobqueue.why_not(state("/l/a.mkv", 1.0), failure=failed, **ok) == "failed"
    assert jobqueue.why_not(state("/l/a.mkv", 2.0), failure=failed, **ok) is None  # a new file: retried
    with_sub = state("/l/a.mkv", 1.0, subtitles=(Path("/l/a.srt"),))
    assert jobqueue.why_not(with_sub, failure=failed, **ok) is None  # a subtitle appeared: retried


def test_next_settle_is_the_earliest_future_settle_of_a_cold_film() -> None:
    films = [state("/l/a.mkv", 1.0, last_change=100.0), state("/l/b.mkv", 1.0, last_change=90.0),
             state("/l/c.mkv", 1.0, last_change=95.0, cache="valid"), state("/l/d.mkv", 1.0, last_change=0.0)]
    assert jobqueue.next_settle(films, 120.0, 60.0) == 150.0
    assert jobqueue.next_settle(films, 200.0, 60.0) is None


# ------------------------------------------------------------------------------------------ the scheduler


def test_films_are_prewarmed_newest_first_one_at_a_time_and_become_warm(s: Setup) -> None:
    t = time.time()
    films = [s.film("Old", t - 300), s.film("Newest", t - 100), s.film("Middle", t - 200)]
    engine, sched = s.scheduler()
    assert sched.status()["queue"] == [str(films[1]), str(films[2]), str(films[0])]
    run_until(sched, lambda: sched.status()["completed"] == 3)
    assert s.starts() == ["Newest.mkv", "Middle.mkv", "Old.mkv"]
    lines = s.journal.read_text().splitlines()
    assert [ln.split("\t")[0] for ln in lines] == ["start", "end"] * 3  # never two jobs at once
    assert all(engine.reg.films[f].cache == "valid" for f in films)  # the engine learned they are warm
    assert sched.status()["state"] == "idle"
    assert sched.film_status(str(films[0]))["last"]["outcome"] == "done"
    assert sched.film_status(str(films[0]))["state"] == "warm"
    assert sched.status_line() == "pre-warm idle"


def test_window_end_stops_the_job_and_the_next_window_restarts_it(s: Setup) -> None:
    film = s.film("A slow film")
    s.clock.now = datetime(2024, 5, 1, 5, 59, 0)
    _, sched = s.scheduler(s.config(window="01:00-06:00"))
    cur = run_until(sched, lambda: (c := sched.status()["current"]) and c["done"] >= 3 and c)
    assert cur["film"] == str(film)
    assert sched.status()["window_end"] == "2024-05-01T06:00:00"
    s.clock.now = datetime(2024, 5, 1, 6, 0, 0)  # the window closes
    run_until(sched, lambda: sched.status()["current"] is None)
    st = sched.status()
    assert st["state"] == "waiting-window"
    assert st["next_window"] == "2024-05-02T01:00:00"
    assert st["queue"] == [str(film)] and st["failures"] == []
    assert sched.film_status(str(film))["last"]["outcome"] == "stopped"
    assert sched.film_status(str(film))["last"]["reason"] == "the window closed"
    assert sched.status_line() == "pre-warm idle until 01:00, 1 queued"
    for _ in range(20):
        sched.tick()
    assert s.starts() == ["A slow film.mkv"]  # nothing starts outside the window
    s.clock.now = datetime(2024, 5, 2, 1, 0, 0)
    run_until(sched, lambda: sched.status()["current"] is not None and len(s.starts()) == 2)


def test_now_runs_outside_the_window_and_is_not_stopped_by_it(s: Setup) -> None:
    film = s.film("Urgent slow film")
    s.clock.now = datetime(2024, 5, 1, 12, 0, 0)
    _, sched = s.scheduler(s.config(window="01:00-06:00"))
    for _ in range(10):
        sched.tick()
    assert sched.status()["state"] == "waiting-window" and sched.status()["current"] is None
    reply = sched.request(film, now=True)
    assert reply["state"] == "queued"
    cur = run_until(sched, lambda: (c := sched.status()["current"]) and c["done"] >= 2 and c)
    assert cur["forced"] is True
    for _ in range(10):
        sched.tick()
        time.sleep(0.01)
    assert sched.status()["current"]["stopping"] is None


def test_a_crash_is_a_failure_with_its_reason_and_is_not_retried_until_asked_or_changed(s: Setup) -> None:
    film = s.film("Crash test")
    engine, sched = s.scheduler()
    run_until(sched, lambda: sched.status()["failures"])
    failure = sched.status()["failures"][0]
    assert failure["film"] == str(film) and "SIGSEGV" in failure["reason"]
    for _ in range(30):
        sched.tick()
        time.sleep(0.01)
    assert s.starts() == ["Crash test.mkv"]  # not retried in a loop
    assert sched.film_status(str(film))["state"] == "failed"
    with pytest.raises(ControlError) as exc:
        sched.request(film)
    assert exc.value.code == "failed" and "--retry" in exc.value.message
    sched.request(film, retry=True)
    run_until(sched, lambda: len(s.starts()) == 2 and sched.status()["failures"])
    assert sched.film_status(str(film))["attempts"] == 2
    # A new file at the same path is a new source: tried again without being asked.
    film.write_bytes(b"another film" * 50)
    engine.reconcile("rescan")
    run_until(sched, lambda: len(s.starts()) == 3)


def test_the_source_changing_mid_job_stops_it_and_requeues_the_new_file(s: Setup) -> None:
    film = s.film("Changing slow film")
    engine, sched = s.scheduler()
    run_until(sched, lambda: (c := sched.status()["current"]) and c["done"] >= 2)
    with open(film, "ab") as f:
        f.write(b"more bytes")
    engine.reconcile("rescan")
    run_until(sched, lambda: len(s.starts()) == 2)
    assert sched.film_status(str(film))["last"]["reason"] == "the film changed"
    assert sched.status()["failures"] == []


def test_pause_stops_after_the_frame_and_holds_the_queue_until_resume(s: Setup) -> None:
    film = s.film("Paused slow film")
    _, sched = s.scheduler()
    run_until(sched, lambda: (c := sched.status()["current"]) and c["done"] >= 2)
    assert "stops after its current frame" in sched.pause()["message"]
    run_until(sched, lambda: sched.status()["current"] is None)
    st = sched.status()
    assert (st["state"], st["queue"], st["paused"]) == ("paused", [str(film)], True)
    assert "runs after `cinecutd resume`" in sched.request(film)["message"]
    for _ in range(20):
        sched.tick()
    assert len(s.starts()) == 1
    assert sched.status_line() == "pre-warm paused, 1 queued"
    sched.resume()
    run_until(sched, lambda: sched.status()["current"] is not None and len(s.starts()) == 2)


def test_without_a_gpu_the_job_runs_on_the_cpu_with_a_note(s: Setup) -> None:
    """Real NVML lookup: this machine (and CI) has no NVIDIA GPU."""
    s.film("Cpu slow film")
    _, sched = s.scheduler(s.config(n_gpu_layers=-1))
    cur = run_until(sched, lambda: sched.status()["current"])
    st = sched.status()
    assert cur["device"] == "cpu" and st["state"] == "running"
    assert "no NVIDIA GPU" in st["note"] and "n_gpu_layers = 0" in st["note"]


def test_a_gpu_with_a_cpu_only_llama_build_blocks_with_how_to_fix(s: Setup) -> None:
    """The probe is real: it imports the installed llama_cpp in a child process (a CPU build in CI; with a
    GPU build the same GPU is used instead)."""
    from cinecut.inference.engine import gpu_offload_supported

    s.film("Gpu slow film")
    gpu = GpuInfo((Gpu(0, "Test GPU", 20 << 30, 24 << 30),))
    _, sched = s.scheduler(s.config(n_gpu_layers=-1), gpu_query=lambda: gpu)
    if gpu_offload_supported():
        cur = run_until(sched, lambda: sched.status()["current"], timeout=60)
        assert cur["device"] == "gpu"
        return
    run_until(sched, lambda: sched.status()["state"] == "gpu-build-missing", timeout=60)
    st = sched.status()
    assert st["current"] is None and s.starts() == []
    assert "Test GPU" in st["note"] and "GGML_CUDA" in st["note"] and "n_gpu_layers = 0" in st["note"]
    assert sched.status_line().startswith("pre-warm gpu-build-missing: ")


def test_a_missing_model_blocks_the_queue_instead_of_failing_every_film(s: Setup) -> None:
    films = [s.film("One"), s.film("Two")]
    s.model.unlink()
    _, sched = s.scheduler()
    run_until(sched, lambda: sched.status()["state"] == "setup-error")
    st = sched.status()
    assert str(s.model) in st["note"] and st["failures"] == [] and st["queued"] == 2
    assert s.starts() == [] and {str(f) for f in films} == set(st["queue"])


def test_stop_kills_a_worker_that_ignores_sigterm(s: Setup) -> None:
    film = s.film("Stubborn film")
    _, sched = s.scheduler()
    pid = run_until(sched, lambda: (c := sched.status()["current"]) and c["done"] >= 1 and c["pid"])
    t0 = time.monotonic()
    sched.stop(timeout=0.5)
    assert time.monotonic() - t0 < 4
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(") ")[1][:1]
    assert sched.film_status(str(film))["last"]["outcome"] == "stopped"
    assert sched.status()["current"] is None


def test_status_and_status_line_while_running(s: Setup) -> None:
    film = s.film("Heat slow (1995)")
    _, sched = s.scheduler()
    cur = run_until(sched, lambda: (c := sched.status()["current"]) and c["done"] >= 2 and c)
    assert cur["total"] == 10**6 and cur["fps"] == 40.0 and cur["eta_s"] > 0 and cur["pid"] > 0
    assert sched.status_line().startswith("pre-warm: Heat slow (1995) ")
    assert sched.status_line().endswith("/1,000,000 frames, 40.0 fps")
    fs = sched.film_status(str(film))
    assert fs["state"] == "running" and fs["current"]["film"] == str(film) and fs["attempts"] == 1
    assert "already running" in sched.request(film)["message"]


def test_requests_for_conflicts_and_unknown_films_are_refused(s: Setup) -> None:
    a = s.film("Twin")
    a.with_suffix(".mp4").write_bytes(b"other")
    _, sched = s.scheduler()
    with pytest.raises(ControlError) as exc:
        sched.request(a)
    assert exc.value.code == "conflict"
    with pytest.raises(ControlError) as exc:
        sched.request(s.lib / "nope.mkv")
    assert exc.value.code == "not_found"
    assert sched.status()["queue"] == []


def test_reconfigure_disabling_stops_the_job_and_reports_disabled(s: Setup) -> None:
    s.film("Reload slow film")
    _, sched = s.scheduler()
    run_until(sched, lambda: sched.status()["current"])
    sched.reconfigure(s.config(enabled=False))
    run_until(sched, lambda: sched.status()["current"] is None)
    assert sched.status()["state"] == "disabled" and sched.status_line() == "pre-warm disabled"
    with pytest.raises(ControlError):
        sched.request(s.lib / "Reload slow film" / "Reload slow film.mkv")


def test_window_contains_and_next_start_across_midnight() -> None:
    w = Window.parse("23:00-02:00")
    day = datetime(2024, 5, 1)
    assert w.contains(day.replace(hour=23, minute=30)) and w.contains(day.replace(hour=1, minute=59))
    assert not w.contains(day.replace(hour=2)) and not w.contains(day.replace(hour=12))
    assert w.next_start(day.replace(hour=12)) == day.replace(hour=23)
    assert w.next_start(day.replace(hour=23, minute=1)) == day.replace(hour=23) + timedelta(days=1)
