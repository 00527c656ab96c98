"""Pre-warm end to end: a real ``cinecutd run``, real inotify, the real ``python -m cinecut.worker`` with the
tiny generated LLaVA pair, a synthetic film dropped in by a slow copy, and the real control socket.

To stop a job at a chosen point without sleeping and hoping, the test plays an interactive run: it
holds the GPU through the real :class:`cinecut.locks.GpuLock`, and the worker yields to it between
frames. Opening that gate for a few tens of milliseconds lets the worker describe a frame or two, so the
job is caught mid-inference with a known number of frames saved; then the window closes, the worker is
SIGKILLed, or the daemon stops, and the next run must redo at most one frame.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from cinecut.demo.film import SyntheticFilm
from cinecut.demo.tinymodel import TinyLlava
from cinecut.inference.cache import CacheState, cache_state
from cinecut.inference.partial import read_partial
from cinecut.locks import GpuLock
from cinecut.workdir import WorkDir
from tests.harness.mutate import temp_then_rename
from tests.harness.runner import Daemon, DaemonRunner, Library, render_config
from tests.harness.waiting import stays, wait_for

BIN = Path(sys.executable).parent
JOB_S = 90.0  # generous: a job is ~4 s here, but the machines running the suite are shared


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[DaemonRunner]:
    with DaemonRunner(tmp_path) as r:
        yield r


class Setup:
    """One test's library, config and GPU gate."""

    def __init__(self, runner: DaemonRunner, model: TinyLlava, template: SyntheticFilm) -> None:
        self.runner = runner
        self.model = model
        self.template = template
        self.lib = runner.library("films")
        self.gpu_lock = runner.base / "gpu" / "gpu.lock"
        self.gate = GpuLock(self.gpu_lock, purpose="test: an interactive run", interactive=True)

    def config_text(self, window: str = "always") -> str:
        text = render_config([Library(self.lib)], socket=self.runner.socket,
                             daemon={"state_dir": str(self.runner.base / "state")})
        return text + "\n".join([
            "", "[prewarm]", "enabled = true", f'window = "{window}"',
            f"model = {json.dumps(str(self.model.model_path))}",
            f"mmproj = {json.dumps(str(self.model.mmproj_path))}",
            "n_gpu_layers = 0", "settle_seconds = 1", f"gpu_lock = {json.dumps(str(self.gpu_lock))}", "",
        ])

    def start(self, window: str = "always") -> Daemon:
        path = self.runner.base / "cinecutd.toml"
        path.write_text(self.config_text(window))
        return self.runner.daemon(path).start()

    def drop(self, stem: str = "Demo Film (2024)", *, slow: bool = True) -> Path:
        """The film arrives like a download: the subtitle first, then the video in slow chunks."""
        folder = self.lib / stem
        folder.mkdir()
        assert self.template.subtitle is not None
        shutil.copyfile(self.template.subtitle, folder / f"{stem}.srt")
        data = self.template.video.read_bytes()
        film = folder / f"{stem}{self.template.video.suffix}"
        with open(film, "wb") as f:
            step = len(data) // 8 + 1
            for i in range(0, len(data), step):
                f.write(data[i : i + step])
                f.flush()
                if slow:
                    time.sleep(0.05)
        return film


@pytest.fixture
def s(runner: DaemonRunner, tiny_llava: TinyLlava, synthetic_film_template: SyntheticFilm,
      monkeypatch: pytest.MonkeyPatch) -> Iterator[Setup]:
    # The tiny model describes a frame in milliseconds: each frame of a worker is made 0.1 s longer, so
    # that a job can be caught mid-way however quickly the worker takes the GPU in a gap the test opens.
    monkeypatch.setenv("CINECUTD_FAULTS", "slow:prewarm.after_frame")
    setup = Setup(runner, tiny_llava, synthetic_film_template)
    yield setup
    setup.gate.release()


def pw(d: Daemon) -> dict[str, Any]:
    return d.status()["prewarm"]


def film_pw(d: Daemon, film: Path) -> dict[str, Any]:
    return d.film_status(film)["prewarm"]


def current(d: Daemon) -> dict[str, Any] | None:
    return pw(d)["current"]


def catch_mid_inference(d: Daemon, s: Setup, film: Path) -> int:
    """With the gate held, let the worker describe a frame or two, then take the GPU back; returns the
    frames done (all saved in the partial) while the worker sits yielded.

    The daemon's own ``prewarm_yielded`` log record is the witness: it is written when the daemon has read
    the worker's last progress and its yield, so it is never a reading from an earlier round.
    """
    wait_for(lambda: (c := current(d)) and c["film"] == str(film) and c["stage"] == "inference", JOB_S,
             what="the worker waiting for the GPU")
    pause = 0.05
    for _ in range(12):
        seen = len(d.logs("prewarm_yielded"))
        s.gate.release()
        time.sleep(pause)
        s.gate.acquire(timeout=30)
        try:
            rec = wait_for(lambda seen=seen: d.status() and (ys := d.logs("prewarm_yielded"))[seen:] and ys[-1],
                           3.0, what="the worker yielded")
        except AssertionError:
            pause *= 1.6  # it had not even taken the GPU yet (model loading): give it longer
            continue
        done, total = int(rec["done"]), current(d)["total"]
        if done >= 1:
            assert done < total, f"the job ran to its end while the gate was open: {rec}"
            return done
        pause *= 1.6
    raise AssertionError(f"could not catch the worker mid-inference: {current(d)}")


