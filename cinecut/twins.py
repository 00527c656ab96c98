"""Same-stem twins: ``Heat.mkv`` and ``Heat.mp4`` in one folder map to ONE work dir, ``Heat_cinecut_work``.

Upstream does not notice; a run for either twin would silently take the other's results over, and runs
alternating between them would flap (each discarding the other's work). The work dir belongs to the film
its records name (:mod:`cinecut.ownership`); a run for its twin is refused unless the caller explicitly
takes the work dir over.
"""

from __future__ import annotations

import os

from cinecut.ownership import read_evidence_at
from cinecut.paths import same_film_path
from cinecut.workdir import WorkDir


class TwinConflict(Exception):
    """The work dir holds the results of a same-stem twin that still exists."""

    def __init__(self, film: str, owner: str, work_dir: str) -> None:
        self.film, self.owner, self.work_dir = film, owner, work_dir
        super().__init__(
            f"{work_dir} holds the results of {owner}, a film with the same stem as {film} "
            "(both map to this work dir, for CineCut too). Analysing it here would discard those results: "
            "rename one of the two films, or pass --take-over to reset the work dir for this film."
        )


def twin_owner_at(dir_fd: int, wd: WorkDir) -> str | None:
    """The same-stem twin that owns ``wd`` instead of ``wd.film``, or None when the work dir is this film's
    (or nobody's, or its recorded film is gone: a renamed or replaced film is not a twin)."""
    owner = read_evidence_at(dir_fd, wd.stem).named  # the film the results name (realpath), if any
    if owner is None or not os.path.isabs(owner) or same_film_path(owner, wd.film):
        return None
    if not os.path.lexists(owner):
        return None
    if not same_film_path(WorkDir.for_film(owner).path, wd.path):
        return None  # a record naming a film elsewhere (a copied folder) is not a twin's claim
    return owner
