"""The function a remote worker runs for one film: map, check, analyze, report.

It runs in the ``cinecut worker`` process (RQ's SimpleWorker: no fork, so a stop request reaches the
running analysis as a flag it polls between frames, and a killed worker takes its job down with it). The
analysis is :func:`cinecut.pipeline.analyze`, the one used by ``cinecut analyze`` and the local pre-warm:
same work-dir lock, same partial results to resume from, same stamp re-check before the cache is
committed. The job's own stamp is checked first, so a job queued for an older version of the film does
nothing.

Every outcome is returned as a small JSON object (``outcome``: done, stopped, discarded, stale, refused,
failed); the coordinator decides what follows. While it runs, the job renews its lease key every third
of the lease: a worker that dies stops renewing, and the coordinator hands the job to another worker.
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cinecut.analyze_options import AnalyzeOptions
from cinecut.ingest import IngestError
from cinecut.pipeline import AnalysisStopped, FilmChangedError, PipelineError, analyze
from cinecut.progress import EventKind, ProgressEvent
from cinecut.remote import protocol
from cinecut.remote.pathmap import PathMap, Refused
from cinecut.stamp import SourceStamp

log = logging.getLogger("cinecut.remote")


@dataclass
class WorkerSettings:
    """What this host brings to a job: its path view, model, GPU lock and limits."""

    paths: PathMap
    model: Path
    mmproj: Path
    gpu_lock: Path
    n_gpu_layers: int = -1
    n_ctx: int = 4096
    max_tokens: int = 256
    parallel: int = 1
    vibe: str | None = None
    max_keyframes: int | None = None
    lease_s: float = protocol.DEFAULT_LEASE_S
    #: Other programs on this host's GPU to yield to (cinecut.gpu_share), one fresh policy per job.
    gpu_share: Callable[[], Any] | None = None
    name: str = field(default_factory=socket.gethostname)
    host: str = field(default_factory=socket.gethostname)

    def analyze_options(self, vibe: str | None) -> AnalyzeOptions:
        """A job's options: the local pre-warm's, with this host's model and GPU lock; ``vibe`` (the job's)
        else this host's, else ``action``."""
        return AnalyzeOptions(
            model=self.model, mmproj=self.mmproj, n_gpu_layers=self.n_gpu_layers, n_ctx=self.n_ctx,
            max_tokens=self.max_tokens, parallel=self.parallel, vibe=vibe or self.vibe or "action",
            gpu_lock_path=self.gpu_lock, interactive=False, max_keyframes=self.max_keyframes,
        )


@dataclass
class Current:
    """The job in hand, shared with the heartbeat thread (status: film, frames/s)."""

    job_id: str | None = None
    film: str | None = None
    state: str = "idle"
    done: int = 0
    total: int = 0
    fps: float = 0.0
    started: float = 0.0
    stop: threading.Event = field(default_factory=threading.Event)

    def snapshot(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "film": self.film, "state": self.state, "done": self.done,
                "total": self.total, "fps": round(self.fps, 3)}


#: Set by the worker before it takes jobs (one worker per process).
SETTINGS: WorkerSettings | None = None
CONNECTION: Any = None
CURRENT = Current()


def _report(event: str, **fields: Any) -> None:
    """One JSON line on stderr per outcome: the worker's journal, and what its tests read."""
    line = protocol.dumps({"event": event, "at": round(time.time(), 3),
                           "worker": SETTINGS.name if SETTINGS else None, **fields})
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


