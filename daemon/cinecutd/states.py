"""The daemon's named states and the small in-process event bus that announces their changes.

States are string enums, so logs, JSON answers and comparisons with the plain strings older code and
clients use keep working. Cache validity is ``cinecut.inference.cache.CacheState``, not redefined here.
Each announcement has one publisher (the module that owns the transition); subscribers run on the
engine thread, in subscription order, and one failing subscriber never stops the others.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import structlog

if TYPE_CHECKING:
    from cinecutd.registry import FilmState

log = structlog.get_logger("cinecutd")


class RootStatus(enum.StrEnum):
    """A library root as the daemon sees it (``RootState.state``)."""

    STARTING = "starting"
    WATCHING = "watching"
    POLL_FALLBACK = "poll-fallback"
    DEGRADED = "degraded"
    PENDING_WATCH = "pending-watch"
    MISSING = "missing"
    UNREADABLE = "unreadable"


class WatchMode(enum.StrEnum):
    """How a root is watched: the configured ``watch``, or polling in place of a failed inotify watch."""

    INOTIFY = "inotify"
    POLL = "poll"
    POLL_FALLBACK = "poll-fallback"  # inotify was configured, but its limit was reached or its watch died


class EventKind(enum.StrEnum):
    """What a watcher (or a hint) reported about a path."""

    CREATED = "created"
    MODIFIED = "modified"
    CLOSED = "closed"
    MOVED = "moved"
    DELETED = "deleted"
    OVERFLOW = "overflow"
    RESYNC = "resync"
    POLLED = "polled"
    REPLACED = "replaced"  # a film's name got another file (a rename onto it)
    ATTRIB = "attrib"  # a bare mtime or mode change (watchdog >= 5 reports it on its own)


class Trigger(enum.StrEnum):
    """Why a film was judged: an event kind (``EventKind``) or one of these."""

    SETTLED = "settled"  # its burst of events went quiet
    RENAMED = "renamed"  # it was renamed within a root and its work dir followed
    MOVED = "moved"  # it moved across watches and its work dir followed
    RESCAN = "rescan"
    RETRY = "retry"  # a blocked film's backoff came due
    PREWARMED = "prewarmed"  # a pre-warm run finished


@dataclass(frozen=True, slots=True)
class Deferral:
    """A film's judgement waiting for a pipeline's lock (``FilmState.pending``; None while nothing waits).

    Its presence is the flag (the film is not judged, pre-warm leaves it alone); ``trigger`` is the reason,
    replayed as the judgement's trigger once the lock is gone."""

    trigger: str  # a Trigger or EventKind value, or "subtitle <kind>"
    since: float  # wall time the judgement was first deferred


@dataclass(frozen=True, slots=True)
class FilmJudged:
    """A film was judged after a change: once per change, whether or not anything was reset."""

    state: FilmState
    trigger: str
    changed: bool


@dataclass(frozen=True, slots=True)
class Reconciled:
    """A rescan ended."""

    summary: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RootChanged:
    """A root changed status (went missing, came back)."""

    root: Path
    status: RootStatus


E = TypeVar("E")


class Bus:
    """Typed publish/subscribe on the engine thread, in place of hooks called from several places."""

    def __init__(self) -> None:
        self._subs: dict[type, list[Callable[[Any], None]]] = {}

    def subscribe(self, kind: type[E], fn: Callable[[E], None]) -> None:
        self._subs.setdefault(kind, []).append(fn)

    def publish(self, event: object) -> None:
        for fn in self._subs.get(type(event), ()):
            try:
                fn(event)
            except Exception as exc:  # a subscriber's failure must never stop the engine
                log.error("subscriber_failed", event=type(event).__name__, error=repr(exc))


__all__ = ["Bus", "Deferral", "EventKind", "FilmJudged", "Reconciled", "RootChanged", "RootStatus", "Trigger", "WatchMode"]
