"""Same-stem twins: ``Heat.mkv`` and ``Heat.mp4`` in one folder map to ONE work dir, ``Heat_cinecut_work``.

Upstream does not notice; a run for either twin would silently take the other's results over, and runs
alternating between them would flap (each discarding the other's work). The work dir belongs to the film
its records name (the checkpoint's ``source_file``, else our stamps sidecar's, else the cache's); a run for
its twin is refused unless the caller explicitly takes the work dir over.
"""

from __future__ import annotations

import os

from cinecut import safefs
from cinecut.checkpoint import read_checkpoint_at
from cinecut.inference.cache import metadata_from_fd
from cinecut.paths import same_film_path
from cinecut.stamps import read_stamps_at
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


def recorded_owner_at(dir_fd: int, wd: WorkDir) -> str | None:
    """The film a work dir's records name: checkpoint first (upstream's own), then our sidecar, then the
    cache's metadata. None when nothing names a film."""
    ckpt = read_checkpoint_at(dir_fd).checkpoint
    if ckpt is not None:
        return ckpt.source_file
    stamps = read_stamps_at(dir_fd)
    if stamps is not None:
        return stamps.source_file
    try:
        fd = safefs.open_regular(dir_fd, wd.cache_name)
    except OSError:
        return None
    try:
        meta = metadata_from_fd(fd)
    finally:
        os.close(fd)
    return meta.source_file if meta is not None else None


def twin_owner_at(dir_fd: int, wd: WorkDir) -> str | None:
    """The same-stem twin that owns ``wd`` instead of ``wd.film``, or None when the work dir is this film's
    (or nobody's, or its recorded film is gone: a renamed or replaced film is not a twin)."""
    owner = recorded_owner_at(dir_fd, wd)
    if owner is None or not os.path.isabs(owner) or same_film_path(owner, wd.film):
        return None
    if not os.path.lexists(owner):
        return None
    if not same_film_path(WorkDir.for_film(owner).path, wd.path):
        return None  # a record naming a film elsewhere (a copied folder) is not a twin's claim
    return owner
