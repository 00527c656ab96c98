"""The coordinator's side of remote pre-warming: the scheduler's films become jobs in an RQ queue.

With ``[queue] redis`` set, the scheduler still decides what to warm (the same eligible films, order,
window, pause and failures as for the local worker); this module puts them in the queue that
``cinecut worker`` processes on GPU hosts take from, and follows each job to its end:

* a job's id is the film and its stamp (:func:`cinecut.remote.protocol.job_id`): a film is never queued
  twice, and a changed film is new work under a new id;
* a film that changed, vanished (renamed), or is no longer wanted (pause, window closed) loses its job:
  a queued one is removed, a running one is asked to stop after its frame (``send_stop_job_command``).
  Correctness never rests on that stop arriving: the worker re-checks the stamp before it commits;
* a running job whose lease key lapsed (its worker died) is queued again; the next worker resumes from
  the partial results in the work dir;
* Redis going away loses nothing the filesystem holds: after reconnecting, each tracked job is looked
  up, a job Redis forgot is queued again (unless its lease shows a worker still on it), and a film whose
  cache is already on disk is done.

Everything runs on the engine thread, in short Redis round trips at most every ``POLL_S``; a Redis that
does not answer costs one connect timeout per backoff step, never a hang.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import structlog

from cinecut.remote import protocol
from cinecut.stamp import SourceStamp
from cinecutd.prewarm.jobqueue import Failure
from cinecutd.prewarm.writers import open_for_writing

if TYPE_CHECKING:
    from cinecutd.prewarm.scheduler import PrewarmScheduler
    from cinecutd.registry import FilmState

log = structlog.get_logger("cinecutd")

POLL_S: Final = 0.5
#: A running job without a lease for this long has lost its worker (the lease itself is the worker's TTL).
LEASE_GRACE_S: Final = 2.0
#: A stop that did not end the job within this long is given up on (the worker's own stamp check stands).
STOP_GIVE_UP_S: Final = 600.0
MAX_BACKOFF_S: Final = 30.0
#: A worker that keeps finding another stamp than ours (clock or filesystem skew) fails the film after this.
MAX_STALE: Final = 3
CONNECT_TIMEOUT_S: Final = 2.0
#: New films offered per tick: a first connection with thousands of cold films fills the queue over a few
#: seconds instead of holding the engine thread for one long burst of disk and Redis round trips.
MAX_OFFERS_PER_TICK: Final = 100


@dataclass(slots=True)
class RemoteJob:
    film: Path
    stamp: SourceStamp
    job_id: str
    enqueued_at: float = field(default_factory=time.time)
    status: str = "queued"
    lease: dict[str, Any] | None = None
    no_lease_since: float | None = None
    requeues: int = 0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"film": str(self.film), "job_id": self.job_id, "state": self.status,
                               "enqueued_at": self.enqueued_at, "requeues": self.requeues}
        if self.lease:
            out.update(worker=self.lease.get("worker"), host=self.lease.get("host"),
                       done=self.lease.get("done"), total=self.lease.get("total"), fps=self.lease.get("fps"),
                       stage=self.lease.get("state"))
        return out


class RemoteDispatch:
    """Keeps the RQ queue in step with the scheduler's wish list; one per scheduler while a queue is set."""

    def __init__(self, sched: PrewarmScheduler) -> None:
        self.sched = sched
        self.cfg = sched.config.queue
        self._conn: Any = None
        self._queue: Any = None
        self._connected = False
        self._next_try = 0.0
        self._backoff = 0.5
        self._next_poll = 0.0
        self._jobs: dict[Path, RemoteJob] = {}
        self._stopping: dict[str, tuple[Path, float]] = {}
        self._stale: dict[Path, int] = {}
        self._last_error: str | None = None
        self._workers: list[dict[str, Any]] = []
        self.enqueued = 0
        self.requeued = 0

    # ------------------------------------------------------------------------------ connection
    def _ensure(self) -> bool:
        if self._connected:
            return True
        now = time.monotonic()
        if now < self._next_try:
            return False
        try:
            if self._conn is None:
                from rq import Queue

                self._conn = protocol.connect(self.cfg.redis, self.cfg.password_file, timeout=CONNECT_TIMEOUT_S)
                self._queue = Queue(protocol.QUEUE_NAME, connection=self._conn, serializer=protocol.serializer())
            self._conn.ping()
        except Exception as exc:
            self._lost(exc)
            return False
        self._connected, self._backoff, self._last_error = True, 0.5, None
        log.info("queue_connected", redis=protocol.redact(self.cfg.redis), tracked=len(self._jobs))
        return True

    def _lost(self, exc: BaseException) -> None:
        why = f"{type(exc).__name__}: {exc}"
        if self._connected or self._last_error != why:
            log.warning("queue_unreachable", redis=protocol.redact(self.cfg.redis), reason=why,
                        retry_s=self._backoff)
        self._connected, self._last_error = False, why
        self._next_try = time.monotonic() + self._backoff
        self._backoff = min(MAX_BACKOFF_S, self._backoff * 2)

    # ------------------------------------------------------------------------------ hooks
    def on_film_changed(self, state: FilmState) -> None:
        rj = self._jobs.get(state.film)
        if rj is not None and rj.stamp != state.stamp:
            self._next_poll = 0.0  # act on the next tick, not in the middle of the engine's event

    def tick(self, wanted: list[FilmState]) -> None:
        """``wanted``: the films the scheduler would warm now (eligible, in order, in the window)."""
        now = time.monotonic()
        if now < self._next_poll:
            return
        self._next_poll = now + POLL_S
        if not self._ensure():
            return
        try:
            self._step(wanted)
        except Exception as exc:
            from redis.exceptions import RedisError

            if not isinstance(exc, RedisError):
                raise
            self._lost(exc)

    # ------------------------------------------------------------------------------ one step
    def _step(self, wanted: list[FilmState]) -> None:
        films = self.sched.engine.reg.films
        want = {s.film: s for s in wanted}
        for film, rj in list(self._jobs.items()):
            state = films.get(film)
            if state is None:
                self._cancel(rj, "the film is gone")
            elif state.stamp != rj.stamp:
                self._cancel(rj, "the film changed")
            elif film not in want and state.cache != "valid":
                self._cancel(rj, self._why_unwanted(state))
        self._poll()
        self._reap_stopping()
        offered = 0
        for state in wanted:
            if offered >= MAX_OFFERS_PER_TICK:
                self._next_poll = 0.0  # more next tick
                break
            if state.film not in self._jobs and state.stamp is not None:
                self._offer(state)
                offered += 1
        self._read_workers()

    def _why_unwanted(self, state: FilmState) -> str:
        s = self.sched
        if not s.enabled:
            return "pre-warm was disabled"
        if s._paused:
            return "paused"
        if state.pending:
            return "its inputs changed and the invalidation waits for the work dir"
        if not s.pw.window.contains(s._clock()):
            return "the window closed"
        return "no longer eligible"

    def _offer(self, state: FilmState) -> None:
        if any(f == state.film for f, _ in self._stopping.values()):
            return  # its old job still holds the work dir: queue the new one once that has ended
        if self.sched._already_warm(state):
            return
        assert state.stamp is not None
        if open_for_writing(state.film):
            self.sched._skip_until[state.film] = time.monotonic() + 30.0
            self.sched._queue_dirty = True
            return
        root = self._root_of(state.film)
        if root is None:
            return
        payload = protocol.Payload(str(state.film), root, state.stamp, self.sched.pw.vibe or None)
        rj = RemoteJob(state.film, state.stamp, payload.id)
        status = self._status_of(rj.job_id)
        if status in ("queued", "started", "deferred", "scheduled"):
            rj.status = status  # ours already (a coordinator restart, a reconnect): adopt it, never twice
            log.info("prewarm_adopted", film=str(state.film), job_id=rj.job_id, status=status)
        elif status in ("finished", "failed", "stopped", "canceled"):
            self._jobs[state.film] = rj
            self._settle(rj, status)
            return
        else:
            self._enqueue(payload, front=state.film in self.sched._requests)
            log.info("prewarm_enqueued", film=str(state.film), job_id=rj.job_id, root=root)
        self._jobs[state.film] = rj
        self.sched._attempts[state.film] = self.sched._attempts.get(state.film, 0) + 1

    def _enqueue(self, payload: protocol.Payload, *, front: bool = False) -> None:
        """``front``: a film someone asked for (``cinecutd prewarm FILM``) goes before the night's backlog."""
        self._queue.enqueue_call(protocol.JOB_FUNC, args=(payload.to_json(),), job_id=payload.id, timeout=-1,
                                 result_ttl=protocol.RESULT_TTL_S, failure_ttl=protocol.RESULT_TTL_S,
                                 description=f"prewarm {Path(payload.film).name}", at_front=front)
        self.enqueued += 1

    def _root_of(self, film: Path) -> str | None:
        for lib in self.sched.config.libraries:
            root = lib.path
            if root == film or root in film.parents:
                return str(root)
        return None

    def _status_of(self, jid: str) -> str | None:
        from rq.job import Job

        raw = self._conn.hget(Job.key_for(jid), "status")
        return raw.decode() if raw else None

    # ------------------------------------------------------------------------------ following jobs
    def _poll(self) -> None:
        if not self._jobs:
            return
        from rq.job import Job

        jobs = list(self._jobs.values())
        with self._conn.pipeline(transaction=False) as p:
            for rj in jobs:
                p.hget(Job.key_for(rj.job_id), "status")
                p.get(protocol.lease_key(rj.job_id))
            replies = p.execute()
        now = time.monotonic()
        for i, rj in enumerate(jobs):
            raw_status, raw_lease = replies[2 * i], replies[2 * i + 1]
            status = raw_status.decode() if raw_status else None
            rj.lease = _json(raw_lease)
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
                self._settle(rj, status)

    def _forgotten(self, rj: RemoteJob) -> None:
        state = self.sched.engine.reg.films.get(rj.film)
        del self._jobs[rj.film]
        if state is not None and self.sched._already_warm(state):
            self._warm(rj, state, {"frames_computed": 0}, "found warm on disk after Redis lost the job")
            return
        log.info("prewarm_requeued", film=str(rj.film), job_id=rj.job_id, reason="Redis no longer knew the job")
        self.requeued += 1
        self.sched._queue_dirty = True  # offered again below, under the same id

    def _requeue(self, rj: RemoteJob, why: str) -> None:
        from rq.job import Job

        try:
            job = Job.fetch(rj.job_id, connection=self._conn, serializer=protocol.serializer())
            args = job.args
            job.delete()
        except Exception:
            args = None
        if not args:
            del self._jobs[rj.film]
            return
        payload = protocol.Payload.from_json(args[0])
        self._enqueue(payload, front=True)  # it had its turn already
        rj.status, rj.no_lease_since, rj.lease = "queued", None, None
        rj.requeues += 1
        self.requeued += 1
        log.warning("prewarm_requeued", film=str(rj.film), job_id=rj.job_id, reason=why)

    def _settle(self, rj: RemoteJob, status: str) -> None:
        """A job that ended: read its outcome, remove it from Redis, and act on it."""
        from rq.job import Job

        self._jobs.pop(rj.film, None)
        result: dict[str, Any] = {}
        try:
            job = Job.fetch(rj.job_id, connection=self._conn, serializer=protocol.serializer())
            if status == "finished":
                value = job.return_value()
                result = value if isinstance(value, dict) else {}
            else:
                result = {"outcome": "stopped" if status in ("stopped", "canceled") else "failed",
                          "reason": _last_line(job.exc_info) or status}
            job.delete()
        except Exception as exc:
            from redis.exceptions import RedisError

            if isinstance(exc, RedisError):
                raise
            result = {"outcome": "failed", "reason": f"unreadable job: {exc}"}
        state = self.sched.engine.reg.films.get(rj.film)
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
        self._history(rj.film, record)

    def _warm(self, rj: RemoteJob, state: FilmState, result: dict[str, Any], note: str | None) -> None:
        s = self.sched
        s.engine.revalidate(state, "prewarmed")
        if state.cache != "valid":
            s._already_warm(state)
        frames = _int(result.get("frames"))
        computed = _int(result.get("frames_computed"))
        record = {"outcome": "done" if state.cache == "valid" else "failed", "at": time.time(), "remote": True,
                  "worker": result.get("worker"), "host": result.get("host"), "job_id": rj.job_id,
                  "frames": frames, "frames_computed": computed, "frames_salvaged": _int(result.get("frames_salvaged")),
                  "cache_hit": bool(result.get("cache_hit")), "duration_s": result.get("duration_s")}
        if note:
            record["note"] = note
        if state.cache == "valid":
            s._completed += 1
            s._consecutive_failures = 0
            s._failures.pop(rj.film, None)
            s._requests.pop(rj.film, None)
            self._stale.pop(rj.film, None)
            state.cache_records = frames or state.cache_records
            duration = result.get("duration_s")
            if computed and isinstance(duration, int | float) and duration > 0:
                s._throughput.record(str(rj.film), computed / duration, frames, time.time())
            log.info("prewarm_done", film=str(rj.film), frames=frames, frames_computed=computed,
                     worker=result.get("worker"), host=result.get("host"), duration_s=duration, remote=True)
        else:
            self._failed(rj, state, "the worker reported success but left no valid cache")
            record["reason"] = "the worker reported success but left no valid cache"
        self._history(rj.film, record)

    def _failed(self, rj: RemoteJob, state: FilmState, reason: str) -> None:
        from cinecutd.prewarm.scheduler import subtitle_stamps

        s = self.sched
        s._failures[rj.film] = Failure(reason, time.time(), rj.stamp, subtitle_stamps(state), None)
        s._requests.pop(rj.film, None)
        s._queue_dirty = True
        self._stale.pop(rj.film, None)
        log.error("prewarm_failed", film=str(rj.film), reason=reason, remote=True)

    def _history(self, film: Path, record: dict[str, Any]) -> None:
        h = self.sched._history
        h[film] = record
        h.move_to_end(film)
        self.sched._queue_dirty = True

    # ------------------------------------------------------------------------------ cancelling
    def _cancel(self, rj: RemoteJob, why: str) -> None:
        from rq.command import send_stop_job_command
        from rq.job import Job

        del self._jobs[rj.film]
        self.sched._queue_dirty = True
        status = self._status_of(rj.job_id)
        if status == "started":
            try:
                send_stop_job_command(self._conn, rj.job_id, serializer=protocol.serializer())
                self._stopping[rj.job_id] = (rj.film, time.monotonic())
                log.info("prewarm_stopping", film=str(rj.film), job_id=rj.job_id, reason=why, remote=True)
                return
            except Exception as exc:
                from redis.exceptions import RedisError

                if isinstance(exc, RedisError):
                    raise
        try:
            Job.fetch(rj.job_id, connection=self._conn, serializer=protocol.serializer()).delete()
        except Exception as exc:
            from redis.exceptions import RedisError

            if isinstance(exc, RedisError):
                raise
        log.info("prewarm_dequeued", film=str(rj.film), job_id=rj.job_id, reason=why)

    def _reap_stopping(self) -> None:
        """Stopped jobs are removed from Redis once they have ended (so the same id can be queued again)."""
        from rq.job import Job

        now = time.monotonic()
        for jid, (film, since) in list(self._stopping.items()):
            status = self._status_of(jid)
            if status == "started" and now - since < STOP_GIVE_UP_S:
                continue
            del self._stopping[jid]
            if status is not None:
                try:
                    Job.fetch(jid, connection=self._conn, serializer=protocol.serializer()).delete()
                except Exception as exc:
                    from redis.exceptions import RedisError

                    if isinstance(exc, RedisError):
                        raise
            log.info("prewarm_stopped", film=str(film), job_id=jid, remote=True)

    def cancel_all(self, why: str) -> None:
        """Pause, disable, reconfigure: queued jobs are removed, running ones stopped after their frame."""
        if not self._ensure():
            return
        try:
            for rj in list(self._jobs.values()):
                self._cancel(rj, why)
        except Exception as exc:
            from redis.exceptions import RedisError

            if not isinstance(exc, RedisError):
                raise
            self._lost(exc)

    # ------------------------------------------------------------------------------ status
    def _read_workers(self) -> None:
        names = sorted(n.decode() if isinstance(n, bytes) else str(n) for n in self._conn.smembers(protocol.WORKERS_SET))
        if not names:
            self._workers = []
            return
        values = self._conn.mget([protocol.worker_key(n) for n in names])
        workers = []
        gone = []
        for name, raw in zip(names, values, strict=True):
            info = _json(raw)
            if info is None:
                gone.append(name)
                continue
            workers.append(info)
        if gone:
            self._conn.srem(protocol.WORKERS_SET, *gone)
        self._workers = workers

    def status(self) -> dict[str, Any]:
        jobs = sorted(self._jobs.values(), key=lambda j: (j.status != "running", j.enqueued_at))
        return {
            "redis": protocol.redact(self.cfg.redis),
            "connected": self._connected,
            "error": self._last_error,
            "queued": sum(1 for j in jobs if j.status == "queued"),
            "running": [j.to_dict() for j in jobs if j.status == "running"],
            "stopping": len(self._stopping),
            "enqueued": self.enqueued,
            "requeued": self.requeued,
            "workers": [
                {"name": w.get("name"), "host": w.get("host"), "state": w.get("state"), "film": w.get("film"),
                 "done": w.get("done"), "total": w.get("total"), "fps": w.get("fps"), "last_seen": w.get("last_seen")}
                for w in self._workers
            ],
        }

    def film_status(self, film: Path) -> dict[str, Any] | None:
        rj = self._jobs.get(film)
        return rj.to_dict() if rj is not None else None