class _Lease(threading.Thread):
    """Renews ``cinecut:lease:<job id>`` (with progress in its value) until stopped."""

    def __init__(self, conn: Any, jid: str, settings: WorkerSettings) -> None:
        super().__init__(name="cinecut-lease", daemon=True)
        self.conn, self.jid, self.settings = conn, jid, settings
        self.halt = threading.Event()

    def renew(self) -> None:
        value = protocol.dumps({"worker": self.settings.name, "host": self.settings.host, "at": time.time(),
                                **CURRENT.snapshot()})
        self.conn.set(protocol.lease_key(self.jid), value, px=max(1, int(self.settings.lease_s * 1000)))

    def run(self) -> None:
        while not self.halt.wait(self.settings.lease_s / 3):
            try:
                self.renew()
            except Exception as exc:  # Redis away: the filesystem keeps the work; try again next round
                log.warning("lease renewal failed: %s", exc)

    def end(self) -> None:
        self.halt.set()
        self.join(timeout=2)
        try:
            self.conn.delete(protocol.lease_key(self.jid))
        except Exception:
            pass


def _progress(ev: ProgressEvent) -> None:
    if ev.kind is EventKind.FRAME:
        CURRENT.state, CURRENT.done, CURRENT.total, CURRENT.fps = "running", ev.done, ev.total, ev.fps
    elif ev.kind is EventKind.STAGE and ev.stage:
        CURRENT.state = ev.stage
    elif ev.kind in (EventKind.YIELDED, EventKind.WAITING_GPU):
        CURRENT.state = "yielded"
    elif ev.kind is EventKind.WAITING_LOCK:
        CURRENT.state = "waiting-lock"
    elif ev.kind is EventKind.RESUMED:
        CURRENT.state = "running"


def warm(raw: Any) -> dict[str, Any]:
    """Pre-warm one film named by a job payload; returns the outcome (never raises for a film's fault)."""
    settings, conn = SETTINGS, CONNECTION
    if settings is None:
        return {"outcome": "refused", "reason": "not running inside a cinecut worker"}
    try:
        payload = protocol.Payload.from_json(raw)
        film = settings.paths.local(payload.film, payload.root)
    except (ValueError, Refused) as exc:
        _report("job_refused", reason=str(exc))
        return {"outcome": "refused", "reason": str(exc), "worker": settings.name}
    jid = payload.id
    base = {"worker": settings.name, "host": settings.host, "film": payload.film, "local": str(film)}
    if SourceStamp.maybe(film) != payload.stamp:
        _report("job_stale", **base)
        return {"outcome": "stale", "reason": "the film changed since the job was queued", **base}
    CURRENT.job_id, CURRENT.film, CURRENT.state = jid, payload.film, "starting"
    CURRENT.done = CURRENT.total = 0
    CURRENT.fps, CURRENT.started = 0.0, time.time()
    lease = _Lease(conn, jid, settings) if conn is not None else None
    if lease is not None:
        try:
            lease.renew()
        except Exception as exc:
            log.warning("lease: %s", exc)
        lease.start()
    _report("job_started", job_id=jid, **base)
    t0 = time.monotonic()
    try:
        result = analyze(
            film, settings.analyze_options(payload.vibe), progress=_progress, should_stop=CURRENT.stop.is_set,
            gpu_share=settings.gpu_share() if settings.gpu_share is not None else None,
        )
    except AnalysisStopped as exc:
        out = {"outcome": "stopped", "reason": str(exc), "done": CURRENT.done, "total": CURRENT.total, **base}
    except FilmChangedError as exc:
        out = {"outcome": "discarded", "reason": str(exc), **base}
    except (PipelineError, IngestError, OSError, ValueError) as exc:
        out = {"outcome": "failed", "reason": str(exc), **base}
    except Exception as exc:
        traceback.print_exc()
        out = {"outcome": "failed", "reason": f"{type(exc).__name__}: {exc}", **base}
    else:
        out = {"outcome": "done", "frames": result.records, "frames_computed": result.frames_computed,
               "frames_salvaged": result.frames_salvaged, "cache_hit": result.cache_hit, **base}
    finally:
        if lease is not None:
            lease.end()
        CURRENT.job_id, CURRENT.film, CURRENT.state = None, None, "idle"
        CURRENT.stop.clear()
    out["duration_s"] = round(time.monotonic() - t0, 3)
    _report("job_" + out["outcome"], job_id=jid, **{k: v for k, v in out.items() if k != "outcome"})
    return out
