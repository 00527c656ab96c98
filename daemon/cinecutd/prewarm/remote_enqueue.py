"""Putting films in the RQ queue and taking them back out: the coordinator's side of a remote job's start
and of its cancelling.

* a job's id is the film and its stamp (:func:`cinecut.remote.protocol.job_id`): a film is never queued
  twice, and a job Redis already has under that id (a coordinator restart, a reconnect) is adopted;
* a film that changed, vanished, or is no longer wanted loses its job: a queued one is removed, a running
  one is asked to stop after its frame. Correctness never rests on that stop arriving: the worker
  re-checks the stamp before it commits. A stopped job is removed from Redis once it has ended, and the
  film's next job waits for that (its old job still holds the work dir).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import structlog

from cinecut.remote import protocol
from cinecut.stamp import SourceStamp
from cinecutd.config import Config
from cinecutd.prewarm.backlog import Backlog
from cinecutd.prewarm.ledger import Ledger
from cinecutd.prewarm.remote_link import RedisLink
from cinecutd.prewarm.writers import open_for_writing
from cinecutd.registry import FilmState

log = structlog.get_logger("cinecutd")

#: A stop that did not end the job within this long is given up on (the worker's own stamp check stands).
STOP_GIVE_UP_S: Final = 600.0
#: rq statuses of a job that is still to run or running, and of one that has ended.
LIVE: Final = frozenset({"queued", "started", "deferred", "scheduled"})
ENDED: Final = frozenset({"finished", "failed", "stopped", "canceled"})


@dataclass(slots=True)
class RemoteJob:
    """A film's job in the queue, as the coordinator follows it."""

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


class Enqueuer:
    """Offers wanted films as jobs and takes unwanted jobs back; ``jobs`` is the dispatch's table of the
    jobs it follows (shared with the lease watch, which removes the ones that end); ``config`` is read at
    each offer, so a reload's libraries and vibe apply to the next job."""

    def __init__(self, link: RedisLink, jobs: dict[Path, RemoteJob], config: Callable[[], Config], backlog: Backlog,
                 ledger: Ledger) -> None:
        self._link = link
        self._jobs = jobs
        self._config = config
        self._backlog = backlog
        self._ledger = ledger
        self._stopping: dict[str, tuple[Path, float]] = {}  # job id -> (film, when the stop was sent)

    @property
    def stopping(self) -> int:
        return len(self._stopping)

    # ------------------------------------------------------------------------------ offer
    def offer(self, state: FilmState) -> tuple[RemoteJob, str] | None:
        """Queue ``state``'s film (or adopt the job Redis has for it). A job that had already ended is
        returned with its status, for the lease watch to settle."""
        if any(f == state.film for f, _ in self._stopping.values()):
            return None  # its old job still holds the work dir: queue the new one once that has ended
        if self._backlog.already_warm(state):
            return None
        assert state.stamp is not None
        if open_for_writing(state.film):
            self._backlog.defer_writing(state.film)
            return None
        root = self._root_of(state.film)
        if root is None:
            return None
        payload = protocol.Payload(str(state.film), root, state.stamp, self._config().prewarm.vibe or None)
        rj = RemoteJob(state.film, state.stamp, payload.id)
        status = self._link.status_of(rj.job_id)
        if status in LIVE:
            rj.status = status  # ours already (a coordinator restart, a reconnect): adopt it, never twice
            log.info("prewarm_adopted", film=str(state.film), job_id=rj.job_id, status=status)
        elif status in ENDED:
            self._jobs[state.film] = rj
            return rj, status
        else:
            self._link.enqueue(payload, front=self._backlog.requested(state.film) is not None)
            log.info("prewarm_enqueued", film=str(state.film), job_id=rj.job_id, root=root)
        self._jobs[state.film] = rj
        self._ledger.attempt(state.film)
        return None

    def _root_of(self, film: Path) -> str | None:
        for lib in self._config().libraries:
            root = lib.path
            if root == film or root in film.parents:
                return str(root)
        return None

    # ------------------------------------------------------------------------------ take back
    def cancel(self, rj: RemoteJob, why: str) -> None:
        """Stop following ``rj``: removed from the queue, or asked to stop if a worker runs it.

        It is forgotten only once Redis has answered: a round trip that fails leaves it followed, so the
        next step takes it back (a job forgotten while still queued would run unseen, paused or not)."""
        self._backlog.mark_dirty()
        if self._link.status_of(rj.job_id) == "started" and self._link.stop(rj.job_id):
            self._stopping[rj.job_id] = (rj.film, time.monotonic())
            self._jobs.pop(rj.film, None)
            log.info("prewarm_stopping", film=str(rj.film), job_id=rj.job_id, reason=why, remote=True)
            return
        self._link.delete(rj.job_id)
        self._jobs.pop(rj.film, None)
        log.info("prewarm_dequeued", film=str(rj.film), job_id=rj.job_id, reason=why)

    def cancel_all(self, why: str) -> None:
        for rj in list(self._jobs.values()):
            self.cancel(rj, why)

    def reap_stopping(self) -> None:
        """Stopped jobs are removed from Redis once they have ended (so the same id can be queued again)."""
        now = time.monotonic()
        for jid, (film, since) in list(self._stopping.items()):
            status = self._link.status_of(jid)
            if status == "started" and now - since < STOP_GIVE_UP_S:
                continue
            if status is not None:
                self._link.delete(jid)
            del self._stopping[jid]  # after Redis answered (as in ``cancel``)
            log.info("prewarm_stopped", film=str(film), job_id=jid, remote=True)