def redone(d: Daemon, film: Path, done_before: int) -> int:
    """Frames the finished run computed again although they were saved before the interruption."""
    last = film_pw(d, film)["last"]
    assert last["outcome"] == "done", last
    return last["frames_computed"] - (last["frames"] - done_before)


def cache_valid(film: Path) -> bool:
    return cache_state(film, WorkDir.for_film(film))[0] is CacheState.VALID


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------------------ tests


def test_a_dropped_film_is_prewarmed_analyze_hits_and_a_replacement_is_prewarmed_again(s: Setup) -> None:
    d = s.start()
    film = s.drop()
    wait_for(lambda: pw(d)["completed"] == 1, JOB_S, what="the first pre-warm")
    wd = WorkDir.for_film(film)
    assert cache_valid(film)
    ck = json.loads(wd.checkpoint_path.read_text())
    assert {"proxy", "subtitles", "keyframes"} <= set(ck["stages_complete"])
    assert ck["inference_complete"] is True
    assert json.loads(wd.timestamps_path.read_text()) and any(wd.keyframes_dir.glob("frame_*.jpg"))
    assert not os.path.lexists(wd.partial_cache_path)
    st = d.status()
    assert st["films"]["warm"] == 1 and st["prewarm"]["state"] == "idle" and st["prewarm"]["failures"] == []
    assert d.film_status(film)["cache"]["state"] == "valid"
    done = d.logs("prewarm_done")
    assert len(done) == 1 and done[0]["film"] == str(film) and done[0]["frames"] >= 2
    assert done[0]["fps"] > 0 and done[0]["duration_s"] > 0
    assert d.logs("prewarm_started")[0]["device"] == "cpu"

    # The user's interactive run finds the cache: the model is never loaded (a bogus path proves it).
    r = cli("cinecut", "analyze", str(film), "--model", str(s.runner.base / "no-model.gguf"),
            "--mmproj", str(s.runner.base / "no-mmproj.gguf"), "--gpu-lock", str(s.gpu_lock))
    assert r.returncode == 0, r.stderr
    assert f"Cache hit: loaded {done[0]['frames']} SceneDescriptions" in r.stdout + r.stderr

    # Replaced (same bytes, new file): invalidated at once, then pre-warmed again under the new stamp.
    temp_then_rename(film, s.template.video.read_bytes())
    wait_for(lambda: any(i["film"] == str(film) for i in d.status()["recent_invalidations"]), 20,
             what="the replacement invalidated")
    wait_for(lambda: pw(d)["completed"] == 2, JOB_S, what="the second pre-warm")
    assert cache_valid(film) and d.film_status(film)["cache"]["state"] == "valid"
    assert film_pw(d, film)["attempts"] == 2


def test_window_end_mid_job_leaves_a_partial_that_the_next_window_resumes(s: Setup) -> None:
    s.gate.acquire(timeout=5)
    d = s.start()
    film = s.drop(slow=False)
    before = catch_mid_inference(d, s, film)
    later = datetime.now() + timedelta(hours=3)
    window = f"{later:%H}:00-{(later + timedelta(hours=1)):%H}:00"
    d.reload(s.config_text(window))  # SIGHUP: the window is now hours away
    wait_for(lambda: pw(d)["state"] == "waiting-window", 20, what="the job stopped by the window's end")
    p = pw(d)
    assert p["current"] is None and p["queue"] == [str(film)] and p["failures"] == []
    assert p["next_window"] == f"{later:%Y-%m-%dT%H}:00:00"
    last = film_pw(d, film)["last"]
    assert (last["outcome"], last["reason"]) == ("stopped", "the window closed")
    partial = read_partial(WorkDir.for_film(film).partial_cache_path)
    assert partial is not None and not cache_valid(film)
    assert partial.done == before, (partial.done, before, d.log_text()[-3000:])
    assert any(r["event"] == "prewarm_stopped" for r in d.logs())
    s.gate.release()
    assert stays(lambda: current(d) is None, 1.5)  # nothing starts outside the window

    d.reload(s.config_text("always"))  # the next window
    wait_for(lambda: pw(d)["completed"] == 1, JOB_S, what="the resumed pre-warm")
    assert cache_valid(film)
    assert redone(d, film, before) in (0, 1)


