"""The daemon's pre-warm scheduler: which film, when, where, and what became of it.

Everything here runs on the daemon's engine thread (hooks, control commands, and ``tick()`` from the
main loop), so there is no locking; nothing here may block either: the worker's output is read without
waiting, the GPU probe is a polled child process, and the only syscalls per tick are a clock read and a
non-blocking pipe read.

The scheduler composes small owners, one per question, and keeps only the control commands and the loop
that asks them in turn:

* :mod:`.backlog`: which film next (the eligible films in order, requests, films still being written);
* :mod:`.gate`: whether a job may run now (enabled, paused, the window, the wait after a problem);
* :mod:`.placement`: where it runs (the setup check, the llama.cpp offload probe, VRAM);
* :mod:`.localjob`: the running local job and what became of it (done, stopped, discarded, failed);
* :mod:`.remote`: the same films as jobs for remote workers, when ``[queue] redis`` is set;
* :mod:`.ledger`: outcomes, failures and totals, local and remote alike;
* :mod:`.report`: status, one film's status, the ``systemctl status`` line.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog

from cinecutd.config import Config, PrewarmConfig
from cinecutd.control import ControlError
from cinecutd.prewarm import report
from cinecutd.prewarm.backlog import Backlog
from cinecutd.prewarm.gate import SETUP_RETRY_S, VRAM_RETRY_S, Gate
from cinecutd.prewarm.joblogs import JobLogs
from cinecutd.prewarm.ledger import Ledger
from cinecutd.prewarm.localjob import LocalJobs, build_worker_argv
from cinecutd.prewarm.placement import PROBING_NOTE, Placement
from cinecutd.prewarm.supervisor import DEFAULT_TIMEOUTS, Timeouts
from cinecutd.prewarm.vram import GpuInfo, query_gpus
from cinecutd.prewarm.writers import open_for_writing
from cinecutd.registry import FilmState

__all__ = ["PrewarmScheduler", "build_worker_argv"]

log = structlog.get_logger("cinecutd")


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
        self._worker_argv = worker_argv or self._default_argv
        self.ledger = Ledger()
        self.gate = Gate(lambda: self.pw, clock)
        self.backlog = Backlog(lambda: engine.reg.films, self.ledger, lambda: self.pw.settle_seconds)
        self.placement = Placement(lambda: self.pw, gpu_query)
        self._logs = JobLogs(lambda: self.config.daemon.state_dir)
        self.local = LocalJobs(engine, self.backlog, self.ledger, self.gate, self._logs, timeouts)
        self.remote = self._remote_dispatch() if config.queue.enabled else None

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
        self.backlog.changed(state.film)
        self.ledger.forgive_changed(state)
        self.local.film_changed(state)
        if self.remote is not None:
            self.remote.on_film_changed(state)

    def on_reconciled(self) -> None:
        self.backlog.mark_dirty()

    # ------------------------------------------------------------------------------ the loop
    def tick(self) -> None:
        """One look at the job and the queue; called every main-loop turn (at most a second apart)."""
        self.local.poll()
        if self.local.job is not None:
            self.local.supervise()
            return
        if self.remote is not None:  # the jobs run on remote workers: keep the queue in step
            wanted = self.runnable(self.gate.in_window()) if self.gate.halted() is None else []
            self.remote.tick(wanted)
            return
        if self.gate.halted() is not None:
            if not self.enabled:
                self.placement.cancel()
            return
        if not self.gate.due():
            return
        self._maybe_start()

    def queue(self) -> list[FilmState]:
        """The films waiting for a pre-warm, in run order (the running one left out)."""
        return self.backlog.ordered(self.local.film)

    def runnable(self, in_window: bool) -> list[FilmState]:
        """What may run now: the whole queue in the window, else only ``--now`` requests."""
        queue = self.queue()
        if in_window:
            return queue
        return [s for s in queue if (r := self.backlog.requested(s.film)) is not None and r.now]

    def _maybe_start(self) -> None:
        candidates = self.runnable(self.gate.in_window())
        if not candidates:
            self.gate.clear("waiting-vram", "starting")
            return
        problem = self.placement.preflight()
        if problem is not None:
            self.gate.block("setup-error", problem, SETUP_RETRY_S)
            return
        decision = self.placement.decide()
        if decision is None:
            self.gate.show("starting", PROBING_NOTE)
            return
        if not decision.run:
            self.gate.block(decision.state, decision.note or decision.state,
                            VRAM_RETRY_S if decision.state == "waiting-vram" else SETUP_RETRY_S)
            if decision.state == "gpu-build-missing":
                self.placement.probe_again()  # a reinstall fixes it without a restart
            return
        for state in candidates:
            if self.backlog.already_warm(state):
                continue
            if open_for_writing(state.film):
                self.backlog.defer_writing(state.film)
                continue
            self.local.start(state, decision, self._worker_argv(state, self.pw))
            return

    def _default_argv(self, state: FilmState, pw: PrewarmConfig) -> list[str]:
        return build_worker_argv(self.placement.python(), state.film, pw)

    def _remote_dispatch(self) -> Any:
        """The RQ side (imported only with a queue configured: local mode needs neither rq nor redis)."""
        from cinecutd.prewarm.remote import RemoteDispatch

        return RemoteDispatch(lambda: self.config, self.engine, self.backlog, self.ledger, self.gate)

    # ------------------------------------------------------------------------------ control commands
    def request(self, film: Path, now: bool = False, retry: bool = False) -> dict[str, Any]:
        """``cinecutd prewarm FILM [--now] [--retry]``."""
        if not self.enabled:
            raise ControlError("prewarm_disabled", "pre-warm is disabled in the daemon's config ([prewarm] enabled)")
        state = self.engine.reg.films.get(film)
        if state is None:
            raise ControlError("not_found", f"no watched film {film}")
        failure = self.ledger.failure(film)
        if failure is not None:
            if not retry:
                raise ControlError("failed", f"the pre-warm of {film} failed: {failure.reason}; "
                                             "retry it with `cinecutd prewarm --retry FILM`")
            self.ledger.forgive(film, "requested")
            self.ledger.end_streak()
            self.gate.end_backoff()
        if state.conflict:
            raise ControlError("conflict", f"{film} shares its work dir with another film of the same stem; "
                                           "rename one of them first")
        if state.refused:
            raise ControlError("refused", f"{film}: {state.refused}")
        job = self.local.job
        if job is not None and job.film == film:
            if now:
                self.local.force(film)
            return {"message": f"already running: {film.name} ({job.done}/{job.total} frames)",
                    "film": str(film), "state": "running"}
        if self.backlog.already_warm(state):
            return {"message": f"already warm: {film.name} has a valid cache", "film": str(film), "state": "warm"}
        self.backlog.request(film, now)
        self.gate.wake()
        why = self.backlog.why_not(state)
        msg = f"queued {film.name}"
        if self.gate.paused:
            msg += "; pre-warm is paused, it runs after `cinecutd resume`"
        elif why is not None:
            msg += f"; it starts once it is no longer {why}" if why != "warm" else ""
        elif job is not None:
            msg += f"; it runs after the current job ({job.film.name})"
        elif not now and not self.gate.in_window():
            msg += f"; it runs in the window {self.pw.window} (use --now to run it now)"
        log.info("prewarm_requested", film=str(film), now=now, retry=retry)
        return {"message": msg, "film": str(film), "state": "queued", "now": now}

    def pause(self) -> dict[str, Any]:
        self.gate.pause()
        job = self.local.job
        log.info("prewarm_paused", current=str(job.film) if job else None)
        if self.remote is not None:
            self.remote.cancel_all("paused")
        if self.local.stop("paused") is not None and job is not None:
            return {"message": f"pre-warm paused; {job.film.name} stops after its current frame "
                               "(progress is kept)", "paused": True}
        return {"message": "pre-warm paused", "paused": True}

    def resume(self) -> dict[str, Any]:
        was = self.gate.resume()
        self.backlog.mark_dirty()
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
            if self.remote is not None:
                self.remote.cancel_all("the queue was reconfigured")
            self.remote = self._remote_dispatch() if config.queue.enabled else None
        if new.python != old.python:
            self.placement.probe_again()
        if new != old:
            self.gate.reset()
            self.backlog.mark_dirty()
            self._logs.forget_dir()
            log.info("prewarm_reconfigured", enabled=new.enabled, window=str(new.window))

    def stop(self, timeout: float) -> None:
        """Daemon shutdown: ask the worker to stop after its frame, wait up to ``timeout``, then kill it."""
        self.placement.cancel()
        self.local.shutdown(timeout)

    # ------------------------------------------------------------------------------ status
    def status(self) -> dict[str, Any]:
        return report.status(self)

    def film_status(self, film: str) -> dict[str, Any]:
        return report.film_status(self, film)

    def status_line(self) -> str:
        """One line for ``systemctl status``: what the pre-warm does now."""
        return report.status_line(self)
