"""gc reclaims only what is provably ours: a folder merely named like a work dir is never touched.

A user's own ``Holiday_cinecut_work/`` (a ``Holiday_proxy.mp4`` and a ``keyframes/`` folder, no film
``Holiday.*``, nothing in upstream's format) must be listed as not recognised and kept, by ``cinecutd gc
--apply`` and by ``orphans = "reclaim"`` at start. A real orphan (valid checkpoint, valid cache, or our
stamps sidecar naming the film the folder is named after) is still reclaimed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cinecut.workdir import STAMPS_NAME
from tests.harness.checks import work_state
from tests.harness.films import make_film_with_work_dir
from tests.harness.runner import DaemonRunner, Library, daemon_command

OLD_NS = 1_400_000_000_000_000_000


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[DaemonRunner]:
    with DaemonRunner(tmp_path) as r:
        yield r


def _users_folder(folder: Path, stem: str, extra: dict[str, bytes] | None = None) -> Path:
    """A folder of the user's that looks like a work dir: proxy-named video, keyframe-named JPEGs."""
    wd = folder / f"{stem}_cinecut_work"
    (wd / "keyframes").mkdir(parents=True)
    (wd / f"{stem}_proxy.mp4").write_bytes(b"my own holiday video " * 400)
    for i in range(3):
        (wd / "keyframes" / f"frame_{1000 * (i + 1):010d}.jpg").write_bytes(b"\xff\xd8\xff\xe0 my photo" + bytes([i]) * 50)
    for name, data in (extra or {}).items():
        (wd / name).write_bytes(data)
    for p in [wd, *wd.rglob("*")]:
        os.utime(p, ns=(OLD_NS, OLD_NS), follow_symlinks=False)
    return wd


def _tree(root: Path) -> dict[str, tuple[bytes | None, int]]:
    return {str(p): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns) for p in [root, *root.rglob("*")]}


def _gc(d, *args: str) -> dict:
    out = subprocess.run([*daemon_command(), "gc", "--socket", str(d.socket), "--json", *args],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_a_users_folder_named_like_a_work_dir_is_never_reclaimed(runner: DaemonRunner) -> None:
    lib = runner.library()
    donor = make_film_with_work_dir(lib / "Donor", "Donor")  # a real sidecar, naming another film
    folders = [
        _users_folder(lib / "Trips", "Holiday"),  # the reported case
        _users_folder(lib / "Trips", "Summer", {"keyframe_timestamps.json": b"[1.0, 2.0, 3.0]",
                                                 "cinecut.lock": b"", "notes.txt": b"mine"}),
        _users_folder(lib / "Trips", "Winter", {"pipeline_checkpoint.json": b'{"source_file": "/x", "vibe": 1}',
                                                 "Winter.scenedesc.msgpack": b"\x82\xa8metadata\xc0"}),
        _users_folder(lib / "Trips", "Spring", {STAMPS_NAME: (donor.wd.path / STAMPS_NAME).read_bytes()}),
        _users_folder(lib / "Trips", "Mr. Autumn"),
    ]
    # A real orphan beside them: its film was deleted; its checkpoint and cache prove the folder is ours.
    gone = make_film_with_work_dir(lib / "Gone", "Gone")
    gone.path.unlink()
    # Another real one proved only by our stamps sidecar (no checkpoint, no cache).
    stamped = make_film_with_work_dir(lib / "Stamped", "Stamped")
    (stamped.wd.path / "pipeline_checkpoint.json").unlink()
    stamped.wd.cache_path.unlink()
    stamped.path.unlink()
    shutil.rmtree(donor.path.parent)
    before = {str(f): _tree(f) for f in folders}

    d = runner.start([Library(lib)], daemon={"orphans": "reclaim", "orphan_grace_days": 0})

    assert {str(f): _tree(f) for f in folders} == before, "orphans = reclaim touched a user's folder at start"
    s = work_state(gone)
    assert not s.cache_file and not s.proxy and s.keyframes == 0, "the real orphan was not reclaimed"
    assert not stamped.wd.proxy_path.exists() and not list(stamped.wd.keyframes_dir.glob("frame_*.jpg"))

    for args in ((), ("--apply",)):
        result = _gc(d, *args)
        by_dir = {o["work_dir"]: o for o in result["orphans"]}
        for f in folders:
            o = by_dir[str(f)]
            assert o["recognised"] is False and o["reclaimable"] == [] and o["bytes"] == 0, o
            assert "not recognised" in o["note"], o
        assert {str(f): _tree(f) for f in folders} == before, f"gc {' '.join(args)} touched a user's folder"
    human = subprocess.run([*daemon_command(), "gc", "--socket", str(d.socket)], capture_output=True, text=True,
                           timeout=60)
    assert human.returncode == 0 and "not recognised" in human.stdout, human.stdout + human.stderr
