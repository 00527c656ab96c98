"""A recursive inotify observer that never watches (or walks) work directories.

watchdog's recursive inotify watch adds one watch per sub-folder and walks the whole tree to do so,
at start and after every queue overflow. A library's work dirs hold thousands of keyframe JPEGs and
are written by the pipeline all night: watching them costs inotify watches (a per-user limit), memory,
start-up time and events we would only throw away. This observer is watchdog's own, with the walk
pruned at ``*_cinecut_work``. It relies on watchdog's ``InotifyWatchGroup`` (watchdog >= 6); with an
older watchdog (Debian 12 ships 2.2.1) the plain observer is used and work-dir events are dropped by
the handler instead.
"""

from __future__ import annotations

import os
from typing import Any

from cinecut.workdir import WORK_DIR_SUFFIX

_SUFFIX = os.fsencode(WORK_DIR_SUFFIX)

try:
    from watchdog.observers.api import DEFAULT_OBSERVER_TIMEOUT, BaseObserver
    from watchdog.observers.inotify import InotifyEmitter, InotifyWatchGroup

    AVAILABLE = hasattr(InotifyWatchGroup, "_add_all_callbacks") and hasattr(InotifyEmitter, "on_thread_start")
except ImportError:  # watchdog < 6: no watch groups to prune
    AVAILABLE = False


def is_work_dir_path(path: bytes) -> bool:
    """True if the last component of ``path`` is a work dir."""
    return os.path.basename(path.rstrip(b"/")).endswith(_SUFFIX)


if AVAILABLE:

    class PrunedWatchGroup(InotifyWatchGroup):
        """watchdog's watch group, minus every ``*_cinecut_work`` subtree."""

        def _add_all_callbacks(self, path: bytes) -> None:
            if is_work_dir_path(path) and path != self.path:
                return
            is_dir = os.path.isdir(path)
            self._add_callback(path)
            if not (is_dir and self.is_recursive):
                return
            for root, dirnames, _ in os.walk(path, followlinks=self.follow_symlink):
                dirnames[:] = [d for d in dirnames if not d.endswith(_SUFFIX)]
                for dirname in dirnames:
                    full = os.path.join(root, dirname)
                    if not self.follow_symlink and os.path.islink(full):
                        continue
                    self._add_callback(full)

    class PrunedInotifyEmitter(InotifyEmitter):
        """The inotify emitter, building a :class:`PrunedWatchGroup`."""

        def on_thread_start(self) -> None:
            self._inotify = PrunedWatchGroup(
                self._inotify_fd,
                os.fsencode(self.watch.path),
                is_recursive=self.watch.is_recursive,
                event_mask=self.get_event_mask_from_filter(),
                follow_symlink=self.watch.follow_symlink,
            )

    class PrunedInotifyObserver(BaseObserver):
        """An inotify observer whose recursive watches skip work dirs."""

        def __init__(self, *, timeout: Any = DEFAULT_OBSERVER_TIMEOUT) -> None:
            super().__init__(PrunedInotifyEmitter, timeout=timeout)
