"""Sharing the GPU with a media server: the policy fed scripted GPU readings, the pipeline's real yield path
with the tiny model, the worker's event line, and the scheduler's ``yielding to <process>`` status.

CI has no GPU: the policy reads the GPU only through its probe interface, and the probe here is a script
of snapshots (what NVML would report). The real NVML probe is small and runs on a machine with a GPU.
"""

from __future__ import annotations

import io
import json
import sys
import textwrap
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from test_pipeline import CountingFactory, analyzed_film, clone_film_dir, partial_count

from cinecut.gpu_share import (
    Busy,
    GpuProcess,
    GpuShare,
    GpuSnapshot,
    ShareConfig,
    UnavailableProbe,
    make_probe,
)
from cinecut.inference import session
from cinecut.locks import FileLock
from cinecut.pipeline import analyze
from cinecut.progress import EventKind, ProgressEvent
from cinecut.worker import EventStream, _Reporter, build_parser, gpu_share_from_args
from cinecutd.config import Config, parse_config
from cinecutd.engine import Engine
from cinecutd.prewarm.scheduler import PrewarmScheduler, build_worker_argv
from cinecutd.prewarm.supervisor import Timeouts

OURS = 1000
FREE = GpuSnapshot(processes=(GpuProcess(OURS, "python3", 5000),), free_mb=3000)
PLEX = GpuProcess(4242, "Plex Transcoder", 300)
OLLAMA = GpuProcess(77, "ollama", 4000)
XORG = GpuProcess(900, "Xorg", 200)
TRANSCODE = GpuSnapshot(processes=(*FREE.processes, PLEX), encoder_percent=40, decoder_percent=30,
                        encoder_pids=(4242,), free_mb=2700)


class ScriptedProbe:
    """A probe that reports a script of snapshots, one per look, repeating the last one."""

    def __init__(self, *snapshots: GpuSnapshot) -> None:
        self.script = list(snapshots)
        self.looks = 0
        self.closed = False

    def play(self, *snapshots: GpuSnapshot) -> None:
        self.script = list(snapshots)

    def snapshot(self) -> GpuSnapshot:
        self.looks += 1
        return self.script.pop(0) if len(self.script) > 1 else self.script[0]

    def close(self) -> None:
        self.closed = True


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def policy(*snapshots: GpuSnapshot, **config: Any) -> tuple[GpuShare, ScriptedProbe, Clock]:
    probe, clock = ScriptedProbe(*snapshots), Clock()
    cfg = ShareConfig(**{"ignore": frozenset({"Xorg"}), "quiet_seconds": 60.0, "check_every_s": 1.0, **config})
    return GpuShare(probe, cfg, own_pids=frozenset({OURS}), clock=clock), probe, clock


# ------------------------------------------------------------------------------------------------ policy


def test_whom_the_policy_yields_to() -> None:
    share, _, _ = policy(FREE)
    assert share.judge(FREE) is None  # our own process is not "another user"
    desktop = GpuSnapshot(processes=(*FREE.processes, XORG), free_mb=2800)
    assert share.judge(desktop) is None  # the display server is ignored
    assert share.judge(TRANSCODE) == Busy("transcodes", "a transcode by Plex Transcoder (pid 4242)")
    assert share.judge(GpuSnapshot(processes=(*FREE.processes, OLLAMA), free_mb=2000)) == \
        Busy("processes", "ollama (pid 77)")
    # NVDEC alone (a decode for a thumbnail, a tone-mapping pass) is a transcode too
    decode = GpuSnapshot(processes=FREE.processes, decoder_percent=12, free_mb=3000)
    assert share.judge(decode) == Busy("transcodes", "a video transcode")
    # nothing readable: never a reason to pause
    assert share.judge(GpuSnapshot(error="NVML unavailable")) is None


def test_yield_to_selects_the_reasons() -> None:
    only_transcodes, _, _ = policy(FREE, yield_to=frozenset({"transcodes"}))
    assert only_transcodes.judge(GpuSnapshot(processes=(*FREE.processes, OLLAMA), free_mb=100)) is None
    assert only_transcodes.judge(TRANSCODE) is not None
    never, _, _ = policy(FREE, yield_to=frozenset())
    assert not never.enabled and never.judge(TRANSCODE) is None
    threshold, _, _ = policy(FREE, encoder_busy_percent=50)
    assert threshold.judge(TRANSCODE) == Busy("processes", "Plex Transcoder (pid 4242)")


