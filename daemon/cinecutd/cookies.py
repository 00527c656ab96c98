"""``sync``: wait until the daemon has processed every change made in a root before a given moment.

As watchman's cookies: the client creates a hidden file (``.cinecutd-cookie-<pid>-<n>``, a name the scan
ignores) in the root and asks the daemon to sync on it. Events of one root reach the engine in the order
the kernel reported them, so once the engine has handled the cookie's own event, every change made before
the cookie was created has been handled too. The answer then says so and the cookie is removed.

A polled root reports no hidden files; there the proof is a complete poll that started after the request
reached the daemon (so after the cookie was created): the watcher posts each poll's "polled" marker,
with the poll's start time, through the same queue as that poll's events, after them.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cinecutd.states import EventKind

PREFIX = ".cinecutd-cookie-"
_NAME = re.compile(r"\.cinecutd-cookie-[0-9]+-[0-9]+\Z")
_SEEN_MAX = 256  # cookies whose event came before the request: remembered, bounded
_GIVE_UP_S = 600.0  # a waiter this old has no client any more
_counter = itertools.count(1)


def is_cookie(path: str | Path) -> bool:
    return _NAME.match(os.path.basename(path)) is not None


# --------------------------------------------------------------------------------------------- client side


def create_cookie(root: Path) -> Path:
    """A fresh cookie file in ``root`` (exclusive create: never an existing file)."""
    path = root / f"{PREFIX}{os.getpid()}-{next(_counter)}"
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
    return path


def sync_root(request: Callable[[dict[str, Any]], dict[str, Any]], root: Path) -> dict[str, Any]:
    """Create a cookie in ``root``, ask the daemon to sync on it (``request`` sends one control request and
    returns its result), and remove the cookie if the daemon could not."""
    cookie = create_cookie(root)
    try:
        return request({"cmd": "sync", "cookie": str(cookie)})
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(cookie)


# --------------------------------------------------------------------------------------------- engine side


@dataclass
class _Waiter:
    root: Path
    done: Callable[[dict[str, Any]], None]
    since: float
    polled: bool  # the root is polled: wait for a complete poll, not for the cookie's event
    asked: float  # when the request reached the daemon (time.monotonic)


class Cookies:
    """The engine's side: sync requests waiting for their cookie's event (engine thread only)."""

    def __init__(self) -> None:
        self._waiting: dict[Path, _Waiter] = {}
        self._seen: OrderedDict[Path, None] = OrderedDict()

    def wait(self, cookie: Path, root: Path, polled: bool, asked: float,
             done: Callable[[dict[str, Any]], None]) -> None:
        """Answer ``done`` once ``cookie``'s event (for a polled root: a poll that started after ``asked``,
        the request's arrival) has been handled."""
        now = time.monotonic()
        for old in [c for c, w in self._waiting.items() if now - w.since > _GIVE_UP_S]:
            del self._waiting[old]  # its client stopped waiting long ago
        w = _Waiter(root, done, now, polled, asked)
        if not polled and cookie in self._seen:
            del self._seen[cookie]
            self._answer(cookie, w, "inotify")
            return
        self._waiting[cookie] = w

    def intercept(self, kind: str, src: str, dest: str | None) -> bool:
        """Consume a cookie's event, or a poll's end marker; False for any other event."""
        if kind == EventKind.POLLED:  # dest: the poll's start, as time.monotonic() said it
            self._polled(Path(src), float(dest or 0.0))
            return True
        hit = next((p for p in (src, dest) if p and is_cookie(p)), None)
        if hit is None:
            return False
        path = Path(hit)
        w = self._waiting.get(path)
        if w is not None and not w.polled:
            del self._waiting[path]
            self._answer(path, w, "inotify")
        elif w is None and kind != EventKind.DELETED:
            self._seen[path] = None
            while len(self._seen) > _SEEN_MAX:
                self._seen.popitem(last=False)
        return True

    def _polled(self, root: Path, started: float) -> None:
        for cookie, w in list(self._waiting.items()):
            if w.polled and w.root == root and started >= w.asked:
                del self._waiting[cookie]
                self._answer(cookie, w, "poll")

    def _answer(self, cookie: Path, w: _Waiter, how: str) -> None:
        with contextlib.suppress(OSError):
            os.unlink(cookie)
        w.done({"synced": True, "root": str(w.root), "watch": how,
                "waited_s": round(time.monotonic() - w.since, 4)})
