"""The coordinator's connection to Redis, and the few job-level round trips remote pre-warming makes.

Connecting is lazy and backs off (doubling up to ``MAX_BACKOFF_S``) while Redis is away, so a Redis that
does not answer costs one connect timeout per backoff step on the engine thread, never a hang. The caller
reports a lost connection (``lost``) when a round trip raises ``RedisError``; any other error of rq (a job
it cannot read) is the job's problem, not the connection's, and is swallowed where noted.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Final

import structlog

from cinecut.remote import protocol
from cinecutd.config import QueueConfig

log = structlog.get_logger("cinecutd")

MAX_BACKOFF_S: Final = 30.0
CONNECT_TIMEOUT_S: Final = 2.0


def json_object(raw: Any) -> dict[str, Any] | None:
    """A JSON object a worker wrote (a lease, a heartbeat); None for anything else or nothing."""
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except (ValueError, TypeError):
        return None
    return value if isinstance(value, dict) else None


def is_redis_error(exc: BaseException) -> bool:
    """A lost or failing connection (as opposed to a job rq cannot read)."""
    from redis.exceptions import RedisError

    return isinstance(exc, RedisError)


class RedisLink:
    """One connection and RQ queue per queue config; engine thread only."""

    def __init__(self, cfg: QueueConfig) -> None:
        self.cfg = cfg
        self._conn: Any = None
        self._queue: Any = None
        self._connected = False
        self._next_try = 0.0
        self._backoff = 0.5
        self.last_error: str | None = None
        self.enqueued = 0

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def conn(self) -> Any:
        """The Redis client, for pipelined reads (only after ``ensure`` said True)."""
        return self._conn

    def ensure(self, *, tracked: int = 0) -> bool:
        """Connected now? Tries (again) once the backoff has run out; ``tracked`` is only logged."""
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
            self.lost(exc)
            return False
        self._connected, self._backoff, self.last_error = True, 0.5, None
        log.info("queue_connected", redis=protocol.redact(self.cfg.redis), tracked=tracked)
        return True

    def lost(self, exc: BaseException) -> None:
        """A round trip failed: disconnected until the next try (logged once per new reason)."""
        why = f"{type(exc).__name__}: {exc}"
        if self._connected or self.last_error != why:
            log.warning("queue_unreachable", redis=protocol.redact(self.cfg.redis), reason=why,
                        retry_s=self._backoff)
        self._connected, self.last_error = False, why
        self._next_try = time.monotonic() + self._backoff
        self._backoff = min(MAX_BACKOFF_S, self._backoff * 2)

    # ------------------------------------------------------------------------------ jobs
    def status_of(self, jid: str) -> str | None:
        """rq's status of job ``jid`` (None: Redis does not know it)."""
        from rq.job import Job

        raw = self._conn.hget(Job.key_for(jid), "status")
        return raw.decode() if raw else None

    def fetch(self, jid: str) -> Any:
        from rq.job import Job

        return Job.fetch(jid, connection=self._conn, serializer=protocol.serializer())

    def delete(self, jid: str) -> None:
        """Remove job ``jid`` from Redis (so its id can be queued again); an unreadable job is skipped."""
        try:
            self.fetch(jid).delete()
        except Exception as exc:
            if is_redis_error(exc):
                raise

    def enqueue(self, payload: protocol.Payload, *, front: bool = False) -> None:
        """``front``: a film someone asked for (``cinecutd prewarm FILM``) goes before the night's backlog."""
        self._queue.enqueue_call(protocol.JOB_FUNC, args=(payload.to_json(),), job_id=payload.id, timeout=-1,
                                 result_ttl=protocol.RESULT_TTL_S, failure_ttl=protocol.RESULT_TTL_S,
                                 description=f"prewarm {Path(payload.film).name}", at_front=front)
        self.enqueued += 1

    def stop(self, jid: str) -> bool:
        """Ask the worker running ``jid`` to stop after its frame; False if rq could not send it."""
        from rq.command import send_stop_job_command

        try:
            send_stop_job_command(self._conn, jid, serializer=protocol.serializer())
        except Exception as exc:
            if is_redis_error(exc):
                raise
            return False
        return True
