"""A recursive inotify observer that never watches (or walks) work directories, and never recurses.

watchdog's recursive inotify watch adds one watch per sub-folder and walks the whole tree to do so,
at start and after every queue overflow. A library's work dirs hold thousands of keyframe JPEGs and
are written by the pipeline all night: watching them costs inotify watches (a per-user limit), memory,
start-up time and events we would only throw away. This observer is watchdog's own, with every walk
(adding watches, simulating the events of a folder created or moved in, the sub-events of a folder
move) pruned at work dirs and done by :mod:`cinecutd.treewalk`: watchdog's walks are ``os.walk``, which
recurses once per level, so a chain of 1,000 nested folders killed its threads with ``RecursionError``.

Observers share watchdog's one reader thread (the kernel's order of events across roots is kept); a
reader that died is replaced when a watch is started afresh, and :meth:`PrunedInotifyObserver.failure`
says when one did. It relies on watchdog's ``InotifyWatchGroup`` and ``InotifyFD`` (watchdog >= 6); with
an older watchdog (Debian 12 ships 2.2.1) the plain observer is used, work-dir events are dropped by the
handler instead, and a watch thread that dies is caught by the watcher's supervision.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator
from typing import Any

from cinecut import faults
from cinecut.workdir import in_work_dir, is_work_dir_name
from cinecutd.treewalk import walk, walk_folders

try:
    from watchdog.events import (
        DirCreatedEvent,
        DirModifiedEvent,
        DirMovedEvent,
        FileCreatedEvent,
        FileMovedEvent,
        FileSystemEvent,
    )
    from watchdog.observers.api import DEFAULT_OBSERVER_TIMEOUT, BaseObserver
    from watchdog.observers.inotify import InotifyEmitter, InotifyWatchGroup
    from watchdog.observers.inotify_c import InotifyConstants, InotifyEvent, InotifyFD
    from watchdog.observers.inotify_move_event_grouper import PathedInotifyEvent

    AVAILABLE = (
        all(hasattr(InotifyWatchGroup, a) for a in ("_add_all_callbacks", "_recursive_simulate", "_find_node_by_path"))
        and hasattr(InotifyEmitter, "build_and_queue_event")
        and "inotify_fd" in inspect.signature(InotifyEmitter.__init__).parameters
    )
except ImportError:  # watchdog < 6: no watch groups to prune
    AVAILABLE = False


def is_work_dir_path(path: bytes, root: bytes | None = None) -> bool:
    """True if ``path`` is a work dir or inside one (below ``root``): the one definition, on bytes."""
    return in_work_dir(path, root)


def _sub_events(src_dir: str, dest_dir: str | None) -> Iterator[FileSystemEvent]:
    """The events watchdog synthesises for what a folder that was created or moved holds: created events
    (``dest_dir`` None) or moved events from under ``src_dir`` to under ``dest_dir``; work dirs left out."""
    top = dest_dir if dest_dir is not None else src_dir
    for folder, dirs, files in walk(top, prune=is_work_dir_name):
        for names, created, moved in ((dirs, DirCreatedEvent, DirMovedEvent), (files, FileCreatedEvent, FileMovedEvent)):
            for name in names:
                path = os.path.join(folder, name)
                if dest_dir is None:
                    yield created(path, is_synthetic=True)
                else:
                    yield moved(os.path.join(src_dir, os.path.relpath(path, dest_dir)), path, is_synthetic=True)


if AVAILABLE:

    class PrunedWatchGroup(InotifyWatchGroup):
        """watchdog's watch group, minus every work-dir subtree, walking without recursion."""

        def _add_all_callbacks(self, path: bytes) -> None:
            if path != self.path and is_work_dir_path(path, self.path):
                return
            is_dir = os.path.isdir(path)
            self._add_callback(path)
            if not (is_dir and self.is_recursive):
                return
            for folder in walk_folders(path, prune=is_work_dir_name):
                if folder != path:
                    self._add_callback(folder)

        def on_event(self, event: InotifyEvent) -> None:
            faults.point("watch.event")  # lets a test kill the reader thread the way a bug would
            super().on_event(event)

        def _recursive_simulate(self, src_path: bytes) -> list[InotifyEvent]:
            """Created events for what a new folder already holds (``mkdir -p a/b; touch a/b/f``)."""
            events = []
            for folder, dirs, files in walk(src_path, prune=is_work_dir_name):
                node = self._find_node_by_path(folder)
                if node is None:
                    continue  # not watched (yet): its own IN_CREATE reports its content
                for name in dirs:
                    events.append(InotifyEvent(node.wd, InotifyConstants.IN_CREATE | InotifyConstants.IN_ISDIR, 0, name))
                for name in files:
                    events.append(InotifyEvent(node.wd, InotifyConstants.IN_CREATE, 0, name))
            return events

    class PrunedInotifyEmitter(InotifyEmitter):
        """The inotify emitter, building a :class:`PrunedWatchGroup` and walking moved folders iteratively."""

        def on_thread_start(self) -> None:
            self._inotify = PrunedWatchGroup(
                self._inotify_fd,
                os.fsencode(self.watch.path),
                is_recursive=self.watch.is_recursive,
                event_mask=self.get_event_mask_from_filter(),
                follow_symlink=self.watch.follow_symlink,
            )

        def build_and_queue_event(self, event: Any, *, full_events: bool = False) -> None:
            """Folder moves and folders moved in: watchdog's own code, with its sub-event walk replaced."""
            if not isinstance(event, PathedInotifyEvent):
                move_from, move_to = event
                if move_from.ev.is_directory and self.watch.is_recursive:
                    src, dest = os.fsdecode(move_from.path), os.fsdecode(move_to.path)
                    self.queue_event(DirMovedEvent(src, dest))
                    self.queue_event(DirModifiedEvent(os.path.dirname(src)))
                    self.queue_event(DirModifiedEvent(os.path.dirname(dest)))
                    for sub in _sub_events(src, dest):
                        self.queue_event(sub)
                    return
            elif event.ev.is_moved_to and event.ev.is_directory and self.watch.is_recursive and not full_events:
                path = os.fsdecode(event.path)
                self.queue_event(DirCreatedEvent(path))
                self.queue_event(DirModifiedEvent(os.path.dirname(path)))
                for sub in _sub_events(path, None):
                    self.queue_event(sub)
                return
            super().build_and_queue_event(event, full_events=full_events)

    def _shared_reader() -> InotifyFD:
        """watchdog's one inotify reader for the process (every root's events in the kernel's order, so a
        move across roots arrives as its two halves in order), started afresh if the last one died."""
        with InotifyFD._global_lock:
            reader = InotifyFD._instance
            if reader is None or not reader.is_alive():
                reader = InotifyFD._instance = InotifyFD()
                reader.start()
            return reader

    class PrunedInotifyObserver(BaseObserver):
        """An inotify observer whose recursive watches skip work dirs."""

        def __init__(self, *, timeout: Any = DEFAULT_OBSERVER_TIMEOUT) -> None:
            super().__init__(PrunedInotifyEmitter, timeout=timeout)
            self._reader: InotifyFD | None = None

        def schedule(self, event_handler: Any, path: Any, **kwargs: Any) -> Any:
            with self._lock:
                if self._reader is None:
                    self._reader = _shared_reader()
                    self._emitter_kwargs["inotify_fd"] = self._reader
                return super().schedule(event_handler, path, **kwargs)

        def failure(self) -> str | None:
            """Why this observer no longer delivers events (its reader died), or None."""
            reader = self._reader
            if reader is None or reader.is_alive():
                return None
            err = getattr(reader, "_dispatch_error", None)
            return f"inotify reader stopped: {err!r}" if err is not None else "inotify reader stopped"
