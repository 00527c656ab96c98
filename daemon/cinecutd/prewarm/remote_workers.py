"""The remote workers as status shows them: each ``cinecut worker`` heartbeats a key with a TTL and joins a
set; a name whose key has expired is a worker that is gone, and is dropped from the set here.
"""

from __future__ import annotations

from typing import Any

from cinecut.remote import protocol
from cinecutd.prewarm.remote_link import RedisLink, json_object

#: What status shows of a worker's heartbeat.
SHOWN = ("name", "host", "state", "film", "done", "total", "fps", "last_seen")


class WorkerRoster:
    """The workers seen at the last poll."""

    def __init__(self, link: RedisLink) -> None:
        self._link = link
        self._workers: list[dict[str, Any]] = []

    def read(self) -> None:
        """One look at the worker set and their heartbeats (two round trips; a third to drop the gone)."""
        conn = self._link.conn
        names = sorted(n.decode() if isinstance(n, bytes) else str(n) for n in conn.smembers(protocol.WORKERS_SET))
        if not names:
            self._workers = []
            return
        values = conn.mget([protocol.worker_key(n) for n in names])
        workers = []
        gone = []
        for name, raw in zip(names, values, strict=True):
            info = json_object(raw)
            if info is None:
                gone.append(name)
                continue
            workers.append(info)
        if gone:
            conn.srem(protocol.WORKERS_SET, *gone)
        self._workers = workers

    def status(self) -> list[dict[str, Any]]:
        return [{key: w.get(key) for key in SHOWN} for w in self._workers]
