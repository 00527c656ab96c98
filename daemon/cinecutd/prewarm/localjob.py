"""The local pre-warm job: one ``python -m cinecut.worker`` child (see :mod:`.supervisor`), one at a time
(one GPU), followed through its events and recorded when it ends.

The worker writes the work dir exactly as ``cinecut analyze`` would, takes the GPU lock, yields the GPU to
interactive runs, and keeps a resumable partial; this module starts it, asks it to stop when it should no
longer run, and records what became of it:

* **done**: the engine revalidates the film, so it learns the cache is valid (status shows it warm);
* **stopped** (window end, pause, daemon stop, the film changed): the film stays queued and the next run
  resumes from the partial;
* **discarded** (the film changed while it was read): requeued once the new file has settled;
* **failed** (crash, hang, OOM, bad film): recorded with its reason; not retried until the video or its
  subtitles change, or ``cinecutd prewarm --retry FILM``. Failures in a row block the scheduler for a
  while (:mod:`.gate`): then the setup, not the films, is the likely cause.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import structlog

from cinecut.inference.cache import CacheState
from cinecut.stamp import SourceStamp
from cinecutd.config import PrewarmConfig
from cinecutd.prewarm.backlog import Backlog
from cinecutd.prewarm.gate import BACKOFF_S, FAILURES_BEFORE_BACKOFF, SETUP_RETRY_S, Gate
from cinecutd.prewarm.joblogs import JobLogs
from cinecutd.prewarm.jobqueue import Failure
from cinecutd.prewarm.ledger import Ledger, subtitle_stamps
from cinecutd.prewarm.supervisor import Timeouts, WorkerExit, WorkerProcess
from cinecutd.prewarm.vram import Decision
from cinecutd.prewarm.yields import counts_as_gpu_yield, yield_reason
from cinecutd.registry import FilmState
from cinecutd.states import Trigger

log = structlog.get_logger("cinecutd")

PROGRESS_LOG_S: Final = 60.0
WORKER_MODULE: Final = "cinecut.worker"


def build_worker_argv(python: str, film: Path, pw: PrewarmConfig) -> list[str]:
    """The worker's command line for one film.

    No --subtitle: the pipeline picks the sidecar exactly as ``cinecut analyze FILM`` would, so the
    keyframe plan (and a partial to resume) is the same whichever of the two runs.
    """
    argv = [
        python, "-m", WORKER_MODULE, "--film", str(film), "--model", str(pw.model), "--mmproj", str(pw.mmproj),
        "--n-gpu-layers", str(pw.n_gpu_layers), "--n-ctx", str(pw.n_ctx), "--max-tokens", str(pw.max_tokens),
        "--gpu-lock", str(pw.gpu_lock), "--parallel", str(pw.parallel),
        "--yield-to", ",".join(pw.yield_to), "--yield-vram-mb", str(pw.yield_vram_mb),
        "--encoder-busy-percent", str(pw.encoder_busy_percent), "--quiet-seconds", str(pw.quiet_seconds),
        "--unload-after", str(pw.unload_after_s), *(f"--yield-ignore={name}" for name in pw.yield_ignore),
    ]
    if pw.vibe:
        argv += ["--vibe", pw.vibe]
    return argv


@dataclass(slots=True)
class Job:
    """The film being pre-warmed now."""

    film: Path
    stamp: SourceStamp | None
    subtitles: tuple[tuple[str, SourceStamp | None], ...]
    forced: bool  # ``--now``: runs outside the window
    proc: WorkerProcess
    device: str
    note: str | None
    started_at: float = field(default_factory=time.time)
    started_mono: float = field(default_factory=time.monotonic)
    stage: str | None = None
    done: int = 0
    total: int = 0
    computed: int = 0  # frames the model described in this run (the worker's count)
    fps: float = 0.0
    cache_hit: bool = False
    salvaged: int | None = None  # frames of the plan kept from before a subtitle change, once known
    done_event: dict[str, Any] | None = None
    last_progress_log: float = 0.0

    def current(self) -> dict[str, Any]:
        eta = round((self.total - self.done) / self.fps, 1) if self.fps > 0 and self.total >= self.done else None
        return {
            "film": str(self.film),
            "done": self.done,
            "total": self.total,
            "fps": round(self.fps, 3),
            "eta_s": eta,
            "pid": self.proc.pid,
            "stage": self.stage,
            "salvaged": self.salvaged,
            "yielded": self.proc.yielded,
            "yielded_to": self.proc.yielded_to,
            "stopping": self.proc.stop_reason,
            "device": self.device,
            "forced": self.forced,
            "started_at": self.started_at,
            "log": str(self.proc.log_path),
        }


class LocalJobs:
    """Starts, follows, stops and records the local job; engine thread only, never blocking (the worker's
    output is read without waiting)."""

    def __init__(self, engine: Any, backlog: Backlog, ledger: Ledger, gate: Gate, logs: JobLogs,
                 timeouts: Timeouts) -> None:
        self._engine = engine
        self._backlog = backlog
        self._ledger = ledger
        self._gate = gate
        self._logs = logs
        self._timeouts = timeouts
        self._job: Job | None = None

    @property
    def job(self) -> Job | None:
        """The running job (read it; change it through the methods below)."""
        return self._job

    @property
    def film(self) -> Path | None:
        return self._job.film if self._job is not None else None

    # ------------------------------------------------------------------------------ start
    def start(self, state: FilmState, decision: Decision, argv: list[str]) -> None:
        film = state.film
        req = self._backlog.requested(film)
        try:
            log_path = self._logs.path_for(film)
            proc = WorkerProcess(argv, log_path=log_path, timeouts=self._timeouts)
            proc.start()
        except OSError as exc:
            self._gate.block("setup-error", f"cannot start the worker: {exc.strerror or exc}", SETUP_RETRY_S)
            return
        self._gate.clear()
        attempt = self._ledger.attempt(film)
        job = Job(film, state.stamp, subtitle_stamps(state), bool(req and req.now), proc, decision.device,
                  decision.note)
        self._job = job
        self._backlog.mark_dirty()
        log.info("prewarm_started", film=str(film), pid=proc.pid, device=decision.device, note=decision.note,
                 forced=job.forced, attempt=attempt, log=str(log_path))

    # ------------------------------------------------------------------------------ follow
    def poll(self) -> None:
        """Read the worker's events; record its end once it has exited."""
        job = self._job
        if job is None:
            return
        for ev in job.proc.poll():
            self._apply(job, ev)
        if job.proc.exit is not None:
            self._finish(job, job.proc.exit)

    def _apply(self, job: Job, ev: dict[str, Any]) -> None:
        kind = ev.get("event")
        if kind == "stage":
            job.stage = str(ev.get("stage"))
        elif kind == "progress":
            job.stage = "inference"
            job.done = _int(ev.get("done"), job.done)
            job.total = _int(ev.get("total"), job.total)
            job.fps = _float(ev.get("fps"), job.fps)
            computed = _int(ev.get("computed"), job.computed)
            self._ledger.count_frames(computed - job.computed)
            job.computed = computed
            now = time.monotonic()
            if now - job.last_progress_log >= PROGRESS_LOG_S:
                job.last_progress_log = now
                log.info("prewarm_progress", film=str(job.film), done=job.done, total=job.total,
                         fps=round(job.fps, 3))
        elif kind == "cache_hit":
            job.cache_hit = True
        elif kind == "salvaged":
            job.salvaged = _int(ev.get("salvaged"), 0)
            job.total = _int(ev.get("total"), job.total)
            log.info("prewarm_salvaged", film=str(job.film), salvaged=job.salvaged, total=job.total,
                     summary=f"salvaged {job.salvaged} of {job.total} frames")
        elif kind == "yielded":
            why = yield_reason(job.proc)
            if counts_as_gpu_yield(why):
                self._ledger.count_yield(why)
            log.info("prewarm_yielded", film=str(job.film), done=job.done, total=job.total,
                     reason="an interactive run asked for the GPU" if why == "interactive" else why,
                     to=job.proc.yielded_to)
        elif kind == "resumed":
            log.info("prewarm_resumed", film=str(job.film), done=job.done, total=job.total)
        elif kind == "done":
            job.done_event = ev

    def supervise(self) -> None:
        """Ask the job to stop once it should no longer run; enforce the worker's deadlines."""
        job = self._job
        if job is None:
            return
        if job.proc.stop_reason is None:
            why = self._gate.why_stop(forced=job.forced)
            if why is None:
                state = self._engine.reg.films.get(job.film)
                if state is None:
                    why = "the film is gone"
                elif state.stamp != job.stamp:
                    why = "the film changed"
            if why is not None:
                log.info("prewarm_stopping", film=str(job.film), reason=why, done=job.done, total=job.total)
                job.proc.stop(why)
        job.proc.check_deadlines()

    # ------------------------------------------------------------------------------ change it
    def force(self, film: Path) -> bool:
        """``--now`` for the running film: the window no longer stops it. False if ``film`` is not running."""
        if self._job is None or self._job.film != film:
            return False
        self._job.forced = True
        return True

    def film_changed(self, state: FilmState) -> None:
        """A new source under the running job: it stops after its frame (its results would be discarded)."""
        job = self._job
        if job is not None and job.film == state.film and state.stamp != job.stamp:
            job.proc.stop("the film changed")

    def stop(self, reason: str) -> Job | None:
        """Ask the job to stop after its current frame (its progress is kept); the job, if any."""
        if self._job is not None:
            self._job.proc.stop(reason)
        return self._job

    def shutdown(self, timeout: float) -> None:
        """Daemon shutdown: ask the worker to stop after its frame, wait up to ``timeout``, then kill it."""
        job = self._job
        if job is None:
            return
        job.proc.stop("the daemon is stopping")
        if not job.proc.wait(timeout):
            job.proc.kill(f"did not stop within {timeout:.1f} s")
            job.proc.wait(2.0)
        self.poll()
        if self._job is job and job.proc.exit is not None:
            self._finish(job, job.proc.exit)

    # ------------------------------------------------------------------------------ what became of it
    def _finish(self, job: Job, ex: WorkerExit) -> None:
        self._job = None
        self._backlog.mark_dirty()
        film = job.film
        duration = time.monotonic() - job.started_mono
        state = self._engine.reg.films.get(film)
        record: dict[str, Any] = {
            "outcome": ex.outcome, "at": time.time(), "duration_s": round(duration, 3), "exit_code": ex.returncode,
            "done": job.done, "total": job.total, "device": job.device, "log": str(job.proc.log_path),
        }
        if ex.reason:
            record["reason"] = ex.reason
        ev = job.done_event or {}
        if ex.outcome == "done":
            record.update(frames=_int(ev.get("records"), job.total), frames_computed=_int(ev.get("frames_computed"), 0),
                          cache=ev.get("cache"), cache_hit=job.cache_hit,
                          frames_salvaged=_int(ev.get("frames_salvaged"), job.salvaged or 0))
            if state is not None:
                self._engine.revalidate(state, Trigger.PREWARMED)
                if state.cache != CacheState.VALID:
                    self._backlog.already_warm(state)  # the revalidation may have been deferred behind a lock
                if state.cache == CacheState.VALID:
                    state.cache_records = record["frames"]
            warm = state is not None and state.cache == CacheState.VALID
            if not warm and state is not None and state.stamp == job.stamp:
                ex = WorkerExit("failed", ex.returncode, "the worker reported success but left no valid cache",
                                ex.stderr_tail)
                record.update(outcome="failed", reason=ex.reason)
            elif warm:
                self._ledger.succeeded(film, time.time())
                self._backlog.drop_request(film)
                computed = record["frames_computed"]
                fps = computed / duration if duration > 0 else 0.0
                if computed > 0:
                    self._ledger.measured(film, job.fps or fps, record["frames"], time.time())
                log.info("prewarm_done", film=str(film), frames=record["frames"], frames_computed=computed,
                         fps=round(job.fps or fps, 3), duration_s=round(duration, 3), cache_hit=job.cache_hit,
                         frames_salvaged=record["frames_salvaged"], device=job.device)
            else:
                record["outcome"] = "discarded"
                log.info("prewarm_discarded", film=str(film), reason="the film changed or vanished")
        if ex.outcome == "discarded":
            log.info("prewarm_discarded", film=str(film), reason=ex.reason)
        elif ex.outcome == "stopped":
            log.info("prewarm_stopped", film=str(film), reason=ex.reason, done=job.done, total=job.total,
                     exit_code=ex.returncode)
        elif ex.outcome == "failed":
            self._backlog.drop_request(film)
            if state is None:
                record["outcome"] = "abandoned"
                log.info("prewarm_abandoned", film=str(film), reason=f"the film is gone ({ex.reason})")
            else:
                self._fail(job, ex)
        self._ledger.record(film, record)

    def _fail(self, job: Job, ex: WorkerExit) -> None:
        reason = ex.reason or "unknown failure"
        in_a_row = self._ledger.fail(job.film, Failure(reason, time.time(), job.stamp, job.subtitles,
                                                       str(job.proc.log_path)))
        log.error("prewarm_failed", film=str(job.film), reason=reason, exit_code=ex.returncode,
                  stderr=ex.stderr_tail[-3:] or None, log=str(job.proc.log_path))
        if in_a_row >= FAILURES_BEFORE_BACKOFF:
            self._gate.block("backoff", f"{in_a_row} jobs failed in a row (last: {reason}); "
                             f"next attempt in {BACKOFF_S / 60:g} min", BACKOFF_S)


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else default


def _float(value: Any, default: float) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    return default