def test_vram_counts_our_model_as_loaded_so_unloading_it_never_flaps() -> None:
    share, _, _ = policy(FREE, yield_to=frozenset({"vram"}), yield_vram_mb=1024)
    loaded_alone = GpuSnapshot(processes=(GpuProcess(OURS, "python3", 7000),), free_mb=500)
    assert share.judge(loaded_alone) is None  # our own model never makes us yield
    crowded = GpuSnapshot(processes=(GpuProcess(OURS, "python3", 7000), OLLAMA), free_mb=500)
    busy = share.judge(crowded)
    assert busy is not None and busy.reason == "vram" and busy.who.startswith("ollama (pid 77)")
    # our model unloaded: 7 GB free now, but only 500 MiB once we load it again: still busy
    unloaded = GpuSnapshot(processes=(OLLAMA,), free_mb=7500)
    assert share.judge(unloaded) is not None
    # Ollama unloads its model: free for real
    assert share.judge(GpuSnapshot(processes=(), free_mb=11500)) is None


def test_resume_waits_for_the_quiet_period_and_a_blip_restarts_it() -> None:
    share, probe, clock = policy(FREE, TRANSCODE, FREE)
    assert share.quiet()  # nobody was ever seen
    clock.now += 1
    assert share.busy() is not None and not share.quiet()
    clock.now += 1
    assert share.busy() is None  # the transcode ended ...
    assert not share.quiet()  # ... but not long enough ago
    clock.now += 58  # 59 s after the transcode was last seen
    assert not share.quiet()
    probe.play(TRANSCODE, FREE)  # back for a moment
    clock.now += 2
    assert not share.quiet()
    clock.now += 30
    assert not share.quiet()  # the count restarted at the blip
    clock.now += 31
    assert share.quiet()
    assert share.last == Busy("transcodes", "a transcode by Plex Transcoder (pid 4242)")


def test_the_gpu_is_read_at_most_once_per_check_interval() -> None:
    share, probe, clock = policy(TRANSCODE, FREE)
    for _ in range(50):
        share.busy()
    assert probe.looks == 1  # between fast frames: one NVML read per second, the answer kept
    clock.now += 1.0
    assert share.busy() is None and probe.looks == 2


def test_without_nvml_the_probe_says_why_and_nothing_is_yielded_to() -> None:
    share = GpuShare(UnavailableProbe("nvidia-ml-py is not installed"))
    assert share.busy() is None and share.quiet()
    probe = make_probe()  # on this machine: NVML with a GPU, or a reason why not; never an exception
    try:
        snap = probe.snapshot()
        assert isinstance(snap, GpuSnapshot)
    finally:
        probe.close()


# ------------------------------------------------------------------------- the pipeline's yield path, for real


@pytest.fixture
def ready(tmp_path_factory, synthetic_film_template, tiny_llava, tmp_path: Path) -> Path:
    """A film with stages 1-3 done and no cache: the next run is pure inference with the tiny model."""
    analyzed = analyzed_film(tmp_path_factory, synthetic_film_template, tiny_llava)[0]
    return clone_film_dir(analyzed, tmp_path / "lib" / "Demo Film (2024)", keep_cache=False)


