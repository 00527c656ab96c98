"""Watching library roots with watchdog: inotify where it works, polling where it cannot.

Watcher threads do nothing but translate watchdog events into engine events; every decision is the
engine's. Events from inside work dirs are dropped at the first line (watchdog cannot exclude a
subtree from a recursive inotify watch; in polling mode work dirs are never even listed).

A watch thread that dies (an exception in watchdog's code, a reader that stopped) is noticed by
:meth:`Watchers.check`, which the main loop calls: the root shows as ``degraded`` with the reason, the
journal gets an error, a rescan catches up what was missed, and the watch is started afresh (inotify
once more, then polling for good). No walk here recurses: a folder chain of any depth is watched.
"""

from __future__ import annotations

import ctypes
import errno
import inspect
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import structlog
from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingEmitter
from watchdog.utils.dirsnapshot import DirectorySnapshot

from cinecutd import inotify_pruned

try:  # watchdog >= 5 reports a bare mtime change (utime, rsync, Radarr's "change file date") on its own
    from watchdog.events import FileAttribEvent
except ImportError:  # older watchdog reports IN_ATTRIB as "modified"
    FileAttribEvent = None  # type: ignore[assignment,misc]

from cinecut.workdir import in_work_dir, is_work_dir_name
from cinecutd.config import LibraryConfig
from cinecutd.engine import Engine
from cinecutd.states import EventKind, RootChanged, RootStatus, WatchMode

log = structlog.get_logger("cinecutd")

_FORWARDED = frozenset({EventKind.CREATED, EventKind.MODIFIED, EventKind.ATTRIB, EventKind.CLOSED, EventKind.MOVED,
                        EventKind.DELETED})
#: How long watchdog holds an IN_MOVED_FROM to pair it with its IN_MOVED_TO. Its default (0.5 s) is slept
#: in full even when the pair completes at once, and every event queued behind it waits too: each rename
#: in a root (Radarr's upgrade, rsync, atomic writers, our own checkpoint writes) would delay invalidation
#: by half a second. Both halves of a rename are queued together by the kernel, so a short window pairs
#: them; a move that stays unpaired arrives as delete + create, which the engine matches by inode.
MOVE_PAIRING_S = 0.02
#: Only these reach inotify's mask: never IN_OPEN / IN_ACCESS / IN_CLOSE_NOWRITE, which our own reads
#: (and every media server's scans) would otherwise turn into a flood that overflows the kernel queue.
_EVENT_FILTER = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileClosedEvent,
    FileMovedEvent,
    FileDeletedEvent,
    DirCreatedEvent,
    DirMovedEvent,
    DirDeletedEvent,
    # utime() alone (no write, no open) changes a film's stamp: upstream's cache is stale from that moment.
    *([FileAttribEvent] if FileAttribEvent is not None else []),
]


def _schedule(observer: Any, handler: FileSystemEventHandler, path: str, *, polled: bool = False) -> None:
    """``observer.schedule`` with the narrow event filter where this watchdog supports it (>= 4); a polled
    root also lets its end-of-poll markers through."""
    if "event_filter" in inspect.signature(observer.schedule).parameters:
        observer.schedule(handler, path, recursive=True, event_filter=[*_EVENT_FILTER, *([_PollDone] if polled else [])])
    else:
        observer.schedule(handler, path, recursive=True)


INOTIFY_LIMIT_HINT = (
    "inotify watch limit reached; raise it with `sysctl fs.inotify.max_user_watches=524288` "
    "(persist in /etc/sysctl.d/); polling this root instead"
)


class _PollDone(FileSystemEvent):
    """Queued by a polling emitter after each complete poll, behind that poll's events."""

    event_type = EventKind.POLLED

    def __init__(self, root: str, started: float) -> None:
        super().__init__(root)
        self.started = started


class _Forwarder(FileSystemEventHandler):
    """Posts relevant watchdog events to the engine; cheap filters only."""

    def __init__(self, engine: Engine, root: str | None = None) -> None:
        self.engine = engine
        self.root = root

    def on_polled(self, event: FileSystemEvent) -> None:
        """watchdog dispatches each event type to ``on_<type>`` too; on_any_event did the work."""

    def on_any_event(self, event: FileSystemEvent) -> None:
        kind = event.event_type
        if kind not in _FORWARDED:
            if isinstance(event, _PollDone):  # after that poll's events: what `sync` waits for (cinecutd.cookies)
                self.engine.post_event(EventKind.POLLED, os.fsdecode(event.src_path), repr(event.started))
            return
        src = os.fsdecode(event.src_path)
        dest = os.fsdecode(event.dest_path) if getattr(event, "dest_path", "") else None
        if in_work_dir(src, self.root) and (dest is None or in_work_dir(dest, self.root)):
            return
        if event.is_directory and kind == EventKind.MODIFIED:
            return
        self.engine.post_event(kind, src, dest, event.is_directory)


