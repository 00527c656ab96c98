"""The coordinator's side of remote pre-warming: the scheduler's films become jobs in an RQ queue.

With ``[queue] redis`` set, the scheduler still decides what to warm (the same eligible films, order,
window, pause and failures as for the local worker); this module keeps the queue that ``cinecut worker``
processes on GPU hosts take from in step with that wish list, one short step per ``POLL_S``:

1. take back the jobs of films that changed, vanished (renamed) or are no longer wanted (pause, window
   closed) (:mod:`.remote_enqueue`);
2. follow the rest through rq's status and their workers' leases, and record how each ended
   (:mod:`.remote_leases`);
3. offer the wanted films not yet queued, a bounded number per step (:mod:`.remote_enqueue`);
4. read the workers' heartbeats for status (:mod:`.remote_workers`).

Redis going away loses nothing the filesystem holds (:mod:`.remote_link` reconnects with a backoff):
after reconnecting, each followed job is looked up again and settled, requeued or adopted.
Everything runs on the engine thread, in short Redis round trips.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from cinecut.inference.cache import CacheState
from cinecut.remote import protocol
from cinecutd.config import Config
from cinecutd.prewarm.backlog import Backlog
from cinecutd.prewarm.gate import Gate
from cinecutd.prewarm.ledger import Ledger
from cinecutd.prewarm.remote_enqueue import Enqueuer, RemoteJob
from cinecutd.prewarm.remote_leases import LeaseWatch
from cinecutd.prewarm.remote_link import RedisLink, is_redis_error
from cinecutd.prewarm.remote_workers import WorkerRoster
from cinecutd.registry import FilmState

POLL_S: Final = 0.5
#: New films offered per tick: a first connection with thousands of cold films fills the queue over a few
#: seconds instead of holding the engine thread for one long burst of disk and Redis round trips.
MAX_OFFERS_PER_TICK: Final = 100


class RemoteDispatch:
    """Keeps the RQ queue in step with the scheduler's wish list; one per scheduler while a queue is set."""

    def __init__(self, config: Callable[[], Config], engine: Any, backlog: Backlog, ledger: Ledger,
                 gate: Gate) -> None:
        self._engine = engine
        self._gate = gate
        self._jobs: dict[Path, RemoteJob] = {}  # the jobs followed, by film
        self._link = RedisLink(config().queue)
        self._enqueuer = Enqueuer(self._link, self._jobs, config, backlog, ledger)
        self._leases = LeaseWatch(self._link, self._jobs, engine, backlog, ledger)
        self._workers = WorkerRoster(self._link)
        self._next_poll = 0.0

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
        if not self._link.ensure(tracked=len(self._jobs)):
            return
        try:
            self._step(wanted)
        except Exception as exc:
            if not is_redis_error(exc):
                raise
            self._link.lost(exc)

    def cancel_all(self, why: str) -> None:
        """Pause, disable, reconfigure: queued jobs are removed, running ones stopped after their frame."""
        if not self._link.ensure(tracked=len(self._jobs)):
            return
        try:
            self._enqueuer.cancel_all(why)
        except Exception as exc:
            if not is_redis_error(exc):
                raise
            self._link.lost(exc)

    # ------------------------------------------------------------------------------ one step
    def _step(self, wanted: list[FilmState]) -> None:
        films = self._engine.reg.films
        want = {s.film: s for s in wanted}
        for film, rj in list(self._jobs.items()):
            state = films.get(film)
            if state is None:
                self._enqueuer.cancel(rj, "the film is gone")
            elif state.stamp != rj.stamp:
                self._enqueuer.cancel(rj, "the film changed")
            elif film not in want and state.cache != CacheState.VALID:
                self._enqueuer.cancel(rj, self._why_unwanted(state))
        self._leases.poll()
        self._enqueuer.reap_stopping()
        offered = 0
        for state in wanted:
            if offered >= MAX_OFFERS_PER_TICK:
                self._next_poll = 0.0  # more next tick
                break
            if state.film not in self._jobs and state.stamp is not None:
                ended = self._enqueuer.offer(state)
                if ended is not None:
                    self._leases.settle(*ended)
                offered += 1
        self._workers.read()

    def _why_unwanted(self, state: FilmState) -> str:
        why = self._gate.halted()
        if why is not None:
            return why
        if state.pending:
            return "its inputs changed and the invalidation waits for the work dir"
        if not self._gate.in_window():
            return "the window closed"
        return "no longer eligible"

    # ------------------------------------------------------------------------------ status
    def status(self) -> dict[str, Any]:
        jobs = sorted(self._jobs.values(), key=lambda j: (j.status != "running", j.enqueued_at))
        return {
            "redis": protocol.redact(self._link.cfg.redis),
            "connected": self._link.connected,
            "error": self._link.last_error,
            "queued": sum(1 for j in jobs if j.status == "queued"),
            "running": [j.to_dict() for j in jobs if j.status == "running"],
            "stopping": self._enqueuer.stopping,
            "enqueued": self._link.enqueued,
            "requeued": self._leases.requeued,
            "workers": self._workers.status(),
        }

    def film_status(self, film: Path) -> dict[str, Any] | None:
        rj = self._jobs.get(film)
        return rj.to_dict() if rj is not None else None


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
