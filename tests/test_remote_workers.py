"""Pre-warm on other hosts' GPUs through RQ on Redis, end to end with real processes: a redis-server of the
test's own, real ``cinecut worker`` processes (each with its own view of the library through its own path
map, the tiny generated LLaVA pair, its own GPU lock), and a real ``cinecutd`` as the coordinator.

Jobs are caught at a known point the way the local pre-warm tests do it: the test holds a worker's GPU
lock as an interactive run would, and the worker yields to it between frames.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from remote_harness import RedisServer, Worker, worker_argv

from cinecut.demo.film import SyntheticFilm
from cinecut.demo.tinymodel import TinyLlava
from cinecut.inference.cache import CacheState, cache_state
from cinecut.inference.partial import read_partial
from cinecut.locks import GpuLock
from cinecut.remote import protocol
from cinecut.stamp import SourceStamp
from cinecut.workdir import WorkDir
from tests.harness.mutate import temp_then_rename
from tests.harness.runner import Daemon, DaemonRunner, Library, render_config
from tests.harness.waiting import wait_for

JOB_S = 90.0
BIN = Path(sys.executable).parent


class Setup:
    """One library (the coordinator's real path), views of it per worker (symlinked roots), Redis."""

    def __init__(self, runner: DaemonRunner, model: TinyLlava, template: SyntheticFilm, redis: RedisServer) -> None:
        self.runner, self.model, self.template, self.redis = runner, model, template, redis
        self.lib = runner.library("nas/films")
        self.workers: list[Worker] = []
        self.gates: dict[str, GpuLock] = {}

    def view(self, name: str) -> Path:
        """The library as worker ``name`` mounts it: another path to the same folder."""
        v = self.runner.base / f"host-{name}" / "media"
        v.parent.mkdir(parents=True, exist_ok=True)
        if not v.is_symlink():
            v.symlink_to(self.lib, target_is_directory=True)
        return v

    def gpu_lock(self, name: str) -> Path:
        return self.runner.base / f"host-{name}" / "gpu.lock"

    def gate(self, name: str) -> GpuLock:
        if name not in self.gates:
            self.gpu_lock(name).parent.mkdir(parents=True, exist_ok=True)
            self.gates[name] = GpuLock(self.gpu_lock(name), purpose="test: an interactive run", interactive=True)
        return self.gates[name]

    def worker(self, name: str, *, start: bool = True, extra: tuple[str, ...] | list[str] = ()) -> Worker:
        argv = worker_argv(name=name, url=self.redis.url, maps=[f"{self.lib}={self.view(name)}"],
                           model=self.model.model_path, mmproj=self.model.mmproj_path, gpu_lock=self.gpu_lock(name),
                           extra=extra)
        w = Worker(self.runner.base, name, argv)
        self.workers.append(w)
        return w.start() if start else w

    def start(self) -> Daemon:
        text = render_config([Library(self.lib)], socket=self.runner.socket,
                             daemon={"state_dir": str(self.runner.base / "state")})
        text += "\n".join(["", "[prewarm]", "enabled = true", 'window = "always"', "settle_seconds = 0.5", "",
                           "[queue]", f"redis = {json.dumps(self.redis.url)}", ""])
        path = self.runner.base / "cinecutd.toml"
        path.write_text(text)
        return self.runner.daemon(path).start()

    def drop(self, stem: str) -> Path:
        folder = self.lib / stem
        folder.mkdir()
        assert self.template.subtitle is not None
        shutil.copyfile(self.template.subtitle, folder / f"{stem}.srt")
        film = folder / f"{stem}{self.template.video.suffix}"
        shutil.copyfile(self.template.video, film)
        return film

    def done_events(self) -> list[dict[str, Any]]:
        return [e for w in self.workers for e in w.events("job_done")]

    def close(self) -> None:
        for g in self.gates.values():
            g.release()
        for w in self.workers:
            w.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    r = RedisServer(tmp_path).start()
    yield r
    r.stop()


@pytest.fixture
def s(tmp_path: Path, tiny_llava: TinyLlava, synthetic_film_template: SyntheticFilm,
      redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[Setup]:
    # As in test_prewarm_daemon: each frame a worker describes takes 0.1 s more, so a job is caught
    # mid-way (catch_mid_inference) however fast the tiny model runs on an idle machine.
    monkeypatch.setenv("CINECUTD_FAULTS", "slow:prewarm.after_frame")
    with DaemonRunner(tmp_path) as runner:
        setup = Setup(runner, tiny_llava, synthetic_film_template, redis_server)
        try:
            yield setup
        finally:
            setup.close()


def cache_valid(film: Path) -> bool:
    return cache_state(film, WorkDir.for_film(film))[0] is CacheState.VALID


def remote(d: Daemon) -> dict[str, Any]:
    return d.status()["prewarm"]["remote"]


def partial_done(film: Path) -> int:
    p = read_partial(WorkDir.for_film(film).partial_cache_path)
    return 0 if p is None else len(p.results)


def catch_mid_inference(s: Setup, name: str, film: Path) -> int:
    """With worker ``name``'s GPU held by the caller, let it describe frames until the first is saved, then
    take the GPU back (the worker yields after its current frame); returns the frames saved in the partial
    while the worker sits yielded (nothing in flight)."""
    gate = s.gate(name)
    wait_for(lambda: any(e.get("film") == str(film) for e in _w(s, name).events("job_started")), JOB_S,
             what="the job started")
    gate.release()
    wait_for(lambda: partial_done(film) >= 1, JOB_S, what="the first frame saved")
    gate.acquire(timeout=60)
    done = partial_done(film)
    total = len(json.loads(WorkDir.for_film(film).timestamps_path.read_text()))
    assert 1 <= done < total, f"caught at {done} of {total} frames"
    return done


def _w(s: Setup, name: str) -> Worker:
    return next(w for w in s.workers if w.name == name)


# ------------------------------------------------------------------------------------------ tests


def test_forged_jobs_are_refused_and_nothing_outside_the_libraries_is_touched(
        tmp_path: Path, tiny_llava: TinyLlava, synthetic_film_template: SyntheticFilm,
        redis_server: RedisServer) -> None:
    from rq import Queue

    lib = tmp_path / "lib"
    lib.mkdir()
    outside = tmp_path / "private"
    outside.mkdir()
    secret = outside / "Secret (2020).mkv"
    shutil.copyfile(synthetic_film_template.video, secret)
    (lib / "Escape (2021)").mkdir()
    (lib / "Escape (2021)" / "Escape (2021).mkv").symlink_to(secret)  # a symlink out of the library
    (lib / "Out").symlink_to(outside, target_is_directory=True)  # a symlinked folder out of it
    marker = tmp_path / "pwned"
    w = Worker(tmp_path, "w1", worker_argv(name="w1", url=redis_server.url, maps=[f"/movies={lib}"],
                                           model=tiny_llava.model_path, mmproj=tiny_llava.mmproj_path,
                                           gpu_lock=tmp_path / "gpu.lock")).start()
    try:
        conn = redis_server.client()
        q = Queue(protocol.QUEUE_NAME, connection=conn, serializer=protocol.serializer())
        stamp = SourceStamp.of(secret)

        def job(film: str, root: str) -> None:
            q.enqueue_call(protocol.JOB_FUNC, args=(protocol.Payload(film, root, stamp).to_json(),),
                           job_id=protocol.job_id(film, stamp), timeout=-1)

        job(str(secret), str(outside))  # a root the worker does not map
        job(str(outside / "x" / "Secret (2020).mkv"), "/movies")  # not under its root
        job("/movies/../private/Secret (2020).mkv", "/movies")  # climbing out
        job("/movies/Escape (2021)/Escape (2021).mkv", "/movies")  # a symlink out of the library
        job("/movies/Out/Secret (2020).mkv", "/movies")  # a symlinked folder out of the library
        q.enqueue_call(protocol.JOB_FUNC, args=({"v": 1, "film": 5},), job_id="garbage")  # not a payload
        # Not our function at all: RQ would import and call anything a job names.
        q.enqueue_call("subprocess.call", args=(["touch", str(marker)],), job_id="forged-function")
        # Inside the library, but queued for an older version of the film: nothing is read or written.
        inside = lib / "Old (2019)" / "Old (2019).mkv"
        inside.parent.mkdir()
        shutil.copyfile(synthetic_film_template.video, inside)
        old = SourceStamp(SourceStamp.of(inside).mtime - 60, SourceStamp.of(inside).size)
        q.enqueue_call(protocol.JOB_FUNC, args=(protocol.Payload("/movies/Old (2019)/Old (2019).mkv", "/movies",
                                                                 old).to_json(),), job_id="stale", timeout=-1)
        wait_for(lambda: w.events("job_stale"), 30, what="the stale job noticed")
        assert not WorkDir.for_film(inside).path.exists()
        wait_for(lambda: len(w.events("job_refused")) >= 7, 30, what="seven refusals")
        refused = w.events("job_refused")
        assert any("not one this worker maps" in e["reason"] for e in refused)
        assert any("not inside its library root" in e["reason"] for e in refused)
        assert any("outside the mapped library" in e["reason"] for e in refused)
        assert any("not a plain absolute path" in e["reason"] for e in refused)
        assert any("not subprocess.call" in e["reason"] or "'subprocess.call'" in e["reason"] for e in refused)
        assert not marker.exists()
        assert not w.events("job_started")
        assert not WorkDir.for_film(secret).path.exists(), "a work dir was created outside the libraries"
        assert os.listdir(outside) == ["Secret (2020).mkv"]
        assert w.proc is not None and w.proc.poll() is None, "a forged job took the worker down"
        assert conn.get(protocol.worker_key("w1")) is not None  # still heartbeating
    finally:
        w.stop()


def test_two_workers_with_their_own_views_warm_every_film_exactly_once(s: Setup) -> None:
    d = s.start()
    films = [s.drop(f"Film {i} (2024)") for i in range(3)]
    s.worker("alpha")
    s.worker("beta")
    wait_for(lambda: all(map(cache_valid, films)) and d.status()["prewarm"]["completed"] == 3, JOB_S * 2,
             what="every film warmed")
    done = s.done_events()
    by_film = {f: [e for e in done if e["film"] == str(f)] for f in films}
    assert all(len(v) == 1 for v in by_film.values()), by_film  # exactly once
    for (e,) in by_film.values():
        assert e["frames_computed"] == e["frames"] >= 2 and not e["cache_hit"]
    started = [e for w in s.workers for e in w.events("job_started")]
    assert len(started) == 3
    # Each worker reached the film through its own path map (the root it maps is the coordinator's).
    for w in s.workers:
        for e in w.events("job_started"):
            assert e["film"].startswith(str(s.lib) + "/")
    st = d.status()["prewarm"]
    assert st["state"] == "remote" and st["failures"] == []
    workers = wait_for(lambda: (ws := remote(d)["workers"]) and all(w["state"] == "idle" for w in ws) and ws, 10,
                       what="the workers idle in status")
    assert {w["name"] for w in workers} == {"alpha", "beta"}
    assert all(w["host"] and w["last_seen"] > time.time() - 10 for w in workers)
    last = d.film_status(films[0])["prewarm"]["last"]
    assert last["outcome"] == "done" and last["remote"] and last["worker"] in ("alpha", "beta")
    # Nothing left in Redis to run again.
    conn = s.redis.client()
    assert conn.llen(f"rq:queue:{protocol.QUEUE_NAME}") == 0


def test_a_remote_job_counts_in_status_and_metrics_as_a_local_one_does(s: Setup) -> None:
    """Its outcome, the time of the last success and the frames described: the metrics read these from
    status, so a coordinator whose jobs all run remotely must not report zero jobs done forever."""
    d = s.start()
    film = s.drop("Counted (2024)")
    w = s.worker("alpha")
    t0 = time.time()
    wait_for(lambda: cache_valid(film) and d.status()["prewarm"]["completed"] == 1, JOB_S, what="warm")
    (done,) = w.events("job_done")
    st = d.status()["prewarm"]
    assert st["outcomes"] == {"done": 1}, st["outcomes"]
    assert st["last_success"] is not None and st["last_success"] >= t0
    assert st["frames_described"] == done["frames_computed"] >= 2


def test_a_job_whose_cancel_met_a_stalled_redis_is_cancelled_once_redis_answers(
        tmp_path: Path, redis_server: RedisServer) -> None:
    """Pause while Redis stalls (frozen past the coordinator's socket timeout, keys kept): the queued job
    must not outlive the pause unseen; it is taken back once Redis answers again, not left for a worker."""
    import signal
    from datetime import datetime

    from cinecutd.config import parse_config
    from cinecutd.engine import Engine
    from cinecutd.prewarm.scheduler import PrewarmScheduler

    lib = tmp_path / "films"
    (lib / "Stalled (2024)").mkdir(parents=True)
    (lib / "Stalled (2024)" / "Stalled (2024).mkv").write_bytes(b"film" * 1000)
    for name in ("model.gguf", "mmproj.gguf"):
        (tmp_path / name).write_bytes(b"GGUF" + bytes(64))
    config = parse_config({
        "daemon": {"state_dir": str(tmp_path / "state"), "settle_seconds": 0, "rescan_interval": 0},
        "library": [{"path": str(lib)}], "control": {"socket": str(tmp_path / "d.sock")},
        "prewarm": {"enabled": True, "window": "always", "settle_seconds": 0, "model": str(tmp_path / "model.gguf"),
                    "mmproj": str(tmp_path / "mmproj.gguf"), "gpu_lock": str(tmp_path / "gpu.lock")},
        "queue": {"redis": redis_server.url},
    }, tmp_path / "cinecutd.toml")
    engine = Engine(config)
    sched = PrewarmScheduler(config, engine, clock=lambda: datetime(2024, 5, 1, 2, 0))
    engine.on_film_changed = sched.on_film_changed
    engine.on_reconciled = sched.on_reconciled
    engine.reconcile("startup")
    conn = redis_server.client()
    queued = f"rq:queue:{protocol.QUEUE_NAME}"

    def ticking(predicate: Any) -> Any:
        sched.tick()
        return predicate()

    wait_for(lambda: ticking(lambda: conn.llen(queued) == 1), 20, what="the film queued")
    assert redis_server.proc is not None
    os.kill(redis_server.proc.pid, signal.SIGSTOP)
    try:
        sched.pause()  # its cancel times out: Redis is unreachable for now
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
    assert not sched.status()["remote"]["connected"]
    wait_for(lambda: ticking(lambda: sched.status()["remote"]["connected"]), 20, what="reconnected")
    wait_for(lambda: ticking(lambda: conn.llen(queued) == 0), 10, what="the paused film's job taken back")
    assert sched.status()["remote"]["queued"] == 0


def test_a_film_replaced_mid_job_is_stopped_and_queued_again_under_its_new_stamp(s: Setup) -> None:
    gate = s.gate("alpha")
    gate.acquire(timeout=5)  # an interactive run on alpha's host: the job waits for the GPU
    d = s.start()
    film = s.drop("Replaced (2024)")
    w = s.worker("alpha")
    first = wait_for(lambda: w.events("job_started"), JOB_S, what="the first job")[0]
    wait_for(lambda: (r := remote(d)["running"]) and r[0].get("stage") == "yielded", JOB_S,
             what="the coordinator sees the job on alpha, yielded")
    fs = d.film_status(film)["prewarm"]
    assert fs["state"] == "running" and fs["remote"]["worker"] == "alpha" and fs["remote"]["host"]
    human = subprocess.run([str(BIN / "cinecutd"), "status", "--socket", str(d.socket)], capture_output=True,
                           text=True, timeout=30)
    assert human.returncode == 0, human.stderr
    assert "Workers (1)" in human.stdout and "alpha" in human.stdout and film.name in human.stdout, human.stdout
    temp_then_rename(film, s.template.video.read_bytes())  # a new file: a new stamp
    stopped = wait_for(lambda: w.events("job_stopped"), 30, what="the running job stopped")[0]
    assert stopped["job_id"] == first["job_id"]
    assert d.logs("prewarm_stopping") and d.logs("prewarm_stopping")[0]["reason"] == "the film changed"
    gate.release()
    wait_for(lambda: cache_valid(film) and d.status()["prewarm"]["completed"] == 1, JOB_S, what="warm again")
    done = w.events("job_done")
    assert len(done) == 1 and done[0]["job_id"] == protocol.job_id(str(film), SourceStamp.of(film))
    assert done[0]["job_id"] != first["job_id"]
    assert len(w.events("job_started")) == 2


def test_a_worker_killed_mid_job_loses_it_and_another_resumes_with_no_frame_redone(s: Setup) -> None:
    s.gate("alpha").acquire(timeout=5)
    d = s.start()
    film = s.drop("Killed (2024)")
    alpha = s.worker("alpha", extra=["--max-keyframes", "8"])  # frames enough to stop between
    saved = catch_mid_inference(s, "alpha", film)
    alpha.kill()  # a power cut mid-job: no goodbye, the lease just stops being renewed
    beta = s.worker("beta", extra=["--max-keyframes", "8"])
    wait_for(lambda: cache_valid(film) and d.status()["prewarm"]["completed"] == 1, JOB_S, what="beta finished")
    (done,) = beta.events("job_done")
    assert done["frames_computed"] == done["frames"] - saved, (done, saved)  # 0 frames redone
    assert d.logs("prewarm_requeued") and "lease" in d.logs("prewarm_requeued")[0]["reason"]
    assert d.film_status(film)["prewarm"]["last"]["worker"] == "beta"


def test_redis_restarted_mid_run_loses_nothing_and_does_nothing_twice(s: Setup) -> None:
    gate = s.gate("alpha")
    gate.acquire(timeout=5)
    d = s.start()
    films = [s.drop(f"Restart {i} (2024)") for i in range(2)]
    w = s.worker("alpha")
    wait_for(lambda: w.events("job_started"), JOB_S, what="a job on alpha")
    s.redis.stop()  # every key is gone: queue, jobs, leases, heartbeats (no persistence)
    wait_for(lambda: d.logs("queue_unreachable"), 20, what="the coordinator notices")
    s.redis.start()
    wait_for(lambda: len(d.logs("queue_connected")) >= 2, 30, what="the coordinator reconnected")
    gate.release()
    wait_for(lambda: all(map(cache_valid, films)) and d.status()["prewarm"]["completed"] == 2, JOB_S * 2,
             what="both films warm after the restart")
    for f in films:
        done = [e for e in w.events("job_done") if e["film"] == str(f)]
        computed = sum(e["frames_computed"] for e in done)
        assert done and computed == done[0]["frames"], (f, done)  # nothing lost, nothing computed twice
    assert d.status()["prewarm"]["failures"] == []


def test_worker_options_come_from_its_config_file_and_the_command_line_wins(tmp_path: Path) -> None:
    from cinecut.remote.pathmap import PathMap, Refused
    from cinecut.remote.worker import build_parser, resolve

    lib = tmp_path / "mnt" / "films"
    (lib / "A (2020)").mkdir(parents=True)
    (lib / "A (2020)" / "A (2020).mkv").write_bytes(b"x")
    cfg = tmp_path / "worker.toml"
    cfg.write_text(f'[worker]\nqueue = "redis://10.0.0.2:6379/0"\nmodel = "/m/model.gguf"\nmmproj = "/m/mm.gguf"\n'
                   f'gpu_lock = "/run/cinecut/gpu.lock"\nparallel = 4\nwindow = "22:00-07:00"\n'
                   f'[worker.path_map]\n"/srv/media/films" = "{lib}"\n')
    opts = resolve(build_parser().parse_args(["--config", str(cfg), "--parallel", "2"]))
    assert opts["parallel"] == 2 and opts["queue"] == "redis://10.0.0.2:6379/0" and opts["window"] == "22:00-07:00"
    pm = PathMap.parse(opts["path_map"])
    assert pm.local("/srv/media/films/A (2020)/A (2020).mkv", "/srv/media/films") == lib / "A (2020)" / "A (2020).mkv"
    with pytest.raises(Refused):
        pm.local("/srv/media/films/A (2020)/../../../etc/passwd", "/srv/media/films")
    with pytest.raises(Refused):
        pm.local("/srv/media/films/A (2020)_cinecut_work/x.mkv", "/srv/media/films")
    with pytest.raises(ValueError, match="path-map"):
        resolve(build_parser().parse_args(["--queue", "redis://x", "--model", "/m", "--mmproj", "/p",
                                           "--gpu-lock", "/g"]))
