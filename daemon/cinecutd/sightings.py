"""Films remembered by (device, inode) for a while: those that vanished, and those that arrived without a
work dir.

A move across watches (two roots, two observers, or a folder that left a root) reaches the daemon as a
deletion and a creation, in either order. Whichever half comes first is remembered here, so the second
half can pair with it and the work dir can follow the file (:class:`cinecutd.moves.Moves` carries it).
The same memory names the file last seen under a path, for results that carry no commit mark of ours.
Every memory lapses after ``GONE_MEMORY_S``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cinecut.ownership import Identity, real
from cinecut.stamp import SourceStamp

#: How long a vanished film is remembered by inode, to recognise a move across roots (delete + create).
GONE_MEMORY_S = 600.0


@dataclass(frozen=True, slots=True)
class Sighting:
    """Where a file was last seen as a film, with what content, when (monotonic)."""

    path: Path
    stamp: SourceStamp
    at: float


class Sightings:
    """The two halves of moves across watches, waiting for each other."""

    def __init__(self) -> None:
        self.gone: dict[Identity, Sighting] = {}
        # New films that arrived without a work dir: when a move's deletion half is reported after its
        # creation half, the vanished film's results still follow.
        self.fresh: dict[Identity, Sighting] = {}

    def vanished(self, identity: Identity, path: Path, stamp: SourceStamp, now: float) -> None:
        self.gone[identity] = Sighting(path, stamp, now)

    def arrived(self, identity: Identity, path: Path, stamp: SourceStamp, now: float) -> None:
        """A new film without a work dir: the other half of a move whose deletion may come later."""
        self.fresh[identity] = Sighting(path, stamp, now)

    def arrival_of(self, identity: Identity, stamp: SourceStamp, now: float) -> Path | None:
        """Where a vanished file (``identity``, same content) already arrived, if it did lately."""
        twin = self.fresh.pop(identity, None)
        if twin is None or twin.stamp != stamp or now - twin.at >= GONE_MEMORY_S:
            return None
        return twin.path

    def departure_of(self, identity: Identity, now: float) -> Sighting | None:
        """Where an arriving file was seen vanishing, taken from the memory (which then drops what lapsed)."""
        gone = self.gone.pop(identity, None)
        self.gone = {k: v for k, v in self.gone.items() if now - v.at < GONE_MEMORY_S}
        self.fresh = {k: v for k, v in self.fresh.items() if now - v.at < GONE_MEMORY_S}
        return gone

    def last_seen_as(self, named: str) -> Identity | None:
        """The vanished file last seen under the path ``named`` (a realpath), if any."""
        return next((k for k, v in self.gone.items() if real(v.path) == named), None)


__all__ = ["GONE_MEMORY_S", "Sighting", "Sightings"]
