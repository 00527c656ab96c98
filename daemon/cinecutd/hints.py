"""Radarr/Sonarr events as hints: "look at these paths now", never "delete this".

An import, upgrade, rename or delete that Radarr or Sonarr reports (by webhook, ``cinecutd.webhook``, or by
custom script, ``cinecutd arr-hook`` over the control socket) becomes a :class:`Hint`: the paths it names and
the renames (previous path, new path). On the engine thread each named path is looked at afresh and handed
to the engine as the filesystem event inotify would have produced for what is on disk *now*:

- a file that exists: ``modified`` (``created`` when the daemon does not know it yet): the usual stamp
  comparison decides; an unchanged film costs one ``stat``;
- a path that is gone: ``deleted`` if the daemon knows a film (or folder of films) there, else nothing;
- a rename: ``moved`` only when the previous path is gone and the new one exists (the work dir follows);
  a destination that does not exist does nothing at all.

So the event only decides *when* the engine looks, never *what* it concludes: a late, duplicated, missing
or forged event costs a ``stat``, never a wrong deletion. A path outside every library (after
``[[path_map]]``), the library root itself, or a path reached through a symlinked folder (which the
watchers never enter) is refused. On a polled root (NFS/SMB) this makes invalidation as eager as inotify.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from cinecutd.config import Config
from cinecutd.pathmap import PathMap, PathRefused, relative_to_root, split_paths
from cinecutd.states import EventKind

if TYPE_CHECKING:
    from cinecutd.engine import Engine

log = structlog.get_logger("cinecutd.hints")

#: Paths one hint may name (a whole series renamed is a few hundred).
MAX_HINT_PATHS = 5000
#: Hints queued for the engine and not yet applied; beyond this a sender is told to retry (503).
MAX_PENDING_HINTS = 256
#: Renames and paths looked at per turn of the engine loop; the rest waits behind events queued meanwhile.
PATHS_PER_TURN = 32
#: A folder hint over this many known films becomes a rescan (run in slices), not a burst of stats.
FOLDER_RESCAN_FILMS = 200
#: Events that name no file, answered "ok" and otherwise ignored.
NO_FILE_EVENTS = frozenset({
    "grab", "movieadded", "seriesadd", "health", "healthissue", "healthrestored", "applicationupdate",
    "manualinteractionrequired", "test",
})


class HintRefused(Exception):
    """A hint not accepted; ``status`` is the HTTP status the webhook answers with."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass
class Hint:
    """What one Radarr/Sonarr event names: paths to look at, and renames (previous, new)."""

    source: str
    event: str
    paths: list[str] = field(default_factory=list)
    moves: list[tuple[str, str]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.paths and not self.moves

    def count(self) -> int:
        return len(self.paths) + 2 * len(self.moves)


# --------------------------------------------------------------------------------------------- parsing


def _get(obj: Any, *keys: str) -> Any:
    """Nested lookup that answers None on any other shape (payloads are untrusted)."""
    for key in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def _file_path(f: Any, folder: Any) -> str | None:
    """A file entry's ``path``, else ``folder`` + ``relativePath`` (older payloads)."""
    p = _get(f, "path")
    if isinstance(p, str) and p:
        return p
    rel = _get(f, "relativePath")
    if isinstance(rel, str) and rel and isinstance(folder, str) and folder:
        return folder.rstrip("/") + "/" + rel
    return None


def _entries(value: Any) -> list[Any]:
    if value is None or isinstance(value, bool):  # MovieDelete/SeriesDelete: deletedFiles is a flag
        return []
    if not isinstance(value, list):
        raise HintRefused(400, "bad_payload", "a list of files is not a JSON array")
    return value


def hint_from_payload(payload: Any) -> Hint:
    """The hint a Radarr or Sonarr webhook payload carries (an empty one for events naming no file).

    Radarr: ``movie.folderPath``, ``movieFile`` (Download, MovieFileDelete), ``deletedFiles[]`` (an upgrade's
    old files), ``renamedMovieFiles[]`` with ``previousPath`` (Rename), MovieDelete's folder. Sonarr the same
    with ``series.path``, ``episodeFile``/``episodeFiles[]``, ``renamedEpisodeFiles[]``, SeriesDelete.
    """
    if not isinstance(payload, dict):
        raise HintRefused(400, "bad_payload", "the body must be a JSON object")
    event = payload.get("eventType")
    if not isinstance(event, str) or not event:
        raise HintRefused(400, "bad_payload", 'no "eventType" string in the payload')
    source = "sonarr" if "series" in payload or "episodeFile" in payload else "radarr"
    hint = Hint(source, event[:64])
    ev = event.lower()
    if ev in NO_FILE_EVENTS:
        return hint
    folder = _get(payload, "movie", "folderPath") or _get(payload, "series", "path")
    for key in ("movieFile", "episodeFile"):
        p = _file_path(payload.get(key), folder)
        if p:
            hint.paths.append(p)
    for key in ("episodeFiles", "deletedFiles"):
        for f in _entries(payload.get(key)):
            p = _file_path(f, folder)
            if p:
                hint.paths.append(p)
    for key in ("renamedMovieFiles", "renamedEpisodeFiles"):
        for f in _entries(payload.get(key)):
            new, old = _file_path(f, folder), _get(f, "previousPath")
            if new and isinstance(old, str) and old:
                hint.moves.append((old, new))
            elif new:
                hint.paths.append(new)
    if ev in ("moviedelete", "seriesdelete") and isinstance(folder, str) and folder:
        hint.paths.append(folder)
    return hint


def hint_from_env(env: Mapping[str, str]) -> Hint:
    """The hint of a custom-script run: Radarr_* / Sonarr_* variables (read case-insensitively: .NET's
    StringDictionary hands them to the script in lower case)."""
    low = {k.lower(): v for k, v in env.items() if k.lower().startswith(("radarr_", "sonarr_"))}
    app = "sonarr" if "sonarr_eventtype" in low else "radarr"

    def var(name: str) -> str:
        return low.get(f"{app}_{name}", "")

    hint = Hint(app, var("eventtype")[:64])
    ev = hint.event.lower()
    if not ev or ev in NO_FILE_EVENTS:
        return hint
    kind = "moviefile" if app == "radarr" else "episodefile"
    folder = var("movie_path") if app == "radarr" else var("series_path")
    if ev == "rename":
        new, old = split_paths(var(f"{kind}_paths")), split_paths(var(f"{kind}_previouspaths"))
        if len(new) == len(old):
            hint.moves += list(zip(old, new, strict=True))
        else:  # lists that do not pair up: look at every path named
            hint.paths += new + old
        return hint
    hint.paths += split_paths(var(f"{kind}_path"))
    hint.paths += split_paths(var("deletedpaths"))
    if ev in ("moviedelete", "seriesdelete") and folder:
        hint.paths.append(folder)
    return hint


def hint_from_request(req: Mapping[str, Any]) -> Hint:
    """The control socket's ``hint`` command: ``{"event", "source", "paths": [..], "moves": [[old, new], ..]}``."""
    paths = req.get("paths") or []
    moves = req.get("moves") or []
    if not all(isinstance(p, str) for p in paths):
        raise HintRefused(400, "bad_request", "hint: 'paths' must be an array of strings")
    if not all(isinstance(m, list) and len(m) == 2 and all(isinstance(p, str) for p in m) for m in moves):
        raise HintRefused(400, "bad_request", "hint: 'moves' must be an array of [previous, new] path pairs")
    return Hint(str(req.get("source") or "script")[:32], str(req.get("event") or "")[:64], list(paths),
                [(m[0], m[1]) for m in moves])


# --------------------------------------------------------------------------------------------- the sink


class HintSink:
    """Checks hints (mapping, libraries, limits) on the caller's thread and posts them to the engine.

    Thread-safe: the webhook's threads and the control socket's workers call :meth:`submit`; the engine
    applies each hint on its own thread, between other queued events, with no wait for the caller.
    """

    def __init__(self, engine: Engine, config: Config) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._pending = 0
        self.stats: dict[str, Any] = {"accepted": 0, "refused": 0, "ignored": 0, "paths": 0, "last": None}
        self._folders: dict[Path, list[Path]] | None = None  # engine thread only
        self.reconfigure(config)

    def reconfigure(self, config: Config) -> None:
        self._map = PathMap(config.path_maps)
        self._roots = [str(lib.path) for lib in config.libraries]

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {**self.stats, "pending": self._pending}

    def refused(self) -> None:
        with self._lock:
            self.stats["refused"] += 1

    def submit(self, hint: Hint) -> dict[str, Any]:
        """Map and check every path, then queue the hint; HintRefused names what is wrong."""
        if hint.count() > MAX_HINT_PATHS:
            self.refused()
            raise HintRefused(413, "too_many_paths", f"{hint.count()} paths in one event (at most {MAX_HINT_PATHS})")
        try:
            paths = [self._map(p) for p in hint.paths]
            moves = [(self._map(a), self._map(b)) for a, b in hint.moves]
        except PathRefused as exc:
            self.refused()
            raise HintRefused(422, "bad_path", str(exc)) from None
        outside = sorted({p for p in [*paths, *(q for m in moves for q in m)] if not self._below_a_root(p)})
        if outside:
            self.refused()
            shown = ", ".join(outside[:5]) + (f" and {len(outside) - 5} more" if len(outside) > 5 else "")
            raise HintRefused(422, "outside_libraries",
                              f"not below any library root: {shown} (check [[path_map]]: the paths Radarr/Sonarr "
                              f"send must map into {', '.join(self._roots)})")
        mapped = Hint(hint.source, hint.event, list(dict.fromkeys(paths)), list(dict.fromkeys(moves)))
        with self._lock:
            if mapped.empty:
                self.stats["ignored"] += 1
                return {"queued": False, "event": hint.event, "paths": 0, "moves": 0}
            if self._pending >= MAX_PENDING_HINTS:
                self.stats["refused"] += 1
                raise HintRefused(503, "busy", f"{self._pending} hints are waiting for the daemon; retry later")
            self._pending += 1
            self.stats["accepted"] += 1
            self.stats["paths"] += mapped.count()
            self.stats["last"] = {"source": hint.source, "event": hint.event, "at": time.time()}
        t0 = time.monotonic()
        self.engine.post_hint(lambda: self._apply(mapped, t0))
        log.info("hint", source=hint.source, arr_event=hint.event, paths=mapped.paths[:20],
                 moves=[list(m) for m in mapped.moves[:20]])
        return {"queued": True, "event": hint.event, "paths": len(mapped.paths), "moves": len(mapped.moves)}

    def _below_a_root(self, path: str) -> bool:
        return any(relative_to_root(path, root) is not None for root in self._roots)

    # ------------------------------------------------------------------------- on the engine thread
    def _apply(self, hint: Hint, t0: float, start: int = 0) -> None:
        """Up to PATHS_PER_TURN of the hint's renames and paths, then the rest behind whatever was queued
        meanwhile: a series renamed on a slow NAS must not hold up the other libraries' events."""
        more = False
        try:
            if start == 0:
                self.engine.reg.counters["hints"] += 1
            self._folders = None
            total = len(hint.moves) + len(hint.paths)
            end = min(total, start + PATHS_PER_TURN)
            for i in range(start, end):
                if i < len(hint.moves):
                    self._move(Path(hint.moves[i][0]), Path(hint.moves[i][1]), t0)
                else:
                    self._look(Path(hint.paths[i - len(hint.moves)]), t0)
            if end < total:
                self.engine.post_hint(lambda: self._apply(hint, t0, end))
                more = True
        except Exception as exc:  # one bad hint must never stop the daemon
            log.error("hint_failed", arr_event=hint.event, error=repr(exc))
            self.engine.reg.counters["errors"] += 1
        finally:
            self._folders = None
            if not more:
                with self._lock:
                    self._pending -= 1

    def _films_under(self, folder: Path) -> list[Path]:
        """Registered films below ``folder``, from an index of every film's folders built once per hint
        (a hint naming thousands of folders must not cost thousands of walks over the registry)."""
        if self._folders is None:
            index: dict[Path, list[Path]] = {}
            for film, state in self.engine.reg.films.items():
                for parent in film.parents:
                    index.setdefault(parent, []).append(film)
                    if parent == state.root:
                        break
            self._folders = index
        return self._folders.get(folder, [])

    def _usable(self, path: Path) -> bool:
        """Below a root the engine watches now, with no symlinked folder on the way (the watchers never
        enter one, so neither does a hint)."""
        eng = self.engine
        lib = eng.library_for(path)
        if lib is None or path == lib.path:
            return False
        parent = path.parent
        if os.path.realpath(parent) != str(parent):
            eng.reg.counters["hints_refused_symlink"] += 1
            log.warning("hint_refused", path=str(path), reason="reached through a symlinked folder")
            return False
        return True

    def _event(self, kind: str, src: Path, dest: Path | None = None, *, is_dir: bool = False, t0: float) -> None:
        from cinecutd.intake import FsEvent

        self.engine.reg.counters["hint_events"] += 1
        self.engine.intake.handle(FsEvent(kind, str(src), str(dest) if dest else None, is_dir, t0))

    def _look(self, path: Path, t0: float) -> None:
        """What inotify would have reported for ``path``, judged by what is on disk now."""
        if not self._usable(path):
            return
        reg = self.engine.reg
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            # As inotify would report it: a known film is gone (its work dir is kept as an orphan), a
            # subtitle's film is looked at once things are quiet, anything else is nothing to the engine.
            is_dir = path not in reg.films and bool(self._films_under(path))
            self._event(EventKind.DELETED, path, is_dir=is_dir, t0=t0)
            return
        except OSError as exc:
            log.warning("hint_unreadable", path=str(path), error=str(exc))
            return
        if stat.S_ISDIR(st.st_mode):
            films = [f for f in self._films_under(path) if f in reg.films]
            if len(films) > FOLDER_RESCAN_FILMS:  # a whole library folder: the sliced rescan looks instead
                reg.counters["hint_rescans"] += 1
                self.engine.request_reconcile(f"hint naming a folder of {len(films)} films")
                return
            self._event(EventKind.CREATED, path, is_dir=True, t0=t0)  # films new to the daemon are found
            for film in films:
                self._event(EventKind.MODIFIED, film, t0=t0)
        else:
            self._event(EventKind.MODIFIED if path in reg.films else EventKind.CREATED, path, t0=t0)

    def _move(self, old: Path, new: Path, t0: float) -> None:
        """A rename is acted on as one only when the disk agrees: ``old`` gone, ``new`` there."""
        if not (self._usable(old) and self._usable(new)):
            return
        reg = self.engine.reg
        if not os.path.lexists(new):
            reg.counters["hints_ignored"] += 1
            log.info("hint_ignored", previous=str(old), path=str(new), reason="the new path does not exist")
            return
        if os.path.lexists(old):  # not a rename on disk (a copy, or a forged event): look at both
            self._look(old, t0)
            self._look(new, t0)
            return
        old_dir, new_dir = old.parent, new.parent
        if old_dir != new_dir and not os.path.lexists(old_dir) and os.path.isdir(new_dir):
            # A folder on the way was renamed (Radarr's "Movie Folder Format", a Sonarr series folder): post
            # what inotify reports, the renamed folder's move (so the work dirs in it travel along), then the
            # file's rename inside it.
            a, b = old_dir, new_dir
            while a.name == b.name and a.parent != a and b.parent != b:
                a, b = a.parent, b.parent
            if self._usable(a) and self._usable(b) and not os.path.lexists(a) and self._films_under(a):
                self._event(EventKind.MOVED, a, b, is_dir=True, t0=t0)
                self._folders = None
            if new_dir / old.name in reg.films:  # it travelled with its folder: renamed inside it, if at all
                old = new_dir / old.name
            if old == new:
                return
        if new in reg.films and old not in reg.films:
            self._look(new, t0)  # the move was seen already (inotify, a poll, a duplicate event)
            return
        self._event(EventKind.MOVED, old, new, t0=t0)