def _filtered_scandir(path: str | None) -> Iterator[os.DirEntry[str]]:
    """``os.scandir`` for the polling observer that never lists work dirs or hidden files."""
    with os.scandir(path) as it:
        for entry in it:
            name = entry.name
            if name.startswith(".") or (is_work_dir_name(name) and entry.is_dir(follow_symlinks=False)):
                continue
            yield entry


class _Snapshot(DirectorySnapshot):
    """watchdog's snapshot with an iterative walk that visits each folder once: its own walk recurses
    once per level (``RecursionError`` past ~1,000 levels) and has no defence against a bind-mount loop."""

    def walk(self, root: str) -> Iterator[tuple[str, os.stat_result]]:
        try:
            st = self.stat(root)
            seen = {(st.st_dev, st.st_ino)}
        except OSError:
            seen = set()
        stack = [root]
        while stack:
            folder = stack.pop()
            try:
                paths = [os.path.join(folder, entry.name) for entry in self.listdir(folder)]
            except OSError as exc:
                # As watchdog's: a folder gone or replaced meanwhile reads as empty, an unreadable
                # sub-folder is skipped, any other failure of the listing fails the snapshot.
                if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.EINVAL):
                    continue
                if folder is not root and isinstance(exc, PermissionError):
                    continue
                raise
            subdirs = []
            for path in paths:
                try:
                    st = self.stat(path)
                except OSError:
                    continue
                yield path, st
                if self.recursive and stat.S_ISDIR(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    subdirs.append(path)
            stack.extend(reversed(subdirs))


class _PollingEmitter(PollingEmitter):
    """watchdog's polling emitter, taking :class:`_Snapshot` snapshots."""

    def __init__(self, *args: Any, stat: Callable[[str], os.stat_result], listdir: Any, **kwargs: Any) -> None:
        super().__init__(*args, stat=stat, listdir=listdir, **kwargs)
        self._take_snapshot = lambda: _Snapshot(
            self.watch.path, recursive=self.watch.is_recursive, stat=stat, listdir=listdir
        )

    def queue_events(self, timeout: float) -> None:
        """One poll, then its end marker (with the poll's start time) behind its events."""
        if self.stopped_event.wait(timeout):
            return
        started = time.monotonic()
        super().queue_events(0)
        if self.should_keep_running() and not getattr(self, "_snapshot_failing", False):  # a poll that saw all
            self.queue_event(_PollDone(os.fsdecode(self.watch.path), started))


class PollingObserver(BaseObserver):
    """A polling observer with a custom ``stat``/``listdir`` whose walks never recurse."""

    def __init__(self, stat: Callable[[str], os.stat_result], listdir: Any, *, polling_interval: float) -> None:
        super().__init__(partial(_PollingEmitter, stat=stat, listdir=listdir), timeout=polling_interval)


def _poll_stat(root: str) -> Callable[[str], os.stat_result]:
    """``stat`` for the polling observer: symlinked films are followed (Plex users link them), symlinked
    folders are not (watchdog would descend into them, so a link back up the tree makes every poll walk
    ``loop/loop/...`` until ELOOP, which it does not survive). The root itself may be a symlink."""

    def poll_stat(path: str) -> os.stat_result:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            try:
                target = os.stat(path)
            except OSError:
                return st
            if not stat.S_ISDIR(target.st_mode) or os.path.normpath(path) == root:
                return target
        return st

    return poll_stat


def watch_limit_reached(path: str) -> bool:
    """True if not one more inotify watch can be added for this user right now.

    Probed with a throwaway inotify instance right after an observer placed its watches: if the budget is
    exhausted then, the observer ran into it and parts of the root are unwatched (watchdog >= 5 logs
    nothing and raises nothing for sub-folders). Conservative: a budget used up to the last watch by
    others also reads as exhausted, and the root is then polled.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.inotify_init1(os.O_CLOEXEC)
    except (OSError, AttributeError):
        return False
    if fd < 0:
        return False  # no instance to spare: says nothing about watches
    try:
        wd = libc.inotify_add_watch(fd, os.fsencode(path), 0x00000004)  # IN_ATTRIB
        return wd < 0 and ctypes.get_errno() == errno.ENOSPC
    finally:
        os.close(fd)


class _OverflowHook(logging.Handler):
    """watchdog rebuilds its watches after an inotify queue overflow and only logs it; turn that log line
    into a rescan so the events the kernel dropped are caught up at once."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(logging.WARNING)
        self.engine = engine

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            self.engine.post_event(EventKind.OVERFLOW, "", None, False)


@dataclass(slots=True)
class _Watch:
    library: LibraryConfig
    observer: Any
    mode: WatchMode
    failures: list[float] = field(default_factory=list)  # monotonic times this root's watch died


#: A root whose inotify watch died this many times within ``FAILURE_WINDOW_S`` is polled for good.
MAX_INOTIFY_RESTARTS = 1
FAILURE_WINDOW_S = 600.0
#: Root states in which a root is being watched (``degraded``: a watch died and was replaced).
WATCHED_STATES = frozenset({RootStatus.WATCHING, RootStatus.POLL_FALLBACK, RootStatus.DEGRADED})


def _shorten_move_pairing() -> None:
    """Set watchdog's move-pairing window (the class moved between watchdog releases)."""
    import importlib

    for module, name in (
        ("watchdog.observers.inotify_move_event_grouper", "InotifyMoveEventGrouper"),  # watchdog >= 6
        ("watchdog.observers.inotify_buffer", "InotifyBuffer"),  # older releases
    ):
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
        cls.delay = MOVE_PAIRING_S


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


class Watchers:
    """One observer per library root; roots that are missing are retried by :meth:`ensure`; watches whose
    threads died are replaced by :meth:`check`."""

    def __init__(self, engine: Engine) -> None:
        _shorten_move_pairing()
        self.engine = engine
        self._watches: dict[Path, _Watch] = {}
        self._hook = _OverflowHook(engine)
        logging.getLogger("watchdog").addHandler(self._hook)
        self._failures: dict[Path, list[float]] = {}
        # Why a thread died, recorded by the thread excepthook (watchdog's threads print and vanish).
        self._thread_errors: dict[int, str] = {}
        self._prev_excepthook = threading.excepthook
        threading.excepthook = self._thread_died

    def _thread_died(self, args: Any) -> None:
        thread = args.thread
        if thread is not None and args.exc_value is not None:
            self._thread_errors[id(thread)] = _describe(args.exc_value)
            log.error("watch_thread_died", thread=thread.name, error=_describe(args.exc_value))
            self.engine.queue.put(None)  # wake the loop: check() replaces the watch now
            return
        self._prev_excepthook(args)

    def ensure(self, libraries: tuple[LibraryConfig, ...] | list[LibraryConfig]) -> None:
        """Start watches for roots that lack one, stop those whose root left the config or vanished."""
        wanted = {lib.path: lib for lib in libraries}
        for root in list(self._watches):
            w = self._watches[root]
            if root not in wanted or wanted[root] != w.library or not os.path.isdir(root):
                self._stop(root)
        for root, lib in wanted.items():
            if root not in self._watches and os.path.isdir(root):
                self._start(lib)
        for root, w in self._watches.items():
            state = self.engine.reg.roots.get(root)
            if state is not None and state.state not in WATCHED_STATES:
                self._status(root, RootStatus.POLL_FALLBACK if w.mode is WatchMode.POLL_FALLBACK else RootStatus.WATCHING)
                state.watch = WatchMode.INOTIFY if w.mode is WatchMode.INOTIFY else WatchMode.POLL

    def _status(self, root: Path, status: RootStatus, detail: str | None = None) -> None:
        """The one place a watch sets its root's status: watching, polling, degraded or unreadable (a rescan
        owns missing and pending-watch, :class:`cinecutd.reconciler.Reconciler`). A change is announced."""
        state = self.engine.reg.roots.get(root)
        if state is None:
            return
        was, state.state = state.state, status
        if detail is not None:
            state.detail = detail
        if was != status:
            self.engine.bus.publish(RootChanged(root, status))

    def check(self) -> None:
        """Replace every watch whose threads died (cheap: a few ``is_alive`` per root; called by the loop)."""
        for root, w in list(self._watches.items()):
            why = self._failure(w.observer)
            if why is None or not os.path.isdir(root):
                continue  # a vanished root stops its watch by design; ensure() deals with it
            self._replace(root, w, why)

    def _failure(self, observer: Any) -> str | None:
        """Why ``observer`` no longer delivers events, or None while it does."""
        threads = [observer, *getattr(observer, "emitters", ())]
        for t in threads:
            if not t.is_alive():
                return self._thread_errors.pop(id(t), None) or f"{t.name} stopped"
        failure = getattr(observer, "failure", None)
        if failure is not None:
            why = failure()
            if why is not None:
                return why
        return None

    def _replace(self, root: Path, w: _Watch, why: str) -> None:
        now = time.monotonic()
        failures = [t for t in self._failures.get(root, []) if now - t < FAILURE_WINDOW_S] + [now]
        self._failures[root] = failures
        self._stop(root)
        poll = w.mode is not WatchMode.INOTIFY or len(failures) > MAX_INOTIFY_RESTARTS
        action = "polling instead" if poll and w.mode is WatchMode.INOTIFY else "watch restarted"
        log.error("watch_failed", root=str(root), mode=str(w.mode), error=why, action=action)
        self._start(w.library, force_poll=poll)
        if root in self._watches:
            self._status(root, RootStatus.DEGRADED, f"the {w.mode} watch failed ({why}); {action}")
        # Events may have been lost while the watch was dead: look at the root again.
        self.engine.post_event(EventKind.RESYNC, str(root), None, True)

    def _start(self, lib: LibraryConfig, *, force_poll: bool = False) -> None:
        state = self.engine.reg.roots.get(lib.path)
        mode = WatchMode(lib.watch)
        if force_poll and mode is WatchMode.INOTIFY:
            mode = WatchMode.POLL_FALLBACK
        observer: Any = None
        if mode is WatchMode.INOTIFY:
            try:
                observer = inotify_pruned.PrunedInotifyObserver() if inotify_pruned.AVAILABLE else Observer()
                _schedule(observer, _Forwarder(self.engine, str(lib.path)), str(lib.path))
                observer.start()
                if watch_limit_reached(str(lib.path)):
                    # watchdog >= 5 skips the sub-folders it cannot watch without a word.
                    raise OSError(errno.ENOSPC, "inotify watch limit reached")
            except OSError as exc:
                _stop_quietly(observer)
                observer = None
                if exc.errno in (errno.ENOSPC, errno.EMFILE):
                    log.warning("inotify_limit", root=str(lib.path), detail=INOTIFY_LIMIT_HINT)
                    mode = WatchMode.POLL_FALLBACK
                else:
                    log.error("watch_failed", root=str(lib.path), error=str(exc))
                    self._status(lib.path, RootStatus.UNREADABLE, str(exc))
                    return
            except Exception as exc:  # a bug in the watch code (an old watchdog's recursive walk): poll
                _stop_quietly(observer)
                observer = None
                log.error("watch_failed", root=str(lib.path), mode="inotify", error=_describe(exc),
                          action="polling instead")
                mode = WatchMode.POLL_FALLBACK
                self._status(lib.path, RootStatus.DEGRADED, f"the inotify watch failed ({_describe(exc)}); polling")
        if observer is None:
            observer = PollingObserver(
                _poll_stat(os.path.normpath(lib.path)), _filtered_scandir, polling_interval=lib.poll_interval
            )
            _schedule(observer, _Forwarder(self.engine, str(lib.path)), str(lib.path), polled=True)
            try:
                observer.start()
            except Exception as exc:  # the first snapshot failed (root unreadable or gone meanwhile)
                _stop_quietly(observer)
                log.error("watch_failed", root=str(lib.path), error=_describe(exc))
                self._status(lib.path, RootStatus.UNREADABLE, str(exc))
                return
        self._watches[lib.path] = _Watch(lib, observer, mode)
        if state is not None:
            state.watch = WatchMode.POLL if mode is not WatchMode.INOTIFY else WatchMode.INOTIFY
            if state.state != RootStatus.DEGRADED:
                fallback = mode is WatchMode.POLL_FALLBACK
                self._status(lib.path, RootStatus.POLL_FALLBACK if fallback else RootStatus.WATCHING,
                             INOTIFY_LIMIT_HINT if fallback else "")
        log.info("watching", root=str(lib.path), mode=str(mode))

    def restart(self, root: Path) -> None:
        """Drop a root's observer; the next :meth:`ensure` watches it afresh (after a mount change)."""
        self._stop(root)

    def _stop(self, root: Path) -> None:
        w = self._watches.pop(root, None)
        if w is not None:
            _stop_quietly(w.observer)

    def stop_all(self) -> None:
        for root in list(self._watches):
            self._stop(root)
        logging.getLogger("watchdog").removeHandler(self._hook)
        if threading.excepthook == self._thread_died:
            threading.excepthook = self._prev_excepthook


def _stop_quietly(observer: Any) -> None:
    if observer is None:
        return
    try:
        observer.stop()
        if observer.is_alive():
            observer.join(timeout=2)
    except Exception:  # a half-started observer may not stop cleanly; it is being discarded anyway
        pass