def test_a_sigkilled_worker_is_a_failure_and_retry_resumes_from_its_partial(s: Setup) -> None:
    s.gate.acquire(timeout=5)
    d = s.start()
    film = s.drop(slow=False)
    before = catch_mid_inference(d, s, film)
    os.kill(current(d)["pid"], signal.SIGKILL)
    failures = wait_for(lambda: pw(d)["failures"], 20, what="the failure recorded")
    assert failures[0]["film"] == str(film) and "SIGKILL" in failures[0]["reason"]
    assert film_pw(d, film)["state"] == "failed"
    s.gate.release()
    assert stays(lambda: current(d) is None, 1.5)  # not retried in a loop
    assert film_pw(d, film)["attempts"] == 1

    r = cli("cinecutd", "prewarm", str(film), "--socket", str(d.socket))
    assert r.returncode != 0 and "--retry" in r.stderr
    r = cli("cinecutd", "prewarm", "--retry", str(film), "--socket", str(d.socket))
    assert r.returncode == 0, r.stderr
    wait_for(lambda: pw(d)["completed"] == 1, JOB_S, what="the retried pre-warm")
    assert cache_valid(film) and pw(d)["failures"] == []
    assert redone(d, film, before) in (0, 1)


def test_a_crashed_worker_never_stops_the_daemon_watching_and_a_new_file_is_retried(s: Setup) -> None:
    s.gate.acquire(timeout=5)
    d = s.start()
    film = s.drop(slow=False)
    pid = wait_for(lambda: (c := current(d)) and c["stage"] == "inference" and c["pid"], JOB_S)
    os.kill(pid, signal.SIGSEGV)
    failures = wait_for(lambda: pw(d)["failures"], 20, what="the crash recorded")
    assert "SIGSEGV" in failures[0]["reason"]
    assert d.logs("prewarm_failed")[0]["reason"] == failures[0]["reason"]
    assert stays(lambda: current(d) is None and film_pw(d, film)["attempts"] == 1, 1.5)

    # Still watching and invalidating: the film is replaced, the daemon resets its work dir and, since
    # this is a new source, tries it again without being asked.
    temp_then_rename(film, s.template.video.read_bytes())
    wait_for(lambda: any(i["film"] == str(film) for i in d.status()["recent_invalidations"]), 20,
             what="the replacement invalidated")
    s.gate.release()
    wait_for(lambda: pw(d)["completed"] == 1, JOB_S, what="the pre-warm of the new file")
    assert film_pw(d, film)["attempts"] == 2 and pw(d)["failures"] == [] and cache_valid(film)


def test_pause_resume_and_status_json_show_the_queue_newest_first(s: Setup) -> None:
    s.gate.acquire(timeout=5)
    d = s.start()
    assert d.request("pause")["paused"] is True
    older, newer = s.drop("Alpha (2001)", slow=False), s.drop("Beta (2002)", slow=False)
    t = time.time()
    os.utime(older, (t - 7200, t - 7200))
    os.utime(newer, (t - 60, t - 60))
    wait_for(lambda: pw(d)["queue"] == [str(newer), str(older)], 20, what="both films queued, newest first")

    def status_json() -> dict[str, Any]:
        r = cli("cinecutd", "status", "--json", "--socket", str(d.socket))
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)["prewarm"]

    p = status_json()
    assert (p["state"], p["current"], p["queue"]) == ("paused", None, [str(newer), str(older)])
    human = cli("cinecutd", "status", "--socket", str(d.socket))
    assert human.returncode == 0, human.stderr
    assert "Pre-warm: paused" in human.stdout and "queue (2): " in human.stdout
    d.request("resume")
    wait_for(lambda: (c := current(d)) and c["stage"] == "inference", JOB_S, what="the newest film running")
    p = status_json()
    assert p["current"]["film"] == str(newer) and p["queue"] == [str(older)]
    assert p["current"]["pid"] > 0 and {"done", "total", "fps", "eta_s"} <= set(p["current"])

    d.request("pause")  # the worker is waiting for the GPU: it stops at once, nothing is lost
    wait_for(lambda: pw(d)["state"] == "paused" and current(d) is None, 20, what="the job stopped by pause")
    assert pw(d)["queue"] == [str(newer), str(older)] and pw(d)["failures"] == []
    d.request("resume")
    s.gate.release()
    wait_for(lambda: pw(d)["completed"] == 2, JOB_S, what="both films pre-warmed")
    assert [r["film"] for r in d.logs("prewarm_done")] == [str(newer), str(older)]


def test_sigterm_to_the_daemon_mid_job_stops_the_worker_and_a_restart_resumes(s: Setup) -> None:
    s.gate.acquire(timeout=5)
    d = s.start()
    film = s.drop(slow=False)
    before = catch_mid_inference(d, s, film)
    pid = current(d)["pid"]
    rc, took = d.stop()
    assert rc == 0 and took < 5
    assert not os.path.exists(f"/proc/{pid}"), "the worker outlived the daemon"
    partial = read_partial(WorkDir.for_film(film).partial_cache_path)
    assert partial is not None and partial.done == before
    s.gate.release()
    d2 = s.runner.daemon(d.config).start()
    wait_for(lambda: pw(d2)["completed"] == 1, JOB_S, what="the pre-warm resumed after the restart")
    assert cache_valid(film)
    assert redone(d2, film, before) in (0, 1)
