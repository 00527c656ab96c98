"""Blocked films: what the daemon could not do for a film, why, what fixes it, and the retry.

A film is *blocked* while anything kept the daemon from keeping its work dir honest: an invalidation that
met an error (permission, I/O, a refused symlink), or a work dir it cannot read or write at all (upstream
run by another user writes its checkpoint and cache 0600; a library missing from the unit's
``ReadWritePaths=`` is read-only). Each new problem is logged once at warning level with its path and
errno, counted, and shown in ``cinecutd status`` as ``blocked: <why>; <remedy>`` until a retry finds the
work dir clean. Retries back off from 1 s to a minute (one revalidation each: cheap), so a fixed
permission is noticed without a restart; ``cinecutd rescan`` retries at once.
"""

from __future__ import annotations

import errno
import os
import pwd
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from cinecut import safefs
from cinecut.problems import Problem
from cinecut.workdir import CHECKPOINT_NAME, WorkDir

RETRY_FIRST_S: Final = 1.0
RETRY_MAX_S: Final = 60.0

_DROPIN_FIX: Final = "then: systemctl daemon-reload && systemctl restart cinecut-cache"


@dataclass(slots=True)
class Blocked:
    """A film's standing problems."""

    problems: list[Problem]
    since: float = field(default_factory=time.time)
    retry_in: float = RETRY_FIRST_S
    #: Inputs of an invalidation that met errors: the retry applies it again (idempotent) before looking,
    #: since a half-done one leaves nothing a fresh look could detect (its stages are already reset, yet
    #: old frames left on disk would be reused: upstream extracts only missing frames).
    pending: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return blocked_text(self.problems)

    def to_dict(self) -> dict[str, Any]:
        return {"blocked": self.text, "since": self.since, "problems": [p.to_dict() for p in self.problems]}


def _overflow_uid() -> int:
    """The uid a private user namespace shows for unmapped owners (65534 unless changed)."""
    try:
        with open("/proc/sys/kernel/overflowuid") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 65534


def _owner_name(path: str) -> str | None:
    """The name of ``path``'s owner; None when it is us, root, or hidden (unmapped in a private user
    namespace: the unit's PrivateUsers=yes shows every other owner as the overflow uid)."""
    try:
        uid = os.lstat(path).st_uid
    except OSError:
        return None
    if uid in (os.geteuid(), 0, _overflow_uid()):
        return None
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def remedy(p: Problem) -> str:
    """What an admin does about ``p``: one sentence, with the command."""
    if p.errno == errno.EROFS:
        return ("the library is read-only to the service: `cinecutd systemd-dropin --write` (the library must be "
                f"in [[library]]), {_DROPIN_FIX}")
    if p.errno in (errno.EACCES, errno.EPERM):
        owner = _owner_name(p.path) or _owner_name(os.path.dirname(p.path))
        who = owner or f"the account that runs CineCut (the owner of {os.path.dirname(p.path)})"
        return (f"run the service as {who}: `cinecutd systemd-dropin --run-as {owner or 'USER'} --write`, "
                f"{_DROPIN_FIX} (or give the service read and write access to this work dir)")
    if p.errno is None:
        return "remove or replace it by hand (cinecut-cache never follows links or special files in work dirs)"
    return "check the disk and the file system (the kernel log names the error)"


def blocked_text(problems: list[Problem]) -> str:
    """``blocked: <why>; <remedy>`` for the first problem (``+N more`` when there are others)."""
    if not problems:
        return ""
    first = problems[0]
    more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"blocked: {first.summary()}{more}; {remedy(first)}"


def access_problems(wd: WorkDir) -> list[Problem]:
    """Work-dir files the daemon must read and cannot, and a work dir it cannot write (lock-free, no write).

    A checkpoint or cache it cannot open is a film whose stages it cannot check or reset; a work dir it
    cannot write is one where it can delete nothing. Both only show when a work dir exists.
    """
    out: list[Problem] = []
    try:
        fd = safefs.open_dir(wd.path)
    except FileNotFoundError:
        return out
    except safefs.SymlinkRefused:
        return out  # reported as refused by the revalidation
    except OSError as exc:
        return [Problem.from_exc(str(wd.path), exc, "nothing checked or changed")]
    try:
        for name in (CHECKPOINT_NAME, wd.cache_name):
            try:
                os.close(safefs.open_regular(fd, name))
            except (FileNotFoundError, safefs.SymlinkRefused):
                continue
            except OSError as exc:
                out.append(Problem.from_exc(str(wd.path / name), exc, "cannot check or reset what it records"))
        if not os.access(".", os.W_OK, dir_fd=fd):
            err = errno.EROFS if os.fstatvfs(fd).f_flag & os.ST_RDONLY else errno.EACCES
            out.append(Problem(str(wd.path), err, os.strerror(err) + " (work dir not writable)",
                               "nothing in it can be deleted or reset"))
    finally:
        os.close(fd)
    return out


