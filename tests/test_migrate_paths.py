"""A work-dir move rewrites exactly the names that derive from the film's stem, and nothing else.

Upstream derives three names from the stem: the work dir ``<stem>_cinecut_work``, the proxy
``<stem>_proxy.mp4`` and the cache ``<stem>.scenedesc.msgpack``. Every other name in a work dir
(``TRAILER_MANIFEST.json``, ``ASSEMBLY_MANIFEST.json``, ``trailer_final.mp4``, ``keyframes/...``) is fixed,
so a stem that happens to prefix one of them (``T`` and ``TRAILER_MANIFEST.json``) must not rename it in
the stored paths. Each case moves a real work dir with :func:`cinecutd.migrate.migrate_work_dir` and checks
that every path the checkpoint and the cache store exists afterwards and is under the new work dir.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cinecut.checkpoint import load_checkpoint
from cinecut.inference.cache import read_cache_file
from cinecut.workdir import ASSEMBLY_MANIFEST_NAME, TRAILER_MANIFEST_NAME, WorkDir
from cinecutd.migrate import migrate_work_dir
from tests.harness.films import ALL_STAGES, Film, make_film_with_work_dir

#: (old stem, new stem): stems that prefix a fixed name, equal a later-stage output's prefix, or carry
#: regex metacharacters and path-looking characters.
CASES = [
    ("T", "XT"),
    ("TRAILER", "Other"),
    ("TRAILER_MANIFEST", "TRAILER_MANIFEST.json"),
    ("ASSEMBLY", "ASSEMBLY_MANIFEST"),
    ("trailer", "trailer_final"),
    ("keyframe", "keyframes"),
    ("A.(b)+[c]*?^$|{2}", "\\1 $0 .*"),
    ("Heat (1995)", "Heat (1995) Remux"),
    ("Heat", "Heat_proxy"),
]


def _later_stage_output(film: Film) -> None:
    """A later-stage output beside the manifests (a fixed name that a stem may prefix)."""
    (film.wd.path / "trailer_final.mp4").write_bytes(b"final cut")


@pytest.mark.parametrize(("old_stem", "new_stem"), CASES)
def test_only_stem_derived_names_are_rewritten(tmp_path: Path, old_stem: str, new_stem: str) -> None:
    film = make_film_with_work_dir(tmp_path / "lib" / "folder", old_stem, subtitles=(), trailer=None)
    _later_stage_output(film)
    new_path = film.path.with_name(new_stem + film.path.suffix)
    os.rename(film.path, new_path)

    migrate_work_dir(film.path, new_path)

    new = WorkDir.for_film(new_path)
    assert not os.path.lexists(film.wd.path)
    ckpt = load_checkpoint(new.path)
    assert ckpt is not None and ckpt.stages_complete == ALL_STAGES
    assert ckpt.source_file == str(new_path)
    assert ckpt.proxy_path == str(new.proxy_path) and new.proxy_path.is_file()
    assert ckpt.manifest_path == str(new.path / TRAILER_MANIFEST_NAME)
    assert ckpt.assembly_manifest_path == str(new.path / ASSEMBLY_MANIFEST_NAME)
    for stored in (ckpt.manifest_path, ckpt.assembly_manifest_path):
        assert Path(stored).is_file(), stored
    assert (new.path / "trailer_final.mp4").is_file()
    meta, results = read_cache_file(new.cache_path)
    assert meta.source_file == str(new_path)
    assert results and all(Path(r.frame_path).parent == new.keyframes_dir and Path(r.frame_path).is_file()
                           for r, _ in results)
