"""What the coordinator and the remote workers agree on: names, ids, payloads, keys, the connection.

A job is one film at one stamp. Its id is derived from the film's path as the coordinator spells it
(realpath) and the video's stamp, so enqueueing the same work twice is a no-op (RQ keeps one job per
id) and a changed film is new work under a new id. Payloads are JSON (RQ's JSON serializer): a job read
from Redis is data, never code, and a worker runs only :data:`JOB_FUNC`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cinecut.stamp import SourceStamp

QUEUE_NAME: Final = "cinecut-prewarm"
JOB_FUNC: Final = "cinecut.remote.job.warm"
PAYLOAD_VERSION: Final = 1
#: A worker renews its job's lease this often (a third of the lease): a dead worker's job is taken back
#: by the coordinator once the lease has lapsed.
DEFAULT_LEASE_S: Final = 30.0
#: A worker's heartbeat key lives this long without renewal: ``status`` shows it as gone after that.
DEFAULT_HEARTBEAT_S: Final = 10.0
#: Finished jobs are kept this long for the coordinator to read their outcome.
RESULT_TTL_S: Final = 24 * 3600
KEY_PREFIX: Final = "cinecut:"
MAX_PASSWORD_BYTES: Final = 4096


def job_id(film: str, stamp: SourceStamp) -> str:
    """Deterministic: the same film (as the coordinator spells it) at the same stamp is the same job."""
    digest = hashlib.sha256(f"{film}\0{stamp.mtime!r}\0{stamp.size}".encode("utf-8", "surrogateescape"))
    return "cinecut-" + digest.hexdigest()[:40]


def lease_key(jid: str) -> str:
    return f"{KEY_PREFIX}lease:{jid}"


def worker_key(name: str) -> str:
    return f"{KEY_PREFIX}worker:{name}"


WORKERS_SET: Final = f"{KEY_PREFIX}workers"


@dataclass(frozen=True, slots=True)
class Payload:
    """One job: the film as the coordinator sees it, under which library root, at which stamp."""

    film: str  # absolute, the coordinator's spelling
    root: str  # the coordinator's library root holding it: the id a worker maps to its own mount
    stamp: SourceStamp
    vibe: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"v": PAYLOAD_VERSION, "film": self.film, "root": self.root,
                "mtime": self.stamp.mtime, "size": self.stamp.size, "vibe": self.vibe}

    @classmethod
    def from_json(cls, raw: Any) -> Payload:
        """ValueError for anything but a well-formed payload (a forged job is data, and checked)."""
        if not isinstance(raw, dict) or raw.get("v") != PAYLOAD_VERSION:
            raise ValueError("not a cinecut job payload")
        film, root, mtime, size = raw.get("film"), raw.get("root"), raw.get("mtime"), raw.get("size")
        vibe = raw.get("vibe")
        if not isinstance(film, str) or not isinstance(root, str) or not film or not root:
            raise ValueError("film and root must be non-empty strings")
        if len(film) > 4096 or len(root) > 4096 or "\0" in film or "\0" in root:
            raise ValueError("film or root is not a path")
        if not isinstance(mtime, int | float) or isinstance(mtime, bool):
            raise ValueError("mtime must be a number")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError("size must be a non-negative integer")
        if vibe is not None and (not isinstance(vibe, str) or len(vibe) > 200):
            raise ValueError("vibe must be a short string")
        return cls(film, root, SourceStamp(float(mtime), size), vibe)

    @property
    def id(self) -> str:
        return job_id(self.film, self.stamp)


def read_password(path: str | os.PathLike[str] | None) -> str | None:
    """The first line of a credentials file (e.g. a systemd credential); None without a file."""
    if path is None:
        return None
    with open(path, "rb") as f:
        data = f.read(MAX_PASSWORD_BYTES + 1)
    if len(data) > MAX_PASSWORD_BYTES:
        raise ValueError(f"{path}: larger than {MAX_PASSWORD_BYTES} bytes; not a password file")
    line = data.decode("utf-8").splitlines()[0] if data.strip() else ""
    return line.strip() or None


def connect(url: str, password_file: str | os.PathLike[str] | None = None, *, timeout: float = 5.0) -> Any:
    """A Redis connection (imported here: nothing needs redis without a queue). No I/O until first use."""
    import redis

    kwargs: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout,
                              "health_check_interval": 10}
    password = read_password(password_file)
    if password is not None:
        kwargs["password"] = password
    return redis.Redis.from_url(url, **kwargs)


def serializer() -> Any:
    from rq.serializers import JSONSerializer

    return JSONSerializer


def redact(url: str) -> str:
    """A Redis URL fit for logs: a password written into it is replaced."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def real(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.realpath(path))
