"""What the pre-warm shows: ``cinecutd status`` (its ``prewarm`` part), one film's pre-warm state, and
the one line ``systemctl status`` prints.

Pure reads of the scheduler's owners (the gate, the backlog, the local job, the ledger, the remote queue):
nothing here changes what runs, so status can be asked as often as anyone likes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from cinecut.inference.cache import CacheState
from cinecutd.prewarm.yields import yield_note
from cinecutd.registry import FilmState

if TYPE_CHECKING:
    from cinecutd.prewarm.scheduler import PrewarmScheduler

QUEUE_SHOWN: Final = 100


def state_of(sched: PrewarmScheduler, queue: list[FilmState], in_window: bool) -> tuple[str, str | None]:
    """The scheduler's state and a note (why it waits, where the job runs)."""
    job = sched.local.job
    if job is not None:
        if job.proc.stop_reason is not None:
            return "stopping", job.proc.stop_reason
        if job.proc.yielded:
            return "yielded", yield_note(job.proc, "an interactive run has the GPU")
        return "running", job.note
    if not sched.enabled:
        return "disabled", None
    if sched.gate.paused:
        return "paused", None
    if sched.remote is not None:
        r = sched.remote.status()
        if not r["connected"]:
            return "queue-unreachable", r["error"]
        return "remote", f"{r['queued']} queued, {len(r['running'])} running on {len(r['workers'])} worker(s)"
    if sched.gate.blocked is not None:
        return sched.gate.blocked
    if not queue:
        return "idle", None
    if not in_window and not sched.runnable(in_window):
        return "waiting-window", None
    return "starting", None


def status(sched: PrewarmScheduler) -> dict[str, Any]:
    """The ``prewarm`` part of ``cinecutd status --json`` (and what the metrics read)."""
    pw, ledger, job = sched.pw, sched.ledger, sched.local.job
    now = sched.gate.clock()
    in_window = sched.gate.in_window(now)
    queue = sched.queue() if sched.enabled else []
    state, note = state_of(sched, queue, in_window)
    nxt = None if in_window else pw.window.next_start(now)
    end = pw.window.current_end(now)
    settling = 0
    if sched.enabled:
        mono = time.monotonic()
        settling = sum(1 for s in sched.engine.reg.films.values()
                       if s.cache != CacheState.VALID and s.stamp is not None and not s.settled(mono, pw.settle_seconds))
    return {
        "enabled": sched.enabled,
        "state": state,
        "note": note,
        "paused": sched.gate.paused,
        "window": str(pw.window),
        "in_window": in_window,
        "next_window": nxt.isoformat(timespec="seconds") if nxt else None,
        "window_end": end.isoformat(timespec="seconds") if end else None,
        "current": job.current() if job is not None else None,
        "queue": [str(s.film) for s in queue[:QUEUE_SHOWN]],
        "queued": len(queue),
        "settling": settling,
        "failures": ledger.failures(),
        "completed": ledger.completed,
        "frames_described": ledger.frames_described,
        "outcomes": dict(ledger.outcomes),
        "gpu_yields": dict(ledger.gpu_yields),
        "last_success": ledger.last_success,
        "throughput": ledger.throughput.status(films_left=len(queue) + (job is not None), window=pw.window),
        "remote": sched.remote.status() if sched.remote is not None else None,
    }


def film_status(sched: PrewarmScheduler, film: str) -> dict[str, Any]:
    """One film's pre-warm: its state (queued and where, running, why it waits), attempts, last outcome."""
    path = Path(film)
    state = sched.engine.reg.films.get(path)
    out: dict[str, Any] = {"attempts": sched.ledger.attempts(path), "last": sched.ledger.last(path)}
    failure = sched.ledger.failure(path)
    if failure is not None:
        out["failure"] = failure.to_dict(path)
    job = sched.local.job
    if job is not None and job.film == path:
        out["state"] = state_of(sched, [], True)[0]
        out["current"] = job.current()
    elif not sched.enabled:
        out["state"] = "disabled"
    elif state is None:
        out["state"] = "unknown"
    else:
        why = sched.backlog.why_not(state)
        if why is None:
            queue = sched.queue()
            pos = next((i for i, s in enumerate(queue) if s.film == path), None)
            out["state"] = "queued"
            out["position"] = None if pos is None else pos + 1
        else:
            out["state"] = why
    remote = sched.remote.film_status(path) if sched.remote is not None else None
    if remote is not None:
        out["state"] = remote["state"]  # queued, or running on a worker (named in "remote")
        out["remote"] = remote
    req = sched.backlog.requested(path)
    if req is not None:
        out["requested"] = {"now": req.now}
    return out


def status_line(sched: PrewarmScheduler) -> str:
    """One line for ``systemctl status``: what the pre-warm does now."""
    if not sched.enabled:
        return "pre-warm disabled"
    job = sched.local.job
    if job is not None:
        name = job.film.stem
        if job.proc.stop_reason is not None:
            return f"pre-warm: stopping {name} ({job.proc.stop_reason})"
        if job.proc.yielded:
            return f"pre-warm: {name} {yield_note(job.proc, 'yielded the GPU to an interactive run')}"
        if job.total:
            return f"pre-warm: {name} {job.done:,}/{job.total:,} frames, {job.fps:.1f} fps"
        return f"pre-warm: {name} {job.stage or 'starting'}"
    queue = sched.queue()
    queued = f", {len(queue):,} queued" if queue else ""
    paused = sched.gate.paused
    if sched.remote is not None and not paused:
        r = sched.remote.status()
        return f"pre-warm on {len(r['workers'])} remote worker(s): {len(r['running'])} running{queued}"
    if paused:
        return f"pre-warm paused{queued}"
    if sched.gate.blocked is not None:
        return f"pre-warm {sched.gate.blocked[0]}: {sched.gate.blocked[1]}"
    now = sched.gate.clock()
    if not sched.gate.in_window(now):
        nxt = sched.pw.window.next_start(now)
        return f"pre-warm idle until {nxt:%H:%M}{queued}" if nxt else f"pre-warm idle{queued}"
    return f"pre-warm idle{queued}"
