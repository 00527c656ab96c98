"""Remote pre-warm through RQ on Redis: films warmed per hour with 1 and 2 workers, and what the queue costs
each job (enqueue, pick-up, lease, stop) against the job's own time.

    python bench/bench_remote_workers.py [--films 4] [--max-keyframes 4] [--job-minutes 30]

Real processes: a redis-server of its own on a free loopback port, real ``cinecut worker`` processes with
the tiny generated LLaVA pair (no download), jobs enqueued exactly as the coordinator enqueues them
(:class:`cinecutd.prewarm.remote.RemoteDispatch` uses the same payload, id and options). Per job:

* enqueue: the coordinator's ``enqueue_call`` (one Redis round trip, timed here);
* pick-up: from the enqueue to the worker's ``job_started`` (same host clock), the worker idle-waiting;
* finish: from the job function's return to RQ's ``ended_at`` (RQ's bookkeeping on the worker);
* lease: one renewal (``SET px``) timed, times the renewals a job of ``--job-minutes`` makes (every third
  of the 30 s lease), plus the worker heartbeats over the same time;
* stop: from ``send_stop_job_command`` to the worker's ``job_stopped`` (the frame in flight finishes and
  is saved, so a stop loses no work; its latency is reported, not charged).

The headline overhead is (enqueue + pick-up + finish + lease + heartbeat) / job length for a realistic
job of ``--job-minutes``; it must stay under 1 %. Results: bench/results/remote_workers.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import print_table, write_result

from cinecut.demo.film import make_synthetic_film
from cinecut.demo.tinymodel import build_tiny_llava
from cinecut.remote import protocol
from cinecut.stamp import SourceStamp

BIN = Path(sys.executable).parent
TARGET = 0.01


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait(pred: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.02)
    raise SystemExit(f"timed out waiting for {what}")


def events(log: Path, kind: str) -> list[dict[str, Any]]:
    out = []
    for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
        if line.startswith("{"):
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if ev.get("event") == kind:
                out.append(ev)
    return out


class Bench:
    def __init__(self, base: Path, films: int, max_keyframes: int) -> None:
        self.base = base
        self.n = films
        self.max_keyframes = max_keyframes
        self.model = build_tiny_llava(base / "model")
        self.template = make_synthetic_film(base / "template" / "Demo Film (2024).mkv")
        self.port = free_port()
        self.redis = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(base)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.conn = protocol.connect(self.url)
        wait(lambda: _ping(self.conn), 20, "redis-server")
        from rq import Queue

        self.queue = Queue(protocol.QUEUE_NAME, connection=self.conn, serializer=protocol.serializer())
        self.workers: list[tuple[subprocess.Popen[bytes], Path]] = []

    def library(self, name: str) -> tuple[Path, list[Path]]:
        lib = self.base / name
        films = []
        for i in range(self.n):
            folder = lib / f"Film {i} (2024)"
            folder.mkdir(parents=True)
            assert self.template.subtitle is not None
            shutil.copyfile(self.template.subtitle, folder / f"Film {i} (2024).srt")
            film = folder / f"Film {i} (2024).mkv"
            shutil.copyfile(self.template.video, film)
            films.append(film)
        return lib, films

    def start_workers(self, count: int, lib: Path, tag: str, max_keyframes: int | None = None) -> list[Path]:
        logs = []
        for i in range(count):
            log = self.base / f"worker-{tag}-{i}.log"
            argv = [str(BIN / "cinecut"), "worker", "--queue", self.url, "--name", f"{tag}-{i}",
                    "--model", str(self.model.model_path), "--mmproj", str(self.model.mmproj_path),
                    "--gpu-lock", str(self.base / f"gpu-{tag}-{i}.lock"), "--n-gpu-layers", "0",
                    "--path-map", f"{lib}={lib}", "--max-keyframes", str(max_keyframes or self.max_keyframes)]
            with open(log, "wb") as f:
                p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
            self.workers.append((p, log))
            logs.append(log)
        for log in logs:
            wait(lambda log=log: events(log, "worker_started"), 60, "a worker")
        return logs

    def stop_workers(self) -> None:
        for p, _ in self.workers:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p, _ in self.workers:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        self.workers = []

    def enqueue(self, film: Path, lib: Path) -> tuple[str, float, float]:
        payload = protocol.Payload(str(film), str(lib), SourceStamp.of(film))
        t0 = time.time()
        c0 = time.perf_counter()
        self.queue.enqueue_call(protocol.JOB_FUNC, args=(payload.to_json(),), job_id=payload.id, timeout=-1,
                                result_ttl=protocol.RESULT_TTL_S, failure_ttl=protocol.RESULT_TTL_S)
        return payload.id, t0, time.perf_counter() - c0

    def round(self, workers: int) -> dict[str, Any]:
        lib, films = self.library(f"lib-{workers}")
        logs = self.start_workers(workers, lib, f"w{workers}")
        start = time.time()
        enq = {}
        costs = []
        for f in films:
            jid, t0, cost = self.enqueue(f, lib)
            enq[jid] = t0
            costs.append(cost)
        done = wait(lambda: (d := [e for log in logs for e in events(log, "job_done")]) and len(d) >= len(films) and d,
                    3600, "every film warmed")
        elapsed = max(e["at"] for e in done) - start
        started = {e["job_id"]: e["at"] for log in logs for e in events(log, "job_started")}
        from rq.job import Job

        pickups, finishes, own = [], [], []
        for e in done:
            jid = e["job_id"]
            job = Job.fetch(jid, connection=self.conn, serializer=protocol.serializer())
            assert job.return_value()["outcome"] == "done"
            ended = job.ended_at.timestamp() if job.ended_at else e["at"]
            finishes.append(max(0.0, ended - e["at"]))
            own.append(float(e["duration_s"]))
        # Pick-up: only jobs a worker was idle for (the first of each worker); the others waited in line.
        first = sorted(started.items(), key=lambda kv: kv[1])[:workers]
        pickups = [t - enq[jid] for jid, t in first]
        self.stop_workers()
        return {"workers": workers, "films": len(films), "elapsed_s": round(elapsed, 3),
                "films_per_hour": round(len(films) / elapsed * 3600, 1), "job_s_mean": round(statistics.mean(own), 3),
                "frames_per_job": done[0]["frames"], "enqueue_s": costs, "pickup_s": pickups, "finish_s": finishes}

    def lease_cost(self, n: int = 300) -> float:
        key = protocol.lease_key("bench")
        value = json.dumps({"worker": "bench", "host": "h", "done": 10, "total": 2000, "fps": 1.0, "at": 0})
        t = time.perf_counter()
        for _ in range(n):
            self.conn.set(key, value, px=30_000)
        return (time.perf_counter() - t) / n

    def stop_latency(self) -> float:
        from rq.command import send_stop_job_command

        from cinecut.locks import GpuLock

        lib, films = self.library("lib-stop")
        gate = GpuLock(self.base / "gpu-stop-0.lock", purpose="bench: an interactive run", interactive=True)
        gate.acquire(timeout=10)  # the job waits for the GPU between frames, as behind an interactive run
        logs = self.start_workers(1, lib, "stop")
        jid, _, _ = self.enqueue(films[0], lib)
        wait(lambda: (raw := self.conn.get(protocol.lease_key(jid))) and json.loads(raw).get("state") == "yielded",
             600, "the job waiting for the GPU")
        t0 = time.time()
        send_stop_job_command(self.conn, jid, serializer=protocol.serializer())
        ev = wait(lambda: events(logs[0], "job_stopped"), 120, "the stop")[0]
        gate.release()
        self.stop_workers()
        return ev["at"] - t0

    def close(self) -> None:
        self.stop_workers()
        self.redis.send_signal(signal.SIGTERM)
        self.redis.wait(10)


def _ping(conn: Any) -> bool:
    try:
        return bool(conn.ping())
    except Exception:
        return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--films", type=int, default=4)
    ap.add_argument("--max-keyframes", type=int, default=4)
    ap.add_argument("--job-minutes", type=float, default=30.0)
    args = ap.parse_args()
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not installed (packaging/dev-setup.sh installs it)")
    base = Path(tempfile.mkdtemp(prefix="bench-remote-"))
    b = Bench(base, args.films, args.max_keyframes)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the finally below stops workers and Redis
    try:
        rounds = [b.round(1), b.round(2)]
        lease = b.lease_cost()
        stop = b.stop_latency()
    finally:
        b.close()
        shutil.rmtree(base, ignore_errors=True)
    job_s = args.job_minutes * 60
    enqueue = statistics.median([c for r in rounds for c in r["enqueue_s"]])
    pickup = statistics.median([c for r in rounds for c in r["pickup_s"]])
    finish = statistics.median([c for r in rounds for c in r["finish_s"]])
    renewals = job_s / (protocol.DEFAULT_LEASE_S / 3)
    beats = job_s / protocol.DEFAULT_HEARTBEAT_S
    lease_total = lease * renewals
    heartbeat_total = lease * beats
    per_job = enqueue + pickup + finish + lease_total + heartbeat_total
    tiny_job = statistics.mean(r["job_s_mean"] for r in rounds)
    share = per_job / job_s
    print_table("Remote workers: films warmed per hour (tiny model)", ["workers", "films", "elapsed s", "films/h",
                                                                       "job s (mean)"],
                [[r["workers"], r["films"], r["elapsed_s"], r["films_per_hour"], r["job_s_mean"]] for r in rounds])
    print_table(f"Coordination per job, against a {args.job_minutes:g}-minute job", ["cost", "seconds", "share"],
                [["enqueue", enqueue, f"{enqueue / job_s:.5%}"], ["pick-up", pickup, f"{pickup / job_s:.5%}"],
                 ["finish (RQ bookkeeping)", finish, f"{finish / job_s:.5%}"],
                 [f"lease ({renewals:.0f} renewals)", lease_total, f"{lease_total / job_s:.5%}"],
                 [f"heartbeat ({beats:.0f} beats)", heartbeat_total, f"{heartbeat_total / job_s:.5%}"],
                 ["total", per_job, f"{share:.4%}"],
                 ["(stop latency, not charged)", stop, "-"],
                 [f"(same total against the tiny {tiny_job:.1f} s job)", per_job, f"{per_job / tiny_job:.2%}"]])
    verdict = "PASS" if share < TARGET else "FAIL"
    print(f"{verdict}: coordination overhead {share:.4%} of a {args.job_minutes:g}-minute job (target < {TARGET:.0%})")
    write_result("remote_workers", {
        "rounds": rounds, "job_minutes": args.job_minutes,
        "per_job_s": {"enqueue": enqueue, "pickup": pickup, "finish": finish, "lease": lease_total,
                      "heartbeat": heartbeat_total, "total": per_job},
        "lease_renewal_s": lease, "stop_latency_s": stop, "overhead_share": share, "target": TARGET,
        "tiny_job_s": tiny_job, "tiny_job_share": per_job / tiny_job, "verdict": verdict,
    })
    return 0 if share < TARGET else 1


if __name__ == "__main__":
    raise SystemExit(main())
