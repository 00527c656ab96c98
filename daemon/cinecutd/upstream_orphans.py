"""Recognise a film renamed while the daemon was down from upstream's own cache, without a sidecar of ours.

The daemon writes nothing into a work dir that nothing changed, so a library upstream wrote has no
stamps sidecar to name the film (and its inode) a work dir belongs to. Upstream's cache does name it:
its metadata holds the film's path and its exact ``st_mtime``/``st_size``. A rename keeps both stamp
values (float ``==``), so an orphaned work dir whose cache names a path that is gone, and whose name is
that path's own work dir, belongs to the one homeless film with that very stamp.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from cinecut.inference.cache import read_cache_metadata
from cinecut.stamp import SourceStamp
from cinecut.workdir import CACHE_SUFFIX, STAMPS_NAME, WorkDir, stem_of_work_dir


def orphans_by_cache_stamp(orphaned: Iterable[Path]) -> dict[SourceStamp, Path]:
    """Orphaned work dirs without our sidecar: the film each one's cache names, keyed by the cache stamp.

    Only a cache naming a film whose own work dir this is (the stem matches) and which is gone counts;
    a stamp two orphans share is ambiguous and left out (neither follows: never guess).
    """
    out: dict[SourceStamp, Path] = {}
    shared: set[SourceStamp] = set()
    for wd in orphaned:
        if os.path.lexists(wd / STAMPS_NAME):
            continue  # our record decides (by inode) elsewhere
        stem = stem_of_work_dir(wd.name)
        meta = read_cache_metadata(wd / f"{stem}{CACHE_SUFFIX}")
        if meta is None or not os.path.isabs(meta.source_file):
            continue
        old = Path(meta.source_file)
        if old.stem != stem or os.path.lexists(old) or WorkDir.for_film(old).path != wd:
            continue
        if meta.stamp in out:
            shared.add(meta.stamp)
        out[meta.stamp] = old
    for stamp in shared:
        del out[stamp]
    return out