@pytest.mark.parametrize("unload_after_s", [0.0, 3600.0], ids=["long-pause-unloads", "short-pause-keeps-model"])
def test_a_transcode_pauses_the_prewarm_after_the_current_frame_and_it_resumes_when_quiet(
    ready: Path, tiny_llava, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unload_after_s: float
) -> None:
    # The build at hand is CPU-only; the model's memory is on the GPU in production, so the unload applies.
    monkeypatch.setattr(session, "offloads_to_gpu", lambda: True)
    lock_path = tmp_path / "gpu.lock"
    probe = ScriptedProbe(FREE)
    share = GpuShare(probe, ShareConfig(quiet_seconds=0.3, unload_after_s=unload_after_s, check_every_s=0.0),
                     own_pids=frozenset({OURS}))
    k = 3
    events: list[ProgressEvent] = []
    seen: dict[str, Any] = {}

    def on_event(ev: ProgressEvent) -> None:
        events.append(ev)
        if ev.kind is EventKind.FRAME and ev.done == k:
            probe.play(TRANSCODE, TRANSCODE, TRANSCODE, FREE)  # a transcode starts, runs a while, ends
        elif ev.kind is EventKind.YIELDED:
            seen["frames_at_yield"] = partial_count(ready)
            other = FileLock(lock_path, purpose="probe")  # the GPU lock is free for others meanwhile
            seen["lock_free"] = other.try_acquire()
            if seen["lock_free"]:
                other.release()
            seen["yielded_at"] = time.monotonic()
        elif ev.kind is EventKind.RESUMED:
            seen["resumed_at"] = time.monotonic()

    factory = CountingFactory()
    result = analyze(ready, model=tiny_llava.model_path, mmproj=tiny_llava.mmproj_path, n_gpu_layers=-1,
                     gpu_lock_path=lock_path, interactive=False, progress=on_event, engine_factory=factory,
                     gpu_share=share)
    kinds = [e.kind for e in events]
    assert kinds.count(EventKind.YIELDED) == 1 and kinds.count(EventKind.RESUMED) == 1
    yielded = next(e for e in events if e.kind is EventKind.YIELDED)
    assert yielded.reason == "transcodes" and yielded.message == "a transcode by Plex Transcoder (pid 4242)"
    assert yielded.done == k and seen["frames_at_yield"] == k  # paused after the current frame, saved
    assert seen["lock_free"]
    assert seen["resumed_at"] - seen["yielded_at"] >= 0.3  # the quiet period
    assert result.frames_computed == result.records  # nothing redone around the pause
    assert factory.built == (2 if unload_after_s == 0 else 1)


def test_a_gpu_in_use_before_the_first_frame_is_waited_out(
    ready: Path, tiny_llava, tmp_path: Path
) -> None:
    probe = ScriptedProbe(GpuSnapshot(processes=(OLLAMA,), free_mb=8000), FREE)
    share = GpuShare(probe, ShareConfig(quiet_seconds=0.2, check_every_s=0.0), own_pids=frozenset({OURS}))
    events: list[ProgressEvent] = []
    frames_while_waiting: list[int] = []

    def on_event(ev: ProgressEvent) -> None:
        events.append(ev)
        if ev.kind is EventKind.WAITING_GPU:
            frames_while_waiting.append(partial_count(ready))

    factory = CountingFactory()
    result = analyze(ready, model=tiny_llava.model_path, mmproj=tiny_llava.mmproj_path, n_gpu_layers=-1,
                     gpu_lock_path=tmp_path / "gpu.lock", interactive=False, progress=on_event,
                     engine_factory=factory, gpu_share=share)
    waiting = [e for e in events if e.kind is EventKind.WAITING_GPU]
    assert len(waiting) == 1 and waiting[0].reason == "processes" and waiting[0].message == "ollama (pid 77)"
    first_frame = next(i for i, e in enumerate(events) if e.kind is EventKind.FRAME)
    assert events.index(waiting[0]) < first_frame
    assert frames_while_waiting == [0]
    assert factory.built == 1 and result.frames_computed == result.records


# ---------------------------------------------------------------------------- worker line, config, scheduler


def test_the_worker_reports_whom_it_yields_to() -> None:
    buf = io.StringIO()
    reporter = _Reporter(EventStream(buf))
    reporter(ProgressEvent(EventKind.YIELDED, message="a transcode by Plex Transcoder (pid 4242)",
                           reason="transcodes"))
    reporter(ProgressEvent(EventKind.YIELDED))
    reporter(ProgressEvent(EventKind.WAITING_GPU, message="cinecut analyze Heat.mkv (pid 12)"))
    lines = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert lines == [
        {"event": "yielded", "reason": "transcodes", "to": "a transcode by Plex Transcoder (pid 4242)"},
        {"event": "yielded", "reason": "interactive", "to": None},
        {"event": "yielded", "reason": "gpu_lock", "to": "cinecut analyze Heat.mkv (pid 12)"},
    ]


def _config(tmp_path: Path, **prewarm: Any) -> Config:
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF" + bytes(64))
    lib = tmp_path / "films"
    lib.mkdir(exist_ok=True)
    p = {"enabled": True, "window": "always", "model": str(model), "mmproj": str(model), "settle_seconds": 0,
         "gpu_lock": str(tmp_path / "gpu.lock"), **prewarm}
    return parse_config({"daemon": {"state_dir": str(tmp_path / "state"), "settle_seconds": 0,
                                    "rescan_interval": 0},
                         "library": [{"path": str(lib)}], "control": {"socket": str(tmp_path / "d.sock")},
                         "prewarm": p}, tmp_path / "cinecutd.toml")


