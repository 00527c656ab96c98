"""The daemon's pre-warm scheduler: which film, when, where, and what became of it.

Everything here runs on the daemon's engine thread (hooks, control commands, and ``tick()`` from the
main loop), so there is no locking; nothing here may block either: the worker's output is read without
waiting, the GPU probe is a polled child process, and the only syscalls per tick are a clock read and a
non-blocking pipe read.

A job is one ``python -m cinecut.worker`` child (see :mod:`.supervisor`). The worker writes the work dir
exactly as ``cinecut analyze`` would, takes the GPU lock, yields the GPU to interactive runs, and keeps a
resumable partial; the scheduler decides when it runs and records how it ended:

* **done**: the engine revalidates the film, so it learns the cache is valid (status shows it warm);
* **stopped** (window end, pause, daemon stop, the film changed): the film stays queued and the next run
  resumes from the partial;
* **discarded** (the film changed while it was read): requeued once the new file has settled;
* **failed** (crash, hang, OOM, bad film): recorded with its reason; not retried until the video or its
  subtitles change, or ``cinecutd prewarm --retry FILM``.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import structlog

from cinecut.inference.cache import CacheState, cache_state
from cinecut.stamp import SourceStamp
from cinecutd.config import Config, PrewarmConfig
from cinecutd.control import ControlError
from cinecutd.prewarm import jobqueue
from cinecutd.prewarm.jobqueue import Failure, Request
from cinecutd.prewarm.probe import OffloadProbe
from cinecutd.prewarm.supervisor import DEFAULT_TIMEOUTS, Timeouts, WorkerExit, WorkerProcess
from cinecutd.prewarm.throughput import Throughput
from cinecutd.prewarm.vram import Decision, GpuInfo, decide, query_gpus, required_vram
from cinecutd.prewarm.writers import open_for_writing
from cinecutd.registry import FilmState

log = structlog.get_logger("cinecutd")

#: How often a blocked scheduler looks again: free VRAM changes when another program exits.
VRAM_RETRY_S: Final = 30.0
#: A missing model file, a broken worker interpreter or a CPU-only llama.cpp build is fixed by a person:
#: look again now and then (and at once after a reload or ``resume``).
SETUP_RETRY_S: Final = 600.0
#: After this many failures in a row the problem is probably the setup, not the films: slow down.
FAILURES_BEFORE_BACKOFF: Final = 3
BACKOFF_S: Final = 900.0
#: A film found open for writing is looked at again after this long (or its settle time, if longer).
WRITER_RETRY_S: Final = 30.0
#: The queue is recomputed when something changed, when a film's settle time ends, and at least this often.
QUEUE_REFRESH_S: Final = 5.0
PROGRESS_LOG_S: Final = 60.0
MAX_FAILURES: Final = 1000
MAX_HISTORY: Final = 1000
MAX_LOGS: Final = 50
QUEUE_SHOWN: Final = 100
WORKER_MODULE: Final = "cinecut.worker"
#: Why a worker paused, as counted in the metrics (a wait for a pipeline's work-dir lock is not a GPU yield).
GPU_YIELD_REASONS: Final = frozenset({"interactive", "gpu_lock", "processes", "transcodes", "vram"})


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


def subtitle_stamps(state: FilmState) -> tuple[tuple[str, SourceStamp | None], ...]:
    return tuple((str(p), SourceStamp.maybe(p)) for p in state.subtitles)


class PrewarmScheduler:
    """Queue, window, placement and supervision of pre-warm jobs (one at a time: one GPU)."""

    def __init__(
        self,
        config: Config,
        engine: Any,
        *,
        clock: Callable[[], datetime] = datetime.now,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
        gpu_query: Callable[[], GpuInfo] = query_gpus,
        worker_argv: Callable[[FilmState, PrewarmConfig], list[str]] | None = None,
    ) -> None:
        self.config = config
        self.engine = engine
        self._clock = clock
        self._timeouts = timeouts
        self._gpu_query = gpu_query
        self._worker_argv = worker_argv or self._default_argv
        self._job: Job | None = None
        self._paused = False
        self._requests: dict[Path, Request] = {}
        self._seq = 0
        self._failures: OrderedDict[Path, Failure] = OrderedDict()
        self._history: OrderedDict[Path, dict[str, Any]] = OrderedDict()
        self._attempts: dict[Path, int] = {}
        self._skip_until: dict[Path, float] = {}
        self._completed = 0
        # For the metrics: cumulative since the daemon started.
        self._frames_described = 0
        self._outcomes: Counter[str] = Counter()
        self._gpu_yields: Counter[str] = Counter()
        self._last_success: float | None = None
        self._throughput = Throughput()
        self._jobs_started = 0
        self._consecutive_failures = 0
        self._blocked: tuple[str, str] | None = None  # (state, note) while no job can start
        self._retry_at = 0.0
        self._offload: bool | None = None
        self._probe: OffloadProbe | None = None
        self._queue_cache: list[FilmState] = []
        self._queue_at = -1e18
        self._queue_dirty = True
        self._next_settle: float | None = None
        self._log_dir: Path | None = None
        self._remote = _remote_dispatch(self) if config.queue.enabled else None

    # ------------------------------------------------------------------------------ properties
    @property
    def pw(self) -> PrewarmConfig:
        return self.config.prewarm

    @property
    def enabled(self) -> bool:
        return self.pw.enabled

    # ------------------------------------------------------------------------------ engine hooks
    def on_film_changed(self, state: FilmState) -> None:
        """The engine revalidated a film after a change: a new source earns a failed film a new try."""
        self._queue_dirty = True
        self._skip_until.pop(state.film, None)
        failure = self._failures.get(state.film)
        if failure is not None and (failure.stamp != state.stamp or failure.subtitles != subtitle_stamps(state)):
            del self._failures[state.film]
            log.info("prewarm_retry", film=str(state.film), reason="the film or its subtitles changed")
        job = self._job
        if job is not None and job.film == state.film and state.stamp != job.stamp:
            job.proc.stop("the film changed")
        if self._remote is not None:
            self._remote.on_film_changed(state)

    def on_reconciled(self) -> None:
        self._queue_dirty = True

    # ------------------------------------------------------------------------------ the loop
    def tick(self) -> None:
        """One look at the job and the queue; called every main-loop turn (at most a second apart)."""
        job = self._job
        if job is not None:
            self._poll_job(job)
        if self._job is not None:
            self._supervise(self._job)
            return
        if self._remote is not None:  # the jobs run on remote workers: keep the queue in step
            wanted = self._runnable(self.pw.window.contains(self._clock())) if self.enabled and not self._paused else []
            self._remote.tick(wanted)
            return
        if not self.enabled or self._paused:
            if self._probe is not None and not self.enabled:
                self._probe.cancel()
                self._probe = None
            return
        if time.monotonic() < self._retry_at:
            return
        self._maybe_start()

    def _supervise(self, job: Job) -> None:
        if job.proc.stop_reason is None:
            state = self.engine.reg.films.get(job.film)
            why = None
            if not self.enabled:
                why = "pre-warm was disabled"
            elif self._paused:
                why = "paused"
            elif not job.forced and not self.pw.window.contains(self._clock()):
                why = "the window closed"
            elif state is None:
                why = "the film is gone"
            elif state.stamp != job.stamp:
                why = "the film changed"
            if why is not None:
                log.info("prewarm_stopping", film=str(job.film), reason=why, done=job.done, total=job.total)
                job.proc.stop(why)
        job.proc.check_deadlines()

    # ------------------------------------------------------------------------------ queue
    def _queue(self) -> list[FilmState]:
        """Eligible films in run order; recomputed when dirty, when a settle time ends, or every few s."""
        now = time.monotonic()
        due = self._queue_dirty or now - self._queue_at >= QUEUE_REFRESH_S
        if not due and self._next_settle is not None and now >= self._next_settle:
            due = True
        if not due:
            return self._queue_cache
        films = self.engine.reg.films
        settle = self.pw.settle_seconds
        eligible = []
        running = self._job.film if self._job is not None else None
        for film, failure in list(self._failures.items()):
            state = films.get(film)
            if state is not None and jobqueue.failure_outdated(failure, state):
                del self._failures[film]  # the source changed (an event the hooks did not see, e.g. a rescan)
                log.info("prewarm_retry", film=str(film), reason="the film or its subtitles changed")
        for film, state in films.items():
            if film == running:
                continue
            if jobqueue.why_not(state, now=now, settle_seconds=settle, failure=self._failures.get(film),
                                skip_until=self._skip_until.get(film)) is None:
                eligible.append(state)
        self._queue_cache = jobqueue.order(eligible, self._requests)
        self._next_settle = jobqueue.next_settle(films.values(), now, settle)
        self._queue_at = now
        self._queue_dirty = False
        for table in (self._requests, self._skip_until, self._attempts):
            for film in [f for f in table if f not in films]:
                del table[film]
        return self._queue_cache

    def _runnable(self, in_window: bool) -> list[FilmState]:
        queue = self._queue()
        if in_window:
            return queue
        return [s for s in queue if (r := self._requests.get(s.film)) is not None and r.now]

    # ------------------------------------------------------------------------------ starting a job
    def _maybe_start(self) -> None:
        in_window = self.pw.window.contains(self._clock())
        candidates = self._runnable(in_window)
        if not candidates:
            if self._blocked is not None and self._blocked[0] in ("waiting-vram", "starting"):
                self._blocked = None
            return
        problem = self._preflight()
        if problem is not None:
            self._block("setup-error", problem, SETUP_RETRY_S)
            return
        decision = self._place()
        if decision is None:
            return  # the GPU probe is still running
        if not decision.run:
            self._block(decision.state, decision.note or decision.state,
                        VRAM_RETRY_S if decision.state == "waiting-vram" else SETUP_RETRY_S)
            if decision.state == "gpu-build-missing":
                self._offload = None  # probe again next time: a reinstall fixes it without a restart
            return
        now = time.monotonic()
        for state in candidates:
            if self._already_warm(state):
                continue
            writing = open_for_writing(state.film)
            if writing:
                self._skip_until[state.film] = now + max(WRITER_RETRY_S, self.pw.settle_seconds)
                self._queue_dirty = True
                log.info("prewarm_deferred", film=str(state.film), reason="the file is still open for writing")
                continue
            self._start(state, decision)
            return

    def _block(self, state: str, note: str, retry_s: float) -> None:
        if self._blocked != (state, note):
            log.warning("prewarm_waiting", state=state, reason=note, retry_s=retry_s)
        self._blocked = (state, note)
        self._retry_at = time.monotonic() + retry_s

    def _preflight(self) -> str | None:
        """Problems of the setup, found before a worker is started for nothing."""
        for name, path in (("model", self.pw.model), ("mmproj", self.pw.mmproj)):
            if path is None:
                return f"prewarm.{name} is not set"
            try:
                st = os.stat(path)
            except OSError as exc:
                return f"prewarm.{name} {path}: {exc.strerror or exc}"
            if not os.path.isfile(path) or st.st_size == 0:
                return f"prewarm.{name} {path}: not a model file"
        python = self._python()
        if not os.access(python, os.X_OK):
            return f"prewarm.python {python}: not an executable"
        return None

    def _python(self) -> str:
        return str(self.pw.python) if self.pw.python is not None else sys.executable

    def _place(self) -> Decision | None:
        """Where the next job runs (None while the llama.cpp build is being probed)."""
        pw = self.pw
        if pw.n_gpu_layers == 0:
            return decide(n_gpu_layers=0, gpu=GpuInfo(), offload_supported=None, required=0)
        gpu = self._gpu_query()
        if gpu.present and self._offload is None:
            if self._probe is None:
                self._probe = OffloadProbe(self._python())
                self._blocked = ("starting", "checking whether llama.cpp was built with GPU support")
            result = self._probe.poll()
            if result is None:
                return None
            self._probe = None
            if result.offload is None:
                return Decision(False, "setup-error", "none",
                                f"the worker's interpreter {self._python()} cannot load llama.cpp: {result.error}")
            self._offload = result.offload
            log.info("prewarm_gpu_probe", offload=result.offload, llama_cpp=result.version)
        required = required_vram(pw.model, pw.mmproj, pw.min_free_vram_mb)
        return decide(n_gpu_layers=pw.n_gpu_layers, gpu=gpu, offload_supported=self._offload, required=required)

    def _already_warm(self, state: FilmState) -> bool:
        """The engine ignores work-dir events, so a cache a ``cinecut analyze`` just wrote is only seen on
        disk: one header read before a job is started for nothing."""
        try:
            cs, _ = cache_state(state.film, state.work_dir, stamp=state.stamp)
        except OSError:
            return False
        if cs is CacheState.VALID:
            state.cache = CacheState.VALID
            self._queue_dirty = True
            return True
        return False

    def _default_argv(self, state: FilmState, pw: PrewarmConfig) -> list[str]:
        return build_worker_argv(self._python(), state.film, pw)

    def _start(self, state: FilmState, decision: Decision) -> None:
        film = state.film
        req = self._requests.get(film)
        try:
            log_path = self._job_log_path(film)
            proc = WorkerProcess(self._worker_argv(state, self.pw), log_path=log_path, timeouts=self._timeouts)
            proc.start()
        except OSError as exc:
            self._block("setup-error", f"cannot start the worker: {exc.strerror or exc}", SETUP_RETRY_S)
            return
        self._blocked = None
        self._attempts[film] = self._attempts.get(film, 0) + 1
        job = Job(film, state.stamp, subtitle_stamps(state), bool(req and req.now), proc, decision.device,
                  decision.note)
        self._job = job
        self._queue_dirty = True
        log.info("prewarm_started", film=str(film), pid=proc.pid, device=decision.device, note=decision.note,
                 forced=job.forced, attempt=self._attempts[film], log=str(log_path))

    def _job_log_path(self, film: Path) -> Path:
        """``<state_dir>/prewarm/<time>-<stem>.log``; the newest few are kept."""
        d = self._log_dir or self._pick_log_dir()
        stem = re.sub(r"[^A-Za-z0-9._()-]+", "_", film.stem)[:80] or "film"
        self._jobs_started += 1
        name = f"{datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}.{self._jobs_started}-{stem}.log"
        try:
            logs = sorted(p for p in d.iterdir() if p.suffix == ".log")
            for old in logs[: max(0, len(logs) - MAX_LOGS + 1)]:
                old.unlink(missing_ok=True)
        except OSError:
            pass
        return d / name

    def _pick_log_dir(self) -> Path:
        """``<state_dir>/prewarm``, else a private fresh temp dir (never a predictable name in /tmp)."""
        d = self.config.daemon.state_dir / "prewarm"
        try:
            d.mkdir(mode=0o750, parents=True, exist_ok=True)
            if d.is_dir() and not d.is_symlink() and os.access(d, os.W_OK):
                self._log_dir = d
                return d
        except OSError:
            pass
        d = Path(tempfile.mkdtemp(prefix="cinecutd-prewarm-"))
        log.warning("prewarm_log_dir", dir=str(d), reason=f"{self.config.daemon.state_dir} is not writable")
        self._log_dir = d
        return d

    # ------------------------------------------------------------------------------ a running job
    def _poll_job(self, job: Job) -> None:
        for ev in job.proc.poll():
            kind = ev.get("event")
            if kind == "stage":
                job.stage = str(ev.get("stage"))
            elif kind == "progress":
                job.stage = "inference"
                job.done = _int(ev.get("done"), job.done)
                job.total = _int(ev.get("total"), job.total)
                job.fps = _float(ev.get("fps"), job.fps)
                computed = _int(ev.get("computed"), job.computed)
                self._frames_described += max(0, computed - job.computed)
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
                why = job.proc.yield_reason or "interactive"
                if why in GPU_YIELD_REASONS:
                    self._gpu_yields[why] += 1
                log.info("prewarm_yielded", film=str(job.film), done=job.done, total=job.total,
                         reason="an interactive run asked for the GPU" if why == "interactive" else why,
                         to=job.proc.yielded_to)
            elif kind == "resumed":
                log.info("prewarm_resumed", film=str(job.film), done=job.done, total=job.total)
            elif kind == "done":
                job.done_event = ev
        if job.proc.exit is not None:
            self._finish(job, job.proc.exit)

    def _finish(self, job: Job, ex: WorkerExit) -> None:
        self._job = None
        self._queue_dirty = True
        film = job.film
        duration = time.monotonic() - job.started_mono
        state = self.engine.reg.films.get(film)
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
                self.engine.revalidate(state, "prewarmed")
                if state.cache != "valid":
                    self._already_warm(state)  # the revalidation may have been deferred behind a lock
                if state.cache == "valid":
                    state.cache_records = record["frames"]
            warm = state is not None and state.cache == "valid"
            if not warm and state is not None and state.stamp == job.stamp:
                ex = WorkerExit("failed", ex.returncode, "the worker reported success but left no valid cache",
                                ex.stderr_tail)
                record.update(outcome="failed", reason=ex.reason)
            elif warm:
                self._completed += 1
                self._last_success = time.time()
                self._consecutive_failures = 0
                self._failures.pop(film, None)
                self._requests.pop(film, None)
                computed = record["frames_computed"]
                fps = computed / duration if duration > 0 else 0.0
                if computed > 0:
                    self._throughput.record(str(film), job.fps or fps, record["frames"], time.time())
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
            self._requests.pop(film, None)
            if state is None:
                record["outcome"] = "abandoned"
                log.info("prewarm_abandoned", film=str(film), reason=f"the film is gone ({ex.reason})")
            else:
                self._fail(job, ex)
        self._outcomes[str(record["outcome"])] += 1
        self._history[film] = record
        self._history.move_to_end(film)
        while len(self._history) > MAX_HISTORY:
            self._history.popitem(last=False)

    def _fail(self, job: Job, ex: WorkerExit) -> None:
        reason = ex.reason or "unknown failure"
        self._failures[job.film] = Failure(reason, time.time(), job.stamp, job.subtitles, str(job.proc.log_path))
        self._failures.move_to_end(job.film)
        while len(self._failures) > MAX_FAILURES:
            self._failures.popitem(last=False)
        self._consecutive_failures += 1
        log.error("prewarm_failed", film=str(job.film), reason=reason, exit_code=ex.returncode,
                  stderr=ex.stderr_tail[-3:] or None, log=str(job.proc.log_path))
        if self._consecutive_failures >= FAILURES_BEFORE_BACKOFF:
            self._block("backoff", f"{self._consecutive_failures} jobs failed in a row (last: {reason}); "
                        f"next attempt in {BACKOFF_S / 60:g} min", BACKOFF_S)

    # ------------------------------------------------------------------------------ control commands
    def request(self, film: Path, now: bool = False, retry: bool = False) -> dict[str, Any]:
        """``cinecutd prewarm FILM [--now] [--retry]``."""
        if not self.enabled:
            raise ControlError("prewarm_disabled", "pre-warm is disabled in the daemon's config ([prewarm] enabled)")
        state = self.engine.reg.films.get(film)
        if state is None:
            raise ControlError("not_found", f"no watched film {film}")
        failure = self._failures.get(film)
        if failure is not None:
            if not retry:
                raise ControlError("failed", f"the pre-warm of {film} failed: {failure.reason}; "
                                             "retry it with `cinecutd prewarm --retry FILM`")
            del self._failures[film]
            self._consecutive_failures = 0
            if self._blocked is not None and self._blocked[0] == "backoff":
                self._blocked, self._retry_at = None, 0.0
            log.info("prewarm_retry", film=str(film), reason="requested")
        if state.conflict:
            raise ControlError("conflict", f"{film} shares its work dir with another film of the same stem; "
                                           "rename one of them first")
        if state.refused:
            raise ControlError("refused", f"{film}: {state.refused}")
        job = self._job
        if job is not None and job.film == film:
            if now and not job.forced:
                job.forced = True
            return {"message": f"already running: {film.name} ({job.done}/{job.total} frames)",
                    "film": str(film), "state": "running"}
        if self._already_warm(state):
            return {"message": f"already warm: {film.name} has a valid cache", "film": str(film), "state": "warm"}
        self._seq += 1
        self._requests[film] = Request(self._seq, now)
        self._queue_dirty = True
        self._retry_at = 0.0 if self._blocked is None or self._blocked[0] != "backoff" else self._retry_at
        why = jobqueue.why_not(state, now=time.monotonic(), settle_seconds=self.pw.settle_seconds,
                               skip_until=self._skip_until.get(film))
        msg = f"queued {film.name}"
        if self._paused:
            msg += "; pre-warm is paused, it runs after `cinecutd resume`"
        elif why is not None:
            msg += f"; it starts once it is no longer {why}" if why != "warm" else ""
        elif job is not None:
            msg += f"; it runs after the current job ({job.film.name})"
        elif not now and not self.pw.window.contains(self._clock()):
            msg += f"; it runs in the window {self.pw.window} (use --now to run it now)"
        log.info("prewarm_requested", film=str(film), now=now, retry=retry)
        return {"message": msg, "film": str(film), "state": "queued", "now": now}

    def pause(self) -> dict[str, Any]:
        self._paused = True
        job = self._job
        log.info("prewarm_paused", current=str(job.film) if job else None)
        if self._remote is not None:
            self._remote.cancel_all("paused")
        if job is not None:
            job.proc.stop("paused")
            return {"message": f"pre-warm paused; {job.film.name} stops after its current frame "
                               "(progress is kept)", "paused": True}
        return {"message": "pre-warm paused", "paused": True}

    def resume(self) -> dict[str, Any]:
        was = self._paused
        self._paused = False
        self._retry_at = 0.0
        if self._blocked is not None and self._blocked[0] != "gpu-build-missing":
            self._blocked = None
        self._queue_dirty = True
        log.info("prewarm_resumed_queue", was_paused=was)
        return {"message": "pre-warm resumed" if was else "pre-warm was not paused", "paused": False}

    def reconfigure(self, config: Config) -> None:
        """SIGHUP: new settings apply to the next job; a closed window or ``enabled = false`` stops the current
        one (at its next tick)."""
        old = self.pw
        old_queue = self.config.queue
        self.config = config
        new = self.pw
        if config.queue != old_queue:
            if self._remote is not None:
                self._remote.cancel_all("the queue was reconfigured")
            self._remote = _remote_dispatch(self) if config.queue.enabled else None
        elif self._remote is not None:
            self._remote.cfg = config.queue
        if new.python != old.python:
            self._offload = None
            if self._probe is not None:
                self._probe.cancel()
                self._probe = None
        if new != old:
            self._blocked, self._retry_at = None, 0.0
            self._queue_dirty = True
            self._log_dir = None
            log.info("prewarm_reconfigured", enabled=new.enabled, window=str(new.window))

    def stop(self, timeout: float) -> None:
        """Daemon shutdown: ask the worker to stop after its frame, wait up to ``timeout``, then kill it."""
        if self._probe is not None:
            self._probe.cancel()
            self._probe = None
        job = self._job
        if job is None:
            return
        job.proc.stop("the daemon is stopping")
        if not job.proc.wait(timeout):
            job.proc.kill(f"did not stop within {timeout:.1f} s")
            job.proc.wait(2.0)
        self._poll_job(job)
        if self._job is job and job.proc.exit is not None:
            self._finish(job, job.proc.exit)

    # ------------------------------------------------------------------------------ status
    def _state(self, queue: list[FilmState], in_window: bool) -> tuple[str, str | None]:
        job = self._job
        if job is not None:
            if job.proc.stop_reason is not None:
                return "stopping", job.proc.stop_reason
            if job.proc.yielded:
                return "yielded", _yield_note(job.proc, "an interactive run has the GPU")
            return "running", job.note
        if not self.enabled:
            return "disabled", None
        if self._paused:
            return "paused", None
        if self._remote is not None:
            r = self._remote.status()
            if not r["connected"]:
                return "queue-unreachable", r["error"]
            return "remote", f"{r['queued']} queued, {len(r['running'])} running on {len(r['workers'])} worker(s)"
        if self._blocked is not None:
            return self._blocked
        if not queue:
            return "idle", None
        if not in_window and not self._runnable(in_window):
            return "waiting-window", None
        return "starting", None

    def status(self) -> dict[str, Any]:
        now = self._clock()
        in_window = self.pw.window.contains(now)
        queue = self._queue() if self.enabled else []
        state, note = self._state(queue, in_window)
        nxt = None if in_window else self.pw.window.next_start(now)
        end = self.pw.window.current_end(now)
        settling = 0
        if self.enabled:
            mono = time.monotonic()
            settling = sum(1 for s in self.engine.reg.films.values()
                           if s.cache != "valid" and s.stamp is not None and not s.settled(mono, self.pw.settle_seconds))
        return {
            "enabled": self.enabled,
            "state": state,
            "note": note,
            "paused": self._paused,
            "window": str(self.pw.window),
            "in_window": in_window,
            "next_window": nxt.isoformat(timespec="seconds") if nxt else None,
            "window_end": end.isoformat(timespec="seconds") if end else None,
            "current": self._job.current() if self._job is not None else None,
            "queue": [str(s.film) for s in queue[:QUEUE_SHOWN]],
            "queued": len(queue),
            "settling": settling,
            "failures": [f.to_dict(p) for p, f in reversed(self._failures.items())],
            "completed": self._completed,
            "frames_described": self._frames_described,
            "outcomes": dict(self._outcomes),
            "gpu_yields": dict(self._gpu_yields),
            "last_success": self._last_success,
            "throughput": self._throughput.status(
                films_left=len(queue) + (self._job is not None), window=self.pw.window),
            "remote": self._remote.status() if self._remote is not None else None,
        }

    def film_status(self, film: str) -> dict[str, Any]:
        path = Path(film)
        state = self.engine.reg.films.get(path)
        out: dict[str, Any] = {"attempts": self._attempts.get(path, 0), "last": self._history.get(path)}
        failure = self._failures.get(path)
        if failure is not None:
            out["failure"] = failure.to_dict(path)
        job = self._job
        if job is not None and job.film == path:
            out["state"] = self._state([], True)[0]
            out["current"] = job.current()
        elif not self.enabled:
            out["state"] = "disabled"
        elif state is None:
            out["state"] = "unknown"
        else:
            why = jobqueue.why_not(state, now=time.monotonic(), settle_seconds=self.pw.settle_seconds,
                                   failure=failure, skip_until=self._skip_until.get(path))
            if why is None:
                queue = self._queue()
                pos = next((i for i, s in enumerate(queue) if s.film == path), None)
                out["state"] = "queued"
                out["position"] = None if pos is None else pos + 1
            else:
                out["state"] = why
        remote = self._remote.film_status(path) if self._remote is not None else None
        if remote is not None:
            out["state"] = remote["state"]  # queued, or running on a worker (named in "remote")
            out["remote"] = remote
        req = self._requests.get(path)
        if req is not None:
            out["requested"] = {"now": req.now}
        return out

    def status_line(self) -> str:
        """One line for ``systemctl status``: what the pre-warm does now."""
        if not self.enabled:
            return "pre-warm disabled"
        job = self._job
        if job is not None:
            name = job.film.stem
            if job.proc.stop_reason is not None:
                return f"pre-warm: stopping {name} ({job.proc.stop_reason})"
            if job.proc.yielded:
                return f"pre-warm: {name} {_yield_note(job.proc, 'yielded the GPU to an interactive run')}"
            if job.total:
                return f"pre-warm: {name} {job.done:,}/{job.total:,} frames, {job.fps:.1f} fps"
            return f"pre-warm: {name} {job.stage or 'starting'}"
        queue = self._queue()
        queued = f", {len(queue):,} queued" if queue else ""
        if self._remote is not None and not self._paused:
            r = self._remote.status()
            return f"pre-warm on {len(r['workers'])} remote worker(s): {len(r['running'])} running{queued}"
        if self._paused:
            return f"pre-warm paused{queued}"
        if self._blocked is not None:
            return f"pre-warm {self._blocked[0]}: {self._blocked[1]}"
        now = self._clock()
        if not self.pw.window.contains(now):
            nxt = self.pw.window.next_start(now)
            return f"pre-warm idle until {nxt:%H:%M}{queued}" if nxt else f"pre-warm idle{queued}"
        return f"pre-warm idle{queued}"


def _yield_note(proc: WorkerProcess, default: str) -> str:
    """What a paused job waits for, as status shows it: ``yielding to <process name>``."""
    if proc.yield_reason == "work_dir":
        return f"waiting for the work dir, held by {proc.yielded_to or 'a pipeline'}"
    if proc.yielded_to:
        return f"yielding to {proc.yielded_to}"
    return default


def _remote_dispatch(sched: PrewarmScheduler) -> Any:
    """The RQ side (imported only with a queue configured: local mode needs neither rq nor redis)."""
    from cinecutd.prewarm.remote import RemoteDispatch

    return RemoteDispatch(sched)


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else default


def _float(value: Any, default: float) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    return default
