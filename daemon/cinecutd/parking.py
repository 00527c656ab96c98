"""Names taken over: results parked for a file that left its name, and films hiding under ignored names.

``mv A.mkv .swap; mv B.mkv A.mkv`` hands A's name, and with it A's work dir, to B. Judged against B, A's
results would be wiped; they are parked instead (a hidden name in the same folder, :func:`park_work_dir`)
and handed back when A's file (its device and inode) shows up under a film name again. :class:`Parking`
is the one owner of that memory: which results wait for which file, and which films hide under a name the
scan ignores (so that a newcomer on their old name never inherits their results). Carrying parked results
back is a move like any other: :class:`cinecutd.moves.Moves` does it, through its one ownership check.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import structlog

from cinecut.locks import LockBusy
from cinecut.ownership import Evidence, Identity, read_evidence, real
from cinecutd.migrate import MigrationError, park_work_dir
from cinecutd.registry import FilmState, Registry
from cinecutd.sightings import GONE_MEMORY_S, Sightings

log = structlog.get_logger("cinecutd")


def identity_of(state: FilmState) -> Identity | None:
    """The film's (device, inode), once a ``stat`` gave them."""
    return (state.device, state.inode) if state.device is not None and state.inode is not None else None


def owner_present(reg: Registry, ev: Evidence, wd: Path, film: Path) -> bool:
    """The film that ``wd``'s results name is still there under that name (a twin of ``film``)."""
    for f in reg.films_in(wd.parent):
        other = reg.films[f]
        if f == film or other.work_dir != wd or real(f) != ev.named:
            continue
        if ev.identity is None or ev.identity == identity_of(other):
            return True
    return False


@dataclass(frozen=True, slots=True)
class Parked:
    """Results moved out of a taken name, waiting for the file that made them."""

    place: Path  # the hidden work dir they wait in
    named: Path  # the film path they were made under
    at: float  # monotonic time they were parked


class Parking:
    """Parked results by the (device, inode) of their file, and films hiding under ignored names."""

    def __init__(self, reg: Registry, seen: Sightings) -> None:
        self.reg = reg
        # Vanished films: the file last seen under a path owns results without a commit mark of ours.
        self.seen = seen
        # Work dirs moved out of the way of a film that took their name, by the file whose results they hold.
        self.parked: dict[Identity, Parked] = {}
        # Films renamed to a name the scan ignores inside a library (``.swap``, ``.part``): still there, by
        # (device, inode) -> (hidden path, when). Their results are parked, never judged, if another file
        # lands on their old name meanwhile.
        self.hiding: dict[Identity, tuple[Path, float]] = {}

    # ----------------------------------------------------------------- films hiding
    def hidden(self, identity: Identity, dest: Path) -> None:
        self.hiding[identity] = (dest, time.monotonic())

    def path_gone(self, path: Path) -> None:
        """A film hiding under an ignored name was deleted there: no longer anyone's to wait for."""
        if self.hiding:
            self.hiding = {k: v for k, v in self.hiding.items() if v[0] != path}

    def reappeared(self, identity: Identity, now: float) -> None:
        """A file showed up under a film name: it hides no more (and old hiding places lapse)."""
        self.hiding.pop(identity, None)
        self.hiding = {k: v for k, v in self.hiding.items() if now - v[1] < GONE_MEMORY_S}

    # ----------------------------------------------------------------- parked results
    def get(self, identity: Identity) -> Parked | None:
        return self.parked.get(identity)

    def take(self, identity: Identity) -> Parked | None:
        return self.parked.pop(identity, None)

    def emptied(self, place: Path) -> None:
        """The results parked at ``place`` were carried to their file."""
        self.parked = {k: v for k, v in self.parked.items() if v.place != place}

    def due(self) -> Iterator[tuple[Identity, Parked, FilmState]]:
        """Parked results whose file is registered under a name with a free work dir (a move that just
        vacated that name, or a park made after the file arrived). Lazy: each hand-back the caller makes
        may carry or drop other entries, which are then skipped; each removes one, so a caller's loop ends."""
        if not self.parked:
            return
        by_identity = {identity_of(s): s for s in self.reg.films.values() if s.inode is not None}
        for key, parked in list(self.parked.items()):
            state = by_identity.get(key)
            if state is None or key not in self.parked or os.path.lexists(state.work_dir):
                continue
            if not os.path.lexists(parked.place):
                del self.parked[key]
                continue
            yield key, parked, state

    def make_room(self, wd: Path, film: Path, identity: Identity | None) -> bool:
        """``film`` (``identity``) took a name whose work dir ``wd`` holds other results. If their file left
        the name (deleted, moved, or hiding under a name the scan ignores), park them instead of judging
        them against the newcomer: they go back to their file if it reappears. False (nothing moved) when
        their owner is still there (a same-stem twin), when they may be this very file's, or when nothing in
        them says whose they are. Raises LockBusy while a pipeline holds ``wd``."""
        reg = self.reg
        ev = read_evidence(wd, film.stem)
        if ev is None or ev.named is None or (identity is not None and ev.identity == identity):
            return False
        if owner_present(reg, ev, wd, film):
            return False
        owner = ev.identity
        if owner is None:  # no commit mark: the file the daemon last saw under the named path, if any
            owner = self.seen.last_seen_as(ev.named)
        if owner is None:
            return False
        try:
            parked = park_work_dir(wd, owner)
        except (MigrationError, OSError) as exc:
            log.warning("park_failed", work_dir=str(wd), error=str(exc))
            return False
        self.parked[owner] = Parked(parked, Path(ev.named), time.monotonic())
        reg.orphans.pop(wd, None)
        reg.orphans.setdefault(parked, time.time())
        reg.counters["parked"] += 1
        log.info("parked", work_dir=str(wd), parked=str(parked), results_of=ev.named, film=str(film),
                 reason="the file that made them left the name")
        return True

    def for_newcomer(self, state: FilmState, moving: Callable[[Identity], bool]) -> bool:
        """A new file landed on a name whose work dir holds the results of a film that is hiding under an
        ignored name (``mv A.mkv .swap; mv B.mkv A.mkv`` seen as a creation: B came from another root), or
        whose move (``moving``) is on its way. Park them for their file's return instead of judging them
        against the newcomer. True if they were parked; a pipeline writing them leaves them (the film is
        deferred, and this is asked again before it is judged)."""
        if not os.path.lexists(state.work_dir):
            return False
        ev = read_evidence(state.work_dir, state.film.stem)
        if ev is None or ev.named is None:
            return False
        owner = ev.identity or self.seen.last_seen_as(ev.named)
        # Still hiding, or moved on from there (its next move may still be queued, or waiting for a lock to
        # carry these very results): either way they are no newcomer's. A hidden file seen deleted is
        # forgotten (``path_gone``).
        if owner is None or owner == identity_of(state):
            return False
        if owner not in self.hiding and not moving(owner):
            return False
        try:
            return self.make_room(state.work_dir, state.film, identity_of(state))
        except LockBusy:
            return False


__all__ = ["Parked", "Parking", "identity_of", "owner_present"]
