"""Following queued jobs to their end: rq's status and the worker's lease, read in one pipelined round trip
per poll, and what became of each job recorded exactly as a local job's end is (:mod:`.ledger`).

* a running job whose lease key lapsed (its worker died) is queued again, at the front; the next worker
  resumes from the partial results in the work dir;
* a job Redis forgot (a restart without persistence) is queued again, unless its lease shows a worker
  still on it, or the film's cache is already on disk (then it is done);
* a worker that keeps finding another version of the film than ours (clock or filesystem skew) fails the
  film after ``MAX_STALE`` tries instead of bouncing it between hosts forever.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Final

import structlog

from cinecut.inference.cache import CacheState
from cinecut.remote import protocol
from cinecutd.prewarm.backlog import Backlog
from cinecutd.prewarm.jobqueue import Failure
from cinecutd.prewarm.ledger import Ledger, subtitle_stamps
from cinecutd.prewarm.remote_enqueue import RemoteJob
from cinecutd.prewarm.remote_link import RedisLink, is_redis_error, json_object
from cinecutd.registry import FilmState
from cinecutd.states import Trigger

log = structlog.get_logger("cinecutd")

#: A running job without a lease for this long has lost its worker (the lease itself is the worker's TTL).
LEASE_GRACE_S: Final = 2.0
#: A worker that keeps finding another stamp than ours (clock or filesystem skew) fails the film after this.
MAX_STALE: Final = 3
NO_CACHE: Final = "the worker reported success but left no valid cache"


class LeaseWatch:
    """Polls the followed jobs (``jobs``, the dispatch's table) and settles the ones that ended."""

    def __init__(self, link: RedisLink, jobs: dict[Path, RemoteJob], engine: Any, backlog: Backlog,
                 ledger: Ledger) -> None:
        self._link = link
        self._jobs = jobs
        self._engine = engine
        self._backlog = backlog
        self._ledger = ledger
        self._stale: dict[Path, int] = {}
        self.requeued = 0

    def poll(self) -> None:
        if not self._jobs:
            return
        from rq.job import Job

        jobs = list(self._jobs.values())
        with self._link.conn.pipeline(transaction=False) as p:
            for rj in jobs:
                p.hget(Job.key_for(rj.job_id), "status")
                p.get(protocol.lease_key(rj.job_id))
            replies = p.execute()
        now = time.monotonic()
        for i, rj in enumerate(jobs):
            raw_status, raw_lease = replies[2 * i], replies[2 * i + 1]
            status = raw_status.decode() if raw_status else None
            rj.lease = json_object(raw_lease)
            if status is None:
                if rj.lease is not None:
                    rj.status = "running"  # Redis forgot the job (restart) but a worker is on it
                    continue
                self._forgotten(rj)
            elif status == "started":
                rj.status = "running"
                if rj.lease is not None:
                    rj.no_lease_since = None
                elif rj.no_lease_since is None:
                    rj.no_lease_since = now
                elif now - rj.no_lease_since >= LEASE_GRACE_S:
                    self._requeue(rj, "the worker's lease lapsed (it died or lost Redis)")
            elif status in ("queued", "deferred", "scheduled"):
                rj.status = "queued"
            else:
                self.settle(rj, status)

    def _forgotten(self, rj: RemoteJob) -> None:
        state = self._engine.reg.films.get(rj.film)
        del self._jobs[rj.film]
        if state is not None and self._backlog.already_warm(state):
            self._warm(rj, state, {"frames_computed": 0}, "found warm on disk after Redis lost the job")
            return
        log.info("prewarm_requeued", film=str(rj.film), job_id=rj.job_id, reason="Redis no longer knew the job")
        self.requeued += 1
        self._backlog.mark_dirty()  # offered again, under the same id

    def _requeue(self, rj: RemoteJob, why: str) -> None:
        try:
            job = self._link.fetch(rj.job_id)
            args = job.args
            job.delete()
        except Exception:
            args = None
        if not args:
            del self._jobs[rj.film]
            return
        payload = protocol.Payload.from_json(args[0])
        self._link.enqueue(payload, front=True)  # it had its turn already
        rj.status, rj.no_lease_since, rj.lease = "queued", None, None
        rj.requeues += 1
        self.requeued += 1
        log.warning("prewarm_requeued", film=str(rj.film), job_id=rj.job_id, reason=why)

    # ------------------------------------------------------------------------------ what became of it
    def settle(self, rj: RemoteJob, status: str) -> None:
        """A job that ended: read its outcome, remove it from Redis, and act on it (it is forgotten only
        once Redis has answered, so a failed round trip leaves it to the next poll)."""
        result: dict[str, Any] = {}
        try:
            job = self._link.fetch(rj.job_id)
            if status == "finished":
                value = job.return_value()
                result = value if isinstance(value, dict) else {}
            else:
                result = {"outcome": "stopped" if status in ("stopped", "canceled") else "failed",
                          "reason": _last_line(job.exc_info) or status}
            job.delete()
        except Exception as exc:
            if is_redis_error(exc):
                raise
            result = {"outcome": "failed", "reason": f"unreadable job: {exc}"}
        self._jobs.pop(rj.film, None)
        state = self._engine.reg.films.get(rj.film)
        outcome = str(result.get("outcome") or "failed")
        record = {"outcome": outcome, "at": time.time(), "worker": result.get("worker"), "host": result.get("host"),
                  "duration_s": result.get("duration_s"), "remote": True, "job_id": rj.job_id}
        if result.get("reason"):
            record["reason"] = result["reason"]
        if state is None or state.stamp != rj.stamp:
            record["outcome"] = "discarded" if outcome == "done" else outcome
        elif outcome == "done":
            self._warm(rj, state, result, None)
            return
        elif outcome in ("stale", "discarded"):
            n = self._stale[rj.film] = self._stale.get(rj.film, 0) + 1
            if n >= MAX_STALE:
                self._failed(rj, state, f"workers keep seeing another version of the film ({result.get('reason')})")
        elif outcome in ("failed", "refused"):
            self._failed(rj, state, f"{result.get('worker') or 'a worker'}: {result.get('reason') or outcome}")
        log.info("prewarm_" + ("stopped" if outcome == "stopped" else "ended"), film=str(rj.film), outcome=outcome,
                 reason=result.get("reason"), worker=result.get("worker"))
        self._record(rj.film, record)

    def _warm(self, rj: RemoteJob, state: FilmState, result: dict[str, Any], note: str | None) -> None:
        self._engine.revalidate(state, Trigger.PREWARMED)
        if state.cache != CacheState.VALID:
            self._backlog.already_warm(state)
        frames = _int(result.get("frames"))
        computed = _int(result.get("frames_computed"))
        record = {"outcome": "done" if state.cache == CacheState.VALID else "failed", "at": time.time(), "remote": True,
                  "worker": result.get("worker"), "host": result.get("host"), "job_id": rj.job_id,
                  "frames": frames, "frames_computed": computed, "frames_salvaged": _int(result.get("frames_salvaged")),
                  "cache_hit": bool(result.get("cache_hit")), "duration_s": result.get("duration_s")}
        if note:
            record["note"] = note
        if state.cache == CacheState.VALID:
            self._ledger.succeeded(rj.film, time.time())
            self._ledger.count_frames(computed)
            self._backlog.drop_request(rj.film)
            self._stale.pop(rj.film, None)
            state.cache_records = frames or state.cache_records
            duration = result.get("duration_s")
            if computed and isinstance(duration, int | float) and duration > 0:
                self._ledger.measured(rj.film, computed / duration, frames, time.time())
            log.info("prewarm_done", film=str(rj.film), frames=frames, frames_computed=computed,
                     worker=result.get("worker"), host=result.get("host"), duration_s=duration, remote=True)
        else:
            self._failed(rj, state, NO_CACHE)
            record["reason"] = NO_CACHE
        self._record(rj.film, record)

    def _failed(self, rj: RemoteJob, state: FilmState, reason: str) -> None:
        # Not a failure in a row of this host's setup: the backoff is the local worker's.
        self._ledger.fail(rj.film, Failure(reason, time.time(), rj.stamp, subtitle_stamps(state), None),
                          in_a_row=False)
        self._backlog.drop_request(rj.film)
        self._backlog.mark_dirty()
        self._stale.pop(rj.film, None)
        log.error("prewarm_failed", film=str(rj.film), reason=reason, remote=True)

    def _record(self, film: Path, record: dict[str, Any]) -> None:
        self._ledger.record(film, record)
        self._backlog.mark_dirty()


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _last_line(text: Any) -> str | None:
    if not text:
        return None
    lines = [ln for ln in str(text).strip().splitlines() if ln.strip()]
    return lines[-1][:500] if lines else None
