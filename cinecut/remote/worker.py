"""``cinecut worker --queue redis://...``: take pre-warm jobs from the coordinator's queue on this GPU.

Each host runs one worker (``cinecut-worker.service``) with its own window, ``parallel``, model paths,
GPU lock (interactive ``cinecut analyze`` runs on this host still take the GPU first) and path map. Jobs
run in this process (RQ's SimpleWorker): a stop request for the running job (the film changed on the
coordinator's side: ``send_stop_job_command``) sets the flag the analysis polls between frames, and a
SIGKILL or a power cut takes the job down with the worker; the coordinator sees the lease lapse and
queues the job again, and the next worker resumes from the partial results in the work dir.

Outside its window the worker takes no job, and a running job stops after its current frame when the
window closes (its progress is kept). SIGTERM/SIGINT: stop the running job after its frame, then exit.
Redis going away is survived: the worker retries the connection with a backoff.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
import tomllib
from collections.abc import Sequence
from datetime import datetime
from ipaddress import ip_address
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlparse

from cinecut.remote import job as jobmod
from cinecut.remote import protocol
from cinecut.remote.pathmap import PathMap

log = logging.getLogger("cinecut.remote")
DEFAULT_POLL_S: Final = 2.0
MAX_BACKOFF_S: Final = 30.0
_CALLBACK_ATTRS: Final = ("_success_callback_name", "_failure_callback_name", "_stopped_callback_name")


def foreign(job: Any) -> str | None:
    """Why a job from Redis is not one of ours (then it is never run), or None."""
    try:
        name = job.func_name
    except Exception as exc:  # not JSON, or not a job at all
        return f"unreadable job data ({type(exc).__name__})"
    if name != protocol.JOB_FUNC:
        return f"runs {name!r}, not {protocol.JOB_FUNC}"
    for attr in _CALLBACK_ATTRS:
        if getattr(job, attr, None):
            return "carries a callback"
    if getattr(job, "_dependency_ids", None):
        return "carries dependencies"
    return None


def _worker_class(poll: float, window: Any) -> type:
    from rq import SimpleWorker
    from rq.exceptions import StopRequested

    class CinecutWorker(SimpleWorker):  # type: ignore[misc,valid-type]
        """RQ's in-process worker; a stop request becomes our between-frames flag, foreign jobs are refused,
        and no job is taken outside the window."""

        @property
        def dequeue_timeout(self) -> int:
            return max(1, int(poll))

        def subscribe(self) -> None:
            # RQ's pubsub thread sleeps up to 60 s between reads, which a shutdown then waits for.
            self.pubsub = self.connection.pubsub()
            self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
            self.pubsub_thread = self.pubsub.run_in_thread(sleep_time=0.2, daemon=True)

        def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None) -> Any:
            while window is not None and not window.contains(datetime.now()):
                jobmod.CURRENT.state = "outside-window"
                if _STOPPING.wait(min(poll, 30.0)):
                    raise StopRequested()
                self.heartbeat()
            if _STOPPING.is_set():
                raise StopRequested()
            return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)

        def kill_horse(self, sig: Any = None) -> None:
            jobmod.CURRENT.stop.set()

        def execute_job(self, job: Any, queue: Any) -> Any:
            why = foreign(job)
            if why is not None:
                jobmod._report("job_refused", job_id=job.id, reason=why)
                try:
                    job.delete()
                except Exception as exc:
                    log.warning("could not remove refused job %s: %s", job.id, exc)
                return None
            return super().execute_job(job, queue)

        def request_stop(self, signum: Any, frame: Any) -> None:
            _STOPPING.set()
            jobmod.CURRENT.stop.set()
            super().request_stop(signum, frame)

    return CinecutWorker


_STOPPING = threading.Event()


class Heartbeat(threading.Thread):
    """``cinecut:worker:<name>``: host, state, current film, frames/s, last seen; expires if we die."""

    def __init__(self, conn: Any, settings: jobmod.WorkerSettings, interval: float, window: Any) -> None:
        super().__init__(name="cinecut-heartbeat", daemon=True)
        self.conn, self.settings, self.interval, self.window = conn, settings, interval, window
        self.halt = threading.Event()

    def beat(self) -> None:
        cur = jobmod.CURRENT
        in_window = self.window is None or self.window.contains(datetime.now())
        if not in_window and cur.job_id is not None:
            cur.stop.set()  # the window closed: stop after this frame, progress kept
        state = cur.state if cur.job_id is not None else ("idle" if in_window else "outside-window")
        value = protocol.dumps({"name": self.settings.name, "host": self.settings.host, "pid": os.getpid(),
                                "last_seen": time.time(), "parallel": self.settings.parallel,
                                **cur.snapshot(), "state": state})
        with self.conn.pipeline() as p:
            p.set(protocol.worker_key(self.settings.name), value, px=int(self.interval * 3000))
            p.sadd(protocol.WORKERS_SET, self.settings.name)
            p.execute()

    def run(self) -> None:
        while not self.halt.wait(self.interval):
            try:
                self.beat()
            except Exception as exc:
                log.debug("heartbeat failed: %s", exc)

    def end(self) -> None:
        self.halt.set()
        try:
            self.conn.delete(protocol.worker_key(self.settings.name))
            self.conn.srem(protocol.WORKERS_SET, self.settings.name)
        except Exception:
            pass


def check_url(url: str, password: bool) -> str | None:
    """A warning for a Redis reached over a network without a password (never an error: a private LAN
    may be fine), None otherwise."""
    parsed = urlparse(url)
    if parsed.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"--queue {protocol.redact(url)}: expected redis://, rediss:// or unix://")
    host = parsed.hostname or "localhost"
    loopback = host == "localhost" or parsed.scheme == "unix"
    if not loopback:
        try:
            loopback = ip_address(host).is_loopback
        except ValueError:
            loopback = False
    if not loopback and not password and not parsed.password:
        return f"Redis at {host} is reached over the network without a password: set --password-file"
    return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cinecut worker", description=__doc__.split("\n")[0])
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML file with any of these options under [worker] "
                   "(path_map as a table {FROM = TO}); options given here win")
    p.add_argument("--queue", help="redis://host:6379/0 (the coordinator's [queue] redis)")
    p.add_argument("--password-file", type=Path, help="file whose first line is the Redis password")
    p.add_argument("--path-map", action="append", default=None, metavar="FROM=TO",
                   help="the coordinator's library root FROM is TO on this host (repeatable); only films "
                        "inside a mapped root are accepted")
    p.add_argument("--model", type=Path)
    p.add_argument("--mmproj", type=Path)
    p.add_argument("--gpu-lock", type=Path, help="this host's GPU lock (interactive runs take the GPU first)")
    p.add_argument("--n-gpu-layers", type=int)
    p.add_argument("--n-ctx", type=int)
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--parallel", type=int, help="frames in flight (0: chosen from free VRAM)")
    p.add_argument("--window", help='hours this worker takes jobs, e.g. "22:00-07:00" (default: always)')
    p.add_argument("--name", help="worker name (default: host name)")
    p.add_argument("--poll", type=float, help=f"seconds between looks at an empty queue (default {DEFAULT_POLL_S:g})")
    p.add_argument("--lease", type=float, help=f"job lease in seconds (default {protocol.DEFAULT_LEASE_S:g})")
    p.add_argument("--heartbeat", type=float,
                   help=f"seconds between heartbeats (default {protocol.DEFAULT_HEARTBEAT_S:g})")
    p.add_argument("--max-keyframes", type=int, help="keyframe plan: at most this many frames")
    # Other programs on this GPU (a game, a transcode): as the local pre-warm's [prewarm] yield_* settings.
    p.add_argument("--yield-to", help="comma-separated: processes, transcodes, vram ('' = never; default all)")
    p.add_argument("--yield-ignore", action="append", default=None, help="a process name that never counts")
    p.add_argument("--yield-vram-mb", type=int)
    p.add_argument("--encoder-busy-percent", type=int)
    p.add_argument("--quiet-seconds", type=float)
    p.add_argument("--unload-after", type=float)


_DEFAULTS: Final[dict[str, Any]] = {
    "n_gpu_layers": -1, "n_ctx": 4096, "max_tokens": 256, "parallel": 1, "poll": DEFAULT_POLL_S,
    "lease": protocol.DEFAULT_LEASE_S, "heartbeat": protocol.DEFAULT_HEARTBEAT_S,
    "yield_to": "processes,transcodes,vram", "yield_ignore": [], "yield_vram_mb": 1024, "encoder_busy_percent": 5,
    "quiet_seconds": 60.0, "unload_after": 120.0,
}


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    """Options from the command line over the config file's [worker] table over the defaults."""
    opts: dict[str, Any] = dict(_DEFAULTS)
    if args.config is not None:
        with open(args.config, "rb") as f:
            table = tomllib.load(f).get("worker", {})
        if not isinstance(table, dict):
            raise ValueError(f"{args.config}: [worker] must be a table")
        for key, value in table.items():
            key = key.replace("-", "_")
            if key == "path_map":
                if not isinstance(value, dict):
                    raise ValueError(f"{args.config}: worker.path_map must be a table {{FROM = TO}}")
                value = [f"{k}={v}" for k, v in value.items()]
            opts[key] = value
    for key, value in vars(args).items():
        if key not in ("config", "command", "func") and value is not None:
            opts[key] = value
    for key in ("queue", "model", "mmproj", "gpu_lock"):
        if not opts.get(key):
            raise ValueError(f"--{key.replace('_', '-')} is required (or {key} in the config's [worker])")
    if not opts.get("path_map"):
        raise ValueError("at least one --path-map FROM=TO is required: a worker takes only films it maps")
    return opts


