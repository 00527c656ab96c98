"""The daemon's in-memory view of the libraries: a cache of the filesystem that a rescan rebuilds.

Nothing here is authoritative. Film states hold what the last look at the disk found, so an event that
brings nothing new (the 2,000th modify of a slow copy) costs one ``stat`` and one dict lookup.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cinecut.evidence import Verification
from cinecut.inference.cache import CacheState
from cinecut.stamp import SourceStamp
from cinecut.stamps import InputStamps
from cinecut.workdir import WorkDir
from cinecutd.states import Deferral, RootStatus

if TYPE_CHECKING:
    from cinecutd.judged import Judged


@dataclass(slots=True)
class FilmState:
    """What the daemon last saw of one film."""

    film: Path
    root: Path
    work_dir: Path
    subtitles: tuple[Path, ...] = ()
    stamp: SourceStamp | None = None
    inode: int | None = None
    device: int | None = None
    cache: CacheState = CacheState.MISSING  # set by cinecutd.queries.cache_validity only
    cache_records: int | None = None
    has_work_dir: bool = False
    last_event: tuple[str, float] | None = None  # (kind, wall time)
    last_change: float = 0.0  # monotonic time the stamp last moved
    settle_due: float | None = None  # monotonic deadline of the final revalidation after a burst
    pending: Deferral | None = None  # a judgement waiting for a pipeline's lock (its trigger, since when)
    stale_fixed: int = 0
    conflict: bool = False
    refused: str | None = None
    verification: Verification | None = None  # what proves its stages' film: recorded | cache | proxy | unverified | nothing
    baseline: InputStamps | None = None  # stamps first seen of a work dir without our sidecar (detects, never certifies)
    wd: WorkDir | None = None
    folder: Path | None = None  # film.parent, computed once (pathlib objects are costly at 10,000 films)
    judged: Judged | None = None  # its last judgement that found nothing to do, and its inputs' stats

    def __post_init__(self) -> None:
        if self.wd is None:
            self.wd = WorkDir(self.film, self.work_dir)
        if self.folder is None:
            self.folder = self.film.parent

    def settled(self, now: float, settle_seconds: float) -> bool:
        return self.stamp is not None and now - self.last_change >= settle_seconds and self.settle_due is None


@dataclass(slots=True)
class RootState:
    path: Path
    watch: str
    state: RootStatus = RootStatus.STARTING  # degraded: a watch died (detail says why)
    films: int = 0
    detail: str = ""


@dataclass(slots=True)
class Registry:
    """All films, orphans, conflicts and recent history."""

    films: dict[Path, FilmState] = field(default_factory=dict)
    by_folder: dict[Path, set[Path]] = field(default_factory=dict)
    #: Films by the work dir they map to (two when same-stem twins share one): claims found in O(1),
    #: never by scanning a folder's films, which is quadratic in a flat library.
    by_work_dir: dict[Path, set[Path]] = field(default_factory=dict)
    orphans: dict[Path, float] = field(default_factory=dict)  # work dir -> first seen orphaned (wall)
    conflicts: dict[Path, list[Path]] = field(default_factory=dict)
    roots: dict[Path, RootState] = field(default_factory=dict)
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    recent: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=50))
    counters: Counter[str] = field(default_factory=Counter)
    started_at: float = field(default_factory=time.time)

    def add(self, state: FilmState) -> FilmState:
        old = self.films.get(state.film)
        if old is not None and old is not state:
            self.remove(state.film)
        self.films[state.film] = state
        self.by_folder.setdefault(state.folder, set()).add(state.film)
        self.by_work_dir.setdefault(state.work_dir, set()).add(state.film)
        return state

    def remove(self, film: Path) -> FilmState | None:
        state = self.films.pop(film, None)
        if state is not None:
            folder = self.by_folder.get(state.folder)
            if folder is not None:
                folder.discard(film)
                if not folder:
                    del self.by_folder[state.folder]
            claim = self.by_work_dir.get(state.work_dir)
            if claim is not None:
                claim.discard(film)
                if not claim:
                    del self.by_work_dir[state.work_dir]
        return state

    def films_in(self, folder: Path) -> set[Path]:
        return self.by_folder.get(folder, set())

    def claimants(self, work_dir: Path) -> set[Path]:
        """The registered films whose work dir is ``work_dir``."""
        return self.by_work_dir.get(work_dir, set())

    def films_under(self, prefix: Path) -> list[Path]:
        """Films whose path is inside ``prefix`` (a moved or deleted folder)."""
        return [f for f in self.films if f.is_relative_to(prefix)]

    def root_of(self, path: Path) -> Path | None:
        for root in self.roots:
            if path == root or path.is_relative_to(root):
                return root
        return None
