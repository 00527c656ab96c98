"""pipeline_checkpoint.json: upstream compatibility both ways, defensive reads, atomic and crash-safe saves."""

from __future__ import annotations

import json
import os
import random
import signal
import stat
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import upstream_reader as up

from cinecut.checkpoint import (
    CHECKPOINT_KEYS,
    MAX_CHECKPOINT_BYTES,
    CheckpointStatus,
    PipelineCheckpoint,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from cinecut.safefs import SymlinkRefused
from cinecut.workdir import WorkDir


def full_checkpoint(wd: Path, i: int = 0) -> PipelineCheckpoint:
    return PipelineCheckpoint(
        source_file=str(wd.parent / "Heat (1995).mkv"),
        vibe="noir ✦",
        stages_complete=["proxy", "subtitles", "keyframes", "structural"],
        proxy_path=str(wd / "Heat (1995)_proxy.mp4"),
        keyframe_count=1234 + i,
        dialogue_event_count=0,
        inference_complete=False,
        cache_hit=True,
        manifest_path=None,
        assembly_manifest_path=str(wd / "ASSEMBLY_MANIFEST.json"),
        proxy_duration_s=0.1 + 0.2,  # a float whose repr must survive exactly
        structural_anchors={"act1_end": 1800.5, "nested": {"beats": [1, 2.5, None]}},
    )


@pytest.fixture
def wd(tmp_path: Path) -> Path:
    folder = tmp_path / "lib" / "Heat (1995)"
    folder.mkdir(parents=True)
    (folder / "Heat (1995).mkv").write_bytes(b"film")
    return WorkDir.for_film(folder / "Heat (1995).mkv").path


def test_key_set_is_upstreams_exactly() -> None:
    assert frozenset(CHECKPOINT_KEYS) == up.UPSTREAM_CHECKPOINT_KEYS


def test_round_trip_every_key(wd: Path) -> None:
    ckpt = full_checkpoint(wd)
    path = save_checkpoint(ckpt, wd)
    assert path == wd / "pipeline_checkpoint.json"
    read = read_checkpoint(wd)
    assert read.status is CheckpointStatus.OK and read.reason is None
    assert read.checkpoint == ckpt
    assert read.checkpoint.proxy_duration_s == 0.1 + 0.2  # type: ignore[union-attr]
    assert not [p for p in wd.iterdir() if p.name.endswith(".tmp")]


def test_our_file_loads_with_upstream_exact_call(wd: Path) -> None:
    ckpt = full_checkpoint(wd)
    save_checkpoint(ckpt, wd)
    raw = json.loads((wd / "pipeline_checkpoint.json").read_text())
    assert set(raw) == up.UPSTREAM_CHECKPOINT_KEYS
    assert asdict(up.load_checkpoint_strict(wd)) == ckpt.to_dict()
    # All-null optional fields too (a fresh checkpoint after an invalidation).
    save_checkpoint(PipelineCheckpoint(source_file="/x/y.mkv", vibe="v"), wd)
    assert set(json.loads((wd / "pipeline_checkpoint.json").read_text())) == up.UPSTREAM_CHECKPOINT_KEYS
    assert up.load_checkpoint_strict(wd) == up.PipelineCheckpoint(source_file="/x/y.mkv", vibe="v")


def test_upstream_file_loads_and_resaves_without_new_keys(wd: Path) -> None:
    theirs = up.PipelineCheckpoint(**full_checkpoint(wd).to_dict())
    up.save_checkpoint(theirs, wd)
    ours = load_checkpoint(wd)
    assert ours is not None and ours.to_dict() == asdict(theirs)
    ours.mark_complete("narrative")
    ours.mark_complete("narrative")
    save_checkpoint(ours, wd)
    again = up.load_checkpoint_strict(wd)
    assert again.stages_complete == [*theirs.stages_complete, "narrative"]
    assert list(json.loads((wd / "pipeline_checkpoint.json").read_text())) == list(asdict(theirs))
    with pytest.raises(ValueError):
        ours.mark_complete("inference")  # not a stage name upstream records


CORRUPT = {
    "empty": (b"", "JSON"),
    "binary": (b"\xff\xfe\x00garbage", "JSON"),
    "not json": (b"source_file = 'x'", "JSON"),
    "top level list": (b"[]", "list"),
    "top level string": (b'"hello"', "str"),
    "extra key": (b'{"source_file": "a", "vibe": "b", "cinecut_video": 1}', "unknown keys"),
    "missing vibe": (b'{"source_file": "a"}', "vibe"),
    "source_file int": (b'{"source_file": 1, "vibe": "b"}', "source_file"),
    "stages string": (b'{"source_file": "a", "vibe": "b", "stages_complete": "proxy"}', "stages_complete"),
    "stages ints": (b'{"source_file": "a", "vibe": "b", "stages_complete": [1]}', "stages_complete"),
    "count str": (b'{"source_file": "a", "vibe": "b", "keyframe_count": "12"}', "keyframe_count"),
    "count negative": (b'{"source_file": "a", "vibe": "b", "keyframe_count": -1}', "keyframe_count"),
    "count bool": (b'{"source_file": "a", "vibe": "b", "dialogue_event_count": true}', "dialogue_event_count"),
    "count float": (b'{"source_file": "a", "vibe": "b", "keyframe_count": 1.5}', "keyframe_count"),
    "duration NaN": (b'{"source_file": "a", "vibe": "b", "proxy_duration_s": NaN}', "proxy_duration_s"),
    "duration inf": (b'{"source_file": "a", "vibe": "b", "proxy_duration_s": 1e999}', "proxy_duration_s"),
    "anchors list": (b'{"source_file": "a", "vibe": "b", "structural_anchors": []}', "structural_anchors"),
    "inference int": (b'{"source_file": "a", "vibe": "b", "inference_complete": 1}', "inference_complete"),
    "huge int": (b'{"source_file": "a", "vibe": "b", "keyframe_count": ' + b"9" * 5000 + b"}", "JSON"),
    "deep nesting": (b"[" * 200_000, "JSON"),
}


@pytest.mark.parametrize("label", sorted(CORRUPT))
def test_corrupt_checkpoint_is_unreadable_with_reason(wd: Path, label: str) -> None:
    data, hint = CORRUPT[label]
    wd.mkdir()
    (wd / "pipeline_checkpoint.json").write_bytes(data)
    read = read_checkpoint(wd)
    assert read.status is CheckpointStatus.UNREADABLE
    assert read.checkpoint is None
    assert read.reason and hint.lower() in read.reason.lower(), read.reason
    assert load_checkpoint(wd) is None


def test_truncated_at_every_point_is_unreadable(wd: Path) -> None:
    save_checkpoint(full_checkpoint(wd), wd)
    good = (wd / "pipeline_checkpoint.json").read_bytes().rstrip()
    for cut in range(0, len(good), 7):
        (wd / "pipeline_checkpoint.json").write_bytes(good[:cut])
        read = read_checkpoint(wd)
        assert read.status is CheckpointStatus.UNREADABLE and read.reason, cut


def test_missing_and_special_files(wd: Path, tmp_path: Path) -> None:
    assert read_checkpoint(wd).status is CheckpointStatus.MISSING  # no work dir at all
    wd.mkdir()
    assert read_checkpoint(wd).status is CheckpointStatus.MISSING
    ck = wd / "pipeline_checkpoint.json"
    os.mkfifo(ck)
    t0 = time.monotonic()
    read = read_checkpoint(wd)
    assert read.status is CheckpointStatus.UNREADABLE and read.reason
    assert time.monotonic() - t0 < 1.0
    ck.unlink()
    ck.mkdir()
    assert read_checkpoint(wd).status is CheckpointStatus.UNREADABLE
    ck.rmdir()
    with ck.open("wb") as f:  # sparse: larger than the limit without using the disk
        f.truncate(MAX_CHECKPOINT_BYTES + 1)
    read = read_checkpoint(wd)
    assert read.status is CheckpointStatus.UNREADABLE and "limit" in (read.reason or "")


def test_symlinked_checkpoint_is_refused_and_replaced_never_followed(wd: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.json"
    up.save_checkpoint(up.PipelineCheckpoint("/other.mkv", "v"), tmp_path / "o")
    outside.write_bytes((tmp_path / "o" / "pipeline_checkpoint.json").read_bytes())
    os.utime(outside, ns=(1_000_000_000, 1_000_000_000))
    before = outside.read_bytes()
    wd.mkdir()
    (wd / "pipeline_checkpoint.json").symlink_to(outside)
    read = read_checkpoint(wd)
    assert read.status is CheckpointStatus.UNREADABLE and "symlink" in (read.reason or "")
    save_checkpoint(full_checkpoint(wd), wd)  # rename replaces the link itself
    assert not (wd / "pipeline_checkpoint.json").is_symlink()
    assert read_checkpoint(wd).checkpoint == full_checkpoint(wd)
    assert outside.read_bytes() == before and outside.stat().st_mtime_ns == 1_000_000_000


def test_symlinked_work_dir_is_refused(wd: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    up.save_checkpoint(up.PipelineCheckpoint("/other.mkv", "v"), outside)
    before = {p.name: p.read_bytes() for p in outside.iterdir()}
    wd.symlink_to(outside)
    read = read_checkpoint(wd)
    assert read.status is CheckpointStatus.UNREADABLE and read.reason
    with pytest.raises(SymlinkRefused):
        save_checkpoint(full_checkpoint(wd), wd)
    assert {p.name: p.read_bytes() for p in outside.iterdir()} == before


def test_save_keeps_permissions(wd: Path) -> None:
    save_checkpoint(full_checkpoint(wd), wd)
    os.chmod(wd / "pipeline_checkpoint.json", 0o600)
    save_checkpoint(full_checkpoint(wd, 1), wd)
    assert stat.S_IMODE((wd / "pipeline_checkpoint.json").stat().st_mode) == 0o600


def _writer_forever(wd: Path, start: int) -> None:
    """Child body: save ever-newer checkpoints (numbered from ``start``) as fast as possible until killed."""
    pad = "x" * 150_000  # big enough that a kill regularly lands inside write() or fsync()
    i = start
    while True:
        ckpt = full_checkpoint(wd, i)
        ckpt.structural_anchors = {"pad": pad, "i": i}
        save_checkpoint(ckpt, wd)
        i += 1


def test_sigkill_mid_save_leaves_old_or_new_file(wd: Path) -> None:
    """A writer SIGKILLed at random times: the checkpoint always loads (old or new), only temp files remain."""
    rng = random.Random(1234)
    save_checkpoint(full_checkpoint(wd, 0), wd)
    seen = 0
    interrupted_with_temp = 0
    for _ in range(25):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                _writer_forever(wd, seen + 1)
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.002, 0.04))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        read = read_checkpoint(wd)
        assert read.status is CheckpointStatus.OK, read.reason
        ckpt = read.checkpoint
        assert ckpt is not None
        assert set(json.loads((wd / "pipeline_checkpoint.json").read_bytes())) == up.UPSTREAM_CHECKPOINT_KEYS
        assert up.load_checkpoint_strict(wd).keyframe_count == ckpt.keyframe_count
        i = ckpt.keyframe_count - 1234  # type: ignore[operator]
        assert i >= seen  # the old file or a newer one, never an older or torn one
        assert ckpt.structural_anchors is None or ckpt.structural_anchors["i"] == i
        seen = i
        others = sorted(p.name for p in wd.iterdir() if p.name != "pipeline_checkpoint.json")
        assert all(n.startswith("tmp") and n.endswith(".ckpt.tmp") for n in others), others
        interrupted_with_temp += bool(others)
        for name in others:
            (wd / name).unlink()
    assert seen > 0  # the writers really made progress between kills
    assert interrupted_with_temp > 0  # and some kills really landed mid-write


def test_bytes_match_upstream_writer_and_non_utf8_names_round_trip(tmp_path: Path) -> None:
    """A film whose name is not valid UTF-8 (Python surrogate-escapes it) is written as upstream writes it."""
    folder = tmp_path / os.fsdecode(b"Am\xe9lie (2001)")
    folder.mkdir()
    film = folder / os.fsdecode(b"Am\xe9lie.mkv")
    film.write_bytes(b"film")
    wd = WorkDir.for_film(film).path
    ckpt = full_checkpoint(wd)
    ckpt.source_file = str(film)
    theirs = tmp_path / "theirs_cinecut_work"
    up.save_checkpoint(up.PipelineCheckpoint(**ckpt.to_dict()), theirs)
    save_checkpoint(ckpt, wd)
    ours = (wd / "pipeline_checkpoint.json").read_bytes()
    assert ours.rstrip(b"\n") == (theirs / "pipeline_checkpoint.json").read_bytes()
    assert read_checkpoint(wd).checkpoint == ckpt
    assert up.load_checkpoint_strict(wd).source_file == str(film)