def run(opts: dict[str, Any]) -> int:
    from redis.exceptions import RedisError
    from rq.exceptions import StopRequested

    window = None
    if opts.get("window"):
        from cinecutd.config import Window

        window = Window.parse(str(opts["window"]))
    host = socket.gethostname()
    settings = jobmod.WorkerSettings(
        paths=PathMap.parse(opts["path_map"]), model=Path(opts["model"]), mmproj=Path(opts["mmproj"]),
        gpu_lock=Path(opts["gpu_lock"]), n_gpu_layers=int(opts["n_gpu_layers"]), n_ctx=int(opts["n_ctx"]),
        max_tokens=int(opts["max_tokens"]), parallel=int(opts["parallel"]),
        max_keyframes=opts.get("max_keyframes"), lease_s=float(opts["lease"]),
        name=str(opts.get("name") or host), host=host,
    )
    share = argparse.Namespace(**{k: opts[k] for k in ("yield_to", "yield_ignore", "yield_vram_mb",
                                                       "encoder_busy_percent", "quiet_seconds", "unload_after")},
                               n_gpu_layers=settings.n_gpu_layers)

    def gpu_share() -> Any:
        from cinecut.worker import gpu_share_from_args

        return gpu_share_from_args(share)

    settings.gpu_share = gpu_share
    warning = check_url(str(opts["queue"]), opts.get("password_file") is not None)
    if warning:
        log.warning("%s", warning)
    conn = protocol.connect(str(opts["queue"]), opts.get("password_file"))
    jobmod.SETTINGS, jobmod.CONNECTION = settings, conn
    poll = float(opts["poll"])

    heartbeat = Heartbeat(conn, settings, float(opts["heartbeat"]), window)
    heartbeat.start()
    cls = _worker_class(poll, window)
    jobmod._report("worker_started", host=host, queue=protocol.redact(str(opts["queue"])),
                   roots=[str(k) for k, _ in settings.paths.entries], pid=os.getpid())
    backoff = 0.5

    def on_signal(signum: int, _frame: object) -> None:
        _STOPPING.set()
        jobmod.CURRENT.stop.set()

    try:
        while not _STOPPING.is_set():
            signal.signal(signal.SIGTERM, on_signal)
            signal.signal(signal.SIGINT, on_signal)
            try:
                heartbeat.beat()
                from rq import Queue

                q = Queue(protocol.QUEUE_NAME, connection=conn, serializer=protocol.serializer())
                # RQ's own record: unique per process (a killed run's record outlives it by minutes).
                w = cls([q], connection=conn, name=f"{settings.name}.{os.getpid()}", serializer=protocol.serializer())
                try:
                    w.work(burst=False, logging_level="WARNING")  # returns on a stop, or on a Redis failure
                finally:
                    signal.signal(signal.SIGTERM, on_signal)
                    signal.signal(signal.SIGINT, on_signal)
                backoff = 0.5
            except StopRequested:
                break
            except RedisError as exc:
                jobmod._report("redis_unreachable", reason=str(exc), retry_s=backoff)
                backoff = min(MAX_BACKOFF_S, backoff * 2)
            _STOPPING.wait(backoff)
    finally:
        heartbeat.end()
        jobmod._report("worker_stopped", host=host)
    return 0


def main(argv: Sequence[str] | None = None, args: argparse.Namespace | None = None) -> int:
    if args is None:
        args = build_parser().parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("cinecut.inference.llama").setLevel(logging.WARNING)
    try:
        opts = resolve(args)
        return run(opts)
    except (ValueError, OSError) as exc:
        print(f"cinecut worker: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