def _json(raw: Any) -> dict[str, Any] | None:
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except (ValueError, TypeError):
        return None
    return value if isinstance(value, dict) else None


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _last_line(text: Any) -> str | None:
    if not text:
        return None
    lines = [ln for ln in str(text).strip().splitlines() if ln.strip()]
    return lines[-1][:500] if lines else None


def dropin_lines(cfg: Any) -> list[str]:
    """What the hardened unit (PrivateNetwork=yes, IPAddressDeny=any, AF_UNIX only) needs to reach Redis:
    the host's network and packets to and from Redis's address only (resolved now: a host name that later
    moves needs the drop-in regenerated)."""
    import ipaddress
    import socket
    from urllib.parse import urlparse

    if not cfg.redis:
        return []
    url = urlparse(cfg.redis)
    if url.scheme == "unix":
        return ["# [queue] redis is a Unix socket: no network needed."]
    host = url.hostname or "localhost"
    try:
        addrs = sorted({ipaddress.ip_address(host)})
    except ValueError:
        try:
            addrs = sorted({ipaddress.ip_address(ai[4][0]) for ai in socket.getaddrinfo(host, url.port or 6379)},
                           key=str)
        except OSError:
            addrs = []
    if not addrs:
        return [f"# [queue] redis host {host} does not resolve: the unit cannot reach it until it does."]
    families = sorted({"AF_INET6" if a.version == 6 else "AF_INET" for a in addrs})
    allowed = " ".join("localhost" if a.is_loopback else str(a) for a in addrs)
    return [
        f"# [queue] redis = {protocol.redact(cfg.redis)}: the coordinator needs the host's network (the unit has",
        "# none), reaching Redis's address only (IPAddressDeny=any stays).",
        "PrivateNetwork=no",
        f"RestrictAddressFamilies=AF_UNIX {' '.join(families)}",
        f"IPAddressAllow={allowed}",
    ]