def test_the_configured_policy_reaches_the_worker(tmp_path: Path) -> None:
    cfg = _config(tmp_path, yield_to=["transcodes", "vram"], yield_ignore=["Xorg", "gamescope"],
                  yield_vram_mb=2048, encoder_busy_percent=20, quiet_seconds=90, unload_after_s=30)
    argv = build_worker_argv(sys.executable, tmp_path / "films" / "F.mkv", cfg.prewarm)
    args = build_parser().parse_args(argv[3:])
    share = gpu_share_from_args(args)
    assert share is not None
    try:
        assert share.config == ShareConfig(frozenset({"transcodes", "vram"}), frozenset({"Xorg", "gamescope"}),
                                           2048, 20, 90.0, 30.0)
    finally:
        share.close()
    never = build_parser().parse_args(build_worker_argv(sys.executable, tmp_path / "F.mkv",
                                                        _config(tmp_path, yield_to=[]).prewarm)[3:])
    assert gpu_share_from_args(never) is None
    cpu = build_parser().parse_args(build_worker_argv(sys.executable, tmp_path / "F.mkv",
                                                      _config(tmp_path, n_gpu_layers=0).prewarm)[3:])
    assert gpu_share_from_args(cpu) is None  # a CPU-only job takes nothing from the GPU's other users


STAND_IN = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    from cinecut.inference.cache import save_cache
    from cinecut.workdir import WorkDir

    film, go = Path(sys.argv[1]), Path(sys.argv[2])

    def emit(**ev):
        print(json.dumps(ev), flush=True)

    emit(event="started", film=str(film), pid=os.getpid())
    emit(event="stage", stage="inference")
    emit(event="progress", done=1, total=3, fps=2.0, computed=1)
    emit(event="yielded", reason="transcodes", to="a transcode by Plex Transcoder (pid 4242)")
    while not go.exists():
        time.sleep(0.01)
    emit(event="resumed")
    emit(event="progress", done=3, total=3, fps=2.0, computed=3)
    path = save_cache([], film, WorkDir.for_film(film))
    emit(event="done", cache=str(path), records=3, frames_computed=3)
    """
)


def _run_until(sched: PrewarmScheduler, predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        sched.tick()
        got = predicate()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out; status: {sched.status()}"
        time.sleep(0.01)


def test_status_says_whom_the_job_yields_to_and_the_yield_is_counted(tmp_path: Path) -> None:
    cfg = _config(tmp_path, n_gpu_layers=0)
    film = tmp_path / "films" / "Heat (1995)" / "Heat (1995).mkv"
    film.parent.mkdir()
    film.write_bytes(b"film" * 1000)
    script, go = tmp_path / "stand_in.py", tmp_path / "go"
    script.write_text(STAND_IN)
    engine = Engine(cfg)
    sched = PrewarmScheduler(cfg, engine, clock=lambda: datetime(2024, 5, 1, 2, 0),
                             timeouts=Timeouts(frame_s=5.0, stage_s=5.0, stop_grace_s=0.5),
                             worker_argv=lambda state, pw: [sys.executable, str(script), str(state.film), str(go)])
    engine.on_film_changed = sched.on_film_changed
    engine.reconcile("startup")
    try:
        st = _run_until(sched, lambda: (s := sched.status())["state"] == "yielded" and s)
        assert st["note"] == "yielding to a transcode by Plex Transcoder (pid 4242)"
        assert st["current"]["yielded_to"] == "a transcode by Plex Transcoder (pid 4242)"
        assert sched.status_line() == "pre-warm: Heat (1995) yielding to a transcode by Plex Transcoder (pid 4242)"
        assert st["gpu_yields"] == {"transcodes": 1}
        go.touch()
        st = _run_until(sched, lambda: (s := sched.status())["current"] is None and s["completed"] == 1 and s)
        assert st["frames_described"] == 3
        assert st["outcomes"] == {"done": 1}
        assert st["last_success"] is not None and abs(st["last_success"] - time.time()) < 60
        assert st["gpu_yields"] == {"transcodes": 1}
    finally:
        sched.stop(timeout=2.0)