def older_than_film(wd: WorkDir, film_mtime: float) -> str | None:
    """With the checkpoint unreadable, the only witness left: a proxy or cache older than the film.

    Returns the name of the older artifact (the film changed after it was made), else None.
    """
    for name in (wd.proxy_name, wd.cache_name):
        st = safefs_lstat(wd.path / name)
        if st is not None and stat.S_ISREG(st.st_mode) and st.st_mtime < film_mtime:
            return name
    return None


def safefs_lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except OSError:
        return None


class Health:
    """Blocked films by path; the engine thread alone uses it."""

    def __init__(self) -> None:
        self.blocked: dict[Path, Blocked] = {}

    def update(self, film: Path, problems: list[Problem]) -> tuple[list[Problem], bool]:
        """Record ``film``'s current problems. Returns (the new ones, whether it was just unblocked)."""
        old = self.blocked.get(film)
        if not problems:
            return [], self.blocked.pop(film, None) is not None
        known = {(p.path, p.errno, p.reason) for p in old.problems} if old else set()
        new = [p for p in problems if (p.path, p.errno, p.reason) not in known]
        if old is None:
            self.blocked[film] = Blocked(list(problems))
        else:
            old.problems = list(problems)
        return new, False

    def forget(self, film: Path) -> None:
        self.blocked.pop(film, None)

    def next_retry(self, film: Path) -> float | None:
        """Seconds until ``film``'s next retry (doubling up to a minute); None when it is not blocked."""
        b = self.blocked.get(film)
        if b is None:
            return None
        delay = b.retry_in
        b.retry_in = min(RETRY_MAX_S, b.retry_in * 2)
        return delay

    def get(self, film: Path) -> Blocked | None:
        return self.blocked.get(film)


__all__ = ["Blocked", "Health", "access_problems", "blocked_text", "older_than_film", "remedy"]


# --------------------------------------------------------------------------------------------- the probe
#: ``cinecutd status --check`` exit codes (documented in docs/protocol.md). When several apply, the
#: first in this order wins: the daemon down (3) or its socket refused (4), then a root (5), then a film (6).
CHECK_OK: Final = 0
CHECK_ROOT: Final = 5
CHECK_BLOCKED: Final = 6
CHECK_OTHER: Final = 1  # e.g. a configured Radarr/Sonarr webhook that is not listening


def check_verdict(status: dict[str, Any]) -> tuple[int, list[str]]:
    """The exit code of ``status --check`` for a daemon's status answer, with one line per finding.

    A root counts as unhealthy unless it is ``watching`` (missing, unreadable, not yet watched, or polled
    because inotify ran out of watches); a film counts when it is blocked.
    """
    lines: list[str] = []
    code = CHECK_OK
    for r in status.get("roots") or []:
        if isinstance(r, dict) and r.get("state") != "watching":
            detail = f": {r.get('detail')}" if r.get("detail") else ""
            lines.append(f"root {r.get('path')}: {r.get('state')}{detail}")
            code = code or CHECK_ROOT
    blocked = status.get("blocked") or []
    total = (status.get("films") or {}).get("blocked", len(blocked))
    for b in blocked:
        if isinstance(b, dict):
            lines.append(f"film {b.get('film')}: {b.get('blocked')}")
    if total:
        if total > len(blocked):
            lines.append(f"... {total - len(blocked)} more blocked films")
        code = code or CHECK_BLOCKED
    hook = status.get("webhook")
    if isinstance(hook, dict) and hook.get("state") != "listening":
        lines.append(f"webhook {hook.get('listen')}: {hook.get('state')}: {hook.get('error') or 'not listening'}")
        code = code or CHECK_OTHER
    return code, lines
