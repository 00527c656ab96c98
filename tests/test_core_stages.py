"""The stage graph and invalidation: exact stages, fields and files; idempotence; symlink tricks; a property test.

Expectations are written from the format page ("What depends on what", "What is ours to delete"), not
from cinecut.stages, so a wrong table there fails here.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import tempfile
import time
from pathlib import Path

import pytest
import upstream_reader as up
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cinecut.checkpoint import PipelineCheckpoint, read_checkpoint, save_checkpoint
from cinecut.locks import FileLock, LockBusy
from cinecut.revalidate import revalidate
from cinecut.stages import STAGES, Input, downstream, invalidate, stale_temp_files

ALL_STAGES = ("proxy", "subtitles", "keyframes", "structural", "narrative", "assembly", "music")
#: From the format page: a video change makes everything stale, a subtitle change everything but the proxy.
STALE = {
    "video": {*ALL_STAGES, "inference"},
    "subtitle": {"subtitles", "keyframes", "inference", "structural", "narrative", "assembly", "music"},
}
FIELDS = {
    "proxy": ("proxy_path", "proxy_duration_s"),
    "subtitles": ("dialogue_event_count",),
    "keyframes": ("keyframe_count",),
    "inference": ("inference_complete", "cache_hit"),
    "structural": ("structural_anchors",),
    "narrative": ("manifest_path",),
    "assembly": ("assembly_manifest_path",),
    "music": (),
}
OLD = time.time() - 3600  # older than any sane temp-file grace period


def snapshot(root: Path, *, skip: tuple[str, ...] = ("cinecut.lock",)) -> dict[str, tuple]:
    """Every entry under ``root`` (symlinks not followed): kind, inode, mtime and a content hash."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if name in skip:
                continue
            st = p.lstat()
            if p.is_symlink():
                out[str(p.relative_to(root))] = ("link", os.readlink(p), st.st_ino)
            elif p.is_dir():
                out[str(p.relative_to(root))] = ("dir", st.st_ino, st.st_mtime_ns)
            else:
                digest = hashlib.sha1(p.read_bytes()).hexdigest()
                out[str(p.relative_to(root))] = ("file", st.st_ino, st.st_mtime_ns, digest)
    return out


def make_library(tmp_path: Path) -> tuple[Path, Path]:
    """A finished upstream work dir plus everything around it that must survive, and our own leftovers."""
    folder = tmp_path / "lib" / "Heat (1995)"
    folder.mkdir(parents=True)
    film = folder / "Heat (1995).mkv"
    film.write_bytes(b"the film" * 100)
    (folder / "Heat (1995).en.srt").write_text("1\n00:00:01,000 --> 00:00:02,000\nHi.\n")
    wd = up.run_pipeline(film)
    (wd / "Heat (1995).scenedesc.partial").write_bytes(b"partial" * 10)
    for name, age in (("tmpold.cache.tmp", OLD), ("tmpyoung.cache.tmp", None), ("tmpold.ckpt.tmp", OLD)):
        (wd / name).write_bytes(b"half-written")
        if age:
            os.utime(wd / name, (age, age))
    (wd / "notes.txt").write_text("user notes")
    (wd / "keyframes" / "README").write_text("user file among keyframes")
    (wd / "keyframes" / "frame_12.jpg").write_bytes(b"not upstream's naming")  # unknown: wrong digit count
    (wd / "cinecut_stamps.json").write_text("{}")
    sibling = folder.parent / "Other"  # another film's work dir beside it must never be touched
    sibling.mkdir()
    (sibling / "Other_cinecut_work").mkdir()
    (sibling / "Other_cinecut_work" / "Other_proxy.mp4").write_bytes(b"other proxy")
    return film, wd


REGENERABLE = {
    "proxy": ["Heat (1995)_proxy.mp4"],
    "keyframes": ["keyframe_timestamps.json", *(f"keyframes/frame_{int((1.5 + 2.25 * i) * 1000):010d}.jpg" for i in range(6))],
    "inference": ["Heat (1995).scenedesc.msgpack", "Heat (1995).scenedesc.partial", "tmpold.cache.tmp"],
}


@pytest.mark.parametrize("changed", ["video", "subtitle"])
def test_invalidation_removes_exactly_the_right_things(tmp_path: Path, changed: str) -> None:
    _, wd = make_library(tmp_path)
    lib = tmp_path / "lib"
    before = snapshot(lib)
    ckpt_before = read_checkpoint(wd).checkpoint
    assert ckpt_before is not None
    expected_files = sorted(f for stage, files in REGENERABLE.items() if stage in STALE[changed] for f in files)
    expected_bytes = sum((wd / f).stat().st_size for f in expected_files)

    report = invalidate(wd, [changed], reason="test")

    assert sorted(report.files_removed) == expected_files
    assert report.bytes_reclaimed == expected_bytes
    assert set(report.stages_reset) == STALE[changed]
    assert set(report.fields_nulled) == {f for s in STALE[changed] for f in FIELDS[s]}
    assert report.refused == [] and report.errors == []
    ckpt = read_checkpoint(wd).checkpoint
    assert ckpt is not None
    assert ckpt.stages_complete == [s for s in ckpt_before.stages_complete if s not in STALE[changed]]
    for stage, names in FIELDS.items():
        for name in names:
            want = None if stage in STALE[changed] else getattr(ckpt_before, name)
            assert getattr(ckpt, name) == want, name
    assert (ckpt.source_file, ckpt.vibe) == (ckpt_before.source_file, ckpt_before.vibe)
    assert set(json.loads((wd / "pipeline_checkpoint.json").read_text())) == up.UPSTREAM_CHECKPOINT_KEYS
    assert up.load_checkpoint_strict(wd).stages_complete == ckpt.stages_complete

    after = snapshot(lib)
    work = Path(wd.relative_to(lib))
    removed = {str(work / f) for f in expected_files}
    assert set(before) - set(after) == removed
    changed_entries = {k for k in after if after[k] != before[k]}
    # Only the checkpoint (rewritten) and the directories we deleted from may differ.
    assert changed_entries <= {str(work / "pipeline_checkpoint.json"), str(work), str(work / "keyframes")}
    for kept in ("Heat (1995).mkv", "Heat (1995).en.srt", "Heat (1995)_trailer_action.mp4"):
        assert before[f"Heat (1995)/{kept}"] == after[f"Heat (1995)/{kept}"]
    for name in (*up.LATER_STAGE_OUTPUTS, "notes.txt", "keyframes/README", "keyframes/frame_12.jpg",
                 "tmpyoung.cache.tmp", "tmpold.ckpt.tmp", "cinecut_stamps.json"):
        assert before[str(work / name)] == after[str(work / name)], name


@pytest.mark.parametrize("changed", ["video", "subtitle"])
def test_second_run_changes_and_rewrites_nothing(tmp_path: Path, changed: str) -> None:
    _, wd = make_library(tmp_path)
    first = invalidate(wd, [changed])
    assert first.changed_anything
    before = snapshot(tmp_path)
    second = invalidate(wd, [changed])
    assert not second.changed_anything
    assert (second.files_removed, second.bytes_reclaimed, second.stages_reset) == ([], 0, [])
    assert snapshot(tmp_path) == before  # same inodes and mtimes: not even the checkpoint was rewritten


def test_keyframes_dir_goes_when_only_frames_were_in_it(tmp_path: Path) -> None:
    film = tmp_path / "Alien.mkv"
    film.write_bytes(b"alien")
    wd = up.run_pipeline(film, frames=3, subtitle=False)
    report = invalidate(wd, [Input.VIDEO])
    assert not (wd / "keyframes").exists()
    assert len([f for f in report.files_removed if f.startswith("keyframes/")]) == 3


def test_downstream_closure_follows_the_format_page() -> None:
    assert {s.name for s in downstream(["video"])} == STALE["video"]
    assert {s.name for s in downstream(["subtitle"])} == STALE["subtitle"]
    assert {s.name for s in downstream(["video", "subtitle"])} == STALE["video"]
    assert {s.name for s in downstream(["structural"])} == {"narrative", "assembly", "music"}
    assert downstream([]) == []
    names = [s.name for s in STAGES]
    for stage in STAGES:  # topological order: everything a stage consumes comes before it
        assert all(c in ("video", "subtitle") or names.index(c) < names.index(stage.name) for c in stage.consumes)
    assert {s.name: s.fields for s in STAGES} == FIELDS


def test_no_checkpoint_still_removes_regenerable_files(tmp_path: Path) -> None:
    _, wd = make_library(tmp_path)
    (wd / "pipeline_checkpoint.json").unlink()
    report = invalidate(wd, ["video"])
    assert report.checkpoint == "missing"
    assert "Heat (1995).scenedesc.msgpack" in report.files_removed
    assert not (wd / "pipeline_checkpoint.json").exists()  # none is invented
    assert invalidate(tmp_path / "nowhere_cinecut_work", ["video"]).changed_anything is False


def test_corrupt_checkpoint_is_left_alone(tmp_path: Path) -> None:
    _, wd = make_library(tmp_path)
    (wd / "pipeline_checkpoint.json").write_text('{"source_file": "x", "vibe": "y", "extra": 1}')
    report = invalidate(wd, ["video"])
    assert report.checkpoint == "unreadable"
    assert (wd / "pipeline_checkpoint.json").read_text() == '{"source_file": "x", "vibe": "y", "extra": 1}'
    # Stages we cannot read we cannot reset: only the self-validating cache goes, the proxy stays.
    assert "Heat (1995).scenedesc.msgpack" in report.files_removed
    assert "Heat (1995)_proxy.mp4" not in report.files_removed
    assert (wd / "Heat (1995)_proxy.mp4").exists()
    assert any("checkpoint unreadable" in e for e in report.errors)


def test_temp_files_within_grace_are_kept_and_stale_ones_listed(tmp_path: Path) -> None:
    _, wd = make_library(tmp_path)
    (wd / "tmpx.stamps.tmp").write_bytes(b"")
    os.utime(wd / "tmpx.stamps.tmp", (OLD, OLD))
    (wd / "tmplink.cache.tmp").symlink_to(tmp_path / "lib" / "Heat (1995)" / "Heat (1995).mkv")
    os.utime(wd / "tmplink.cache.tmp", (OLD, OLD), follow_symlinks=False)
    fd = os.open(wd, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert sorted(stale_temp_files(fd)) == ["tmpold.cache.tmp", "tmpold.ckpt.tmp", "tmpx.stamps.tmp"]
    finally:
        os.close(fd)
    invalidate(wd, ["video"])
    assert (wd / "tmpyoung.cache.tmp").exists() and (wd / "tmplink.cache.tmp").is_symlink()
    assert not (wd / "tmpold.cache.tmp").exists()


# --- symlink tricks: every target lives in a directory outside the library and must stay as it was ---


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    d = tmp_path / "outside"
    (d / "keyframes").mkdir(parents=True)
    (d / "victim.bin").write_bytes(b"precious")
    (d / "keyframes" / "frame_0000001500.jpg").write_bytes(b"precious jpeg")
    for p in (d / "victim.bin", d / "keyframes" / "frame_0000001500.jpg"):
        os.utime(p, ns=(1_000_000_000, 1_000_000_000))
    return d


@pytest.mark.parametrize(
    "name",
    ["Heat (1995).scenedesc.msgpack", "Heat (1995)_proxy.mp4", "keyframe_timestamps.json",
     "Heat (1995).scenedesc.partial", "keyframes/frame_0000001500.jpg"],
)
def test_symlinked_artifact_is_refused_not_followed(tmp_path: Path, outside: Path, name: str) -> None:
    _, wd = make_library(tmp_path)
    (wd / name).unlink(missing_ok=True)
    (wd / name).symlink_to(outside / "victim.bin")
    before = snapshot(outside, skip=())
    report = invalidate(wd, ["video"])
    assert name in report.refused
    assert (wd / name).is_symlink()
    assert snapshot(outside, skip=()) == before
    assert "Heat (1995)_proxy.mp4" in report.files_removed or name == "Heat (1995)_proxy.mp4"


def test_symlinked_keyframes_dir_is_refused(tmp_path: Path, outside: Path) -> None:
    _, wd = make_library(tmp_path)
    for p in (wd / "keyframes").iterdir():
        p.unlink()
    (wd / "keyframes").rmdir()
    (wd / "keyframes").symlink_to(outside / "keyframes")
    before = snapshot(outside, skip=())
    report = invalidate(wd, ["video"])
    assert "keyframes" in report.refused
    assert snapshot(outside, skip=()) == before


def test_symlinked_work_dir_is_refused_entirely(tmp_path: Path, outside: Path) -> None:
    _, wd = make_library(tmp_path)
    real = tmp_path / "moved_work"
    wd.rename(real)
    wd.symlink_to(real)
    before = snapshot(real)
    report = invalidate(wd, ["video"])
    assert report.refused == [str(wd)]
    assert not report.changed_anything
    assert snapshot(real) == before
    assert not (real / "cinecut.lock").exists()  # not even a lock file was created through the link


def test_symlinked_checkpoint_and_lock_file(tmp_path: Path, outside: Path) -> None:
    _, wd = make_library(tmp_path)
    target = outside / "victim.bin"
    (wd / "pipeline_checkpoint.json").unlink()
    (wd / "pipeline_checkpoint.json").symlink_to(target)
    before = snapshot(outside, skip=())
    report = invalidate(wd, ["video"])
    assert report.checkpoint == "unreadable"
    assert (wd / "pipeline_checkpoint.json").is_symlink()
    assert snapshot(outside, skip=()) == before
    # A planted lock file link: nothing at all is done, the target is not created, truncated or locked.
    _, wd2 = make_library(tmp_path / "second")
    (wd2 / "cinecut.lock").symlink_to(outside / "victim.bin")
    inside = snapshot(wd2, skip=())
    report = invalidate(wd2, ["video"])
    assert report.refused == ["cinecut.lock"] and not report.changed_anything
    assert snapshot(wd2, skip=()) == inside
    assert snapshot(outside, skip=()) == before


def test_lock_held_means_lock_busy(tmp_path: Path) -> None:
    _, wd = make_library(tmp_path)
    holder = FileLock(wd / "cinecut.lock", purpose="pipeline run", announce=True)
    assert holder.try_acquire()
    before = snapshot(wd)
    with pytest.raises(LockBusy) as info:
        invalidate(wd, ["video"])
    assert info.value.holder and info.value.holder["purpose"] == "pipeline run"
    t0 = time.monotonic()
    with pytest.raises(LockBusy):
        invalidate(wd, ["video"], lock_timeout=0.2)
    assert 0.15 <= time.monotonic() - t0 < 2.0
    assert snapshot(wd) == before
    holder.release()
    assert invalidate(wd, ["video"]).changed_anything


# --- property test -------------------------------------------------------------------------------------

STEM = "Film"
KNOWN = {
    "proxy": f"{STEM}_proxy.mp4",
    "timestamps": "keyframe_timestamps.json",
    "cache": f"{STEM}.scenedesc.msgpack",
    "partial": f"{STEM}.scenedesc.partial",
    "old_cache_tmp": "tmpaaaa.cache.tmp",
    "young_cache_tmp": "tmpbbbb.cache.tmp",
    "old_ckpt_tmp": "tmpcccc.ckpt.tmp",
    "old_proxy_tmp": "tmpdddd.proxy.tmp",
    "young_proxy_tmp": "tmpeeee.proxy.tmp",
    "stamps": "cinecut_stamps.json",
}
OWNER = {"proxy": "proxy", "timestamps": "keyframes", "cache": "inference", "partial": "inference",
         "old_cache_tmp": "inference", "old_proxy_tmp": "proxy"}
FIELD_VALUES = {
    "proxy_path": st.just("/lib/Film_cinecut_work/Film_proxy.mp4"),
    "keyframe_count": st.integers(0, 5000),
    "dialogue_event_count": st.integers(0, 5000),
    "inference_complete": st.booleans(),
    "cache_hit": st.booleans(),
    "manifest_path": st.just("/lib/Film_cinecut_work/TRAILER_MANIFEST.json"),
    "assembly_manifest_path": st.just("/lib/Film_cinecut_work/ASSEMBLY_MANIFEST.json"),
    "proxy_duration_s": st.floats(0, 1e5, allow_nan=False),
    "structural_anchors": st.dictionaries(st.sampled_from(["a", "b"]), st.floats(0, 1e4), max_size=2),
}
unknown_names = st.text("abcdefgXYZ_.-0123456789", min_size=1, max_size=12).filter(
    lambda n: n not in (".", "..") and not n.endswith((".tmp", "_proxy.mp4")) and not n.startswith(STEM)
    and n not in KNOWN.values() and n not in ("keyframes", "pipeline_checkpoint.json", "cinecut.lock")
)
work_dir_states = st.fixed_dictionaries(
    {
        "checkpoint": st.sampled_from(["ok", "ok", "ok", "missing", "corrupt"]),
        "stages": st.permutations(ALL_STAGES).flatmap(lambda p: st.integers(0, 7).map(lambda n: p[:n])),
        "fields": st.fixed_dictionaries({k: st.none() | v for k, v in FIELD_VALUES.items()}),
        "known": st.sets(st.sampled_from(sorted(KNOWN))),
        "frames": st.lists(st.integers(0, 9_999_999_999), max_size=4, unique=True),
        "unknown": st.lists(unknown_names, max_size=4, unique=True),
        "unknown_in_keyframes": st.lists(unknown_names, max_size=2, unique=True),
        "manifests": st.sets(st.sampled_from(up.LATER_STAGE_OUTPUTS)),
        "changed": st.sets(st.sampled_from(["video", "subtitle"]), min_size=1),
    }
)


def build(root: Path, state: dict) -> Path:
    wd = root / f"{STEM}_cinecut_work"
    (wd / "keyframes").mkdir(parents=True)
    (root / f"{STEM}.mkv").write_bytes(b"film")
    if state["checkpoint"] == "ok":
        ckpt = PipelineCheckpoint(f"{root}/{STEM}.mkv", "v", list(state["stages"]), **state["fields"])
        save_checkpoint(ckpt, wd)
    elif state["checkpoint"] == "corrupt":
        (wd / "pipeline_checkpoint.json").write_bytes(b'{"source_file": ')
    for key in state["known"]:
        (wd / KNOWN[key]).write_bytes(key.encode() * 3)
        if key.startswith("old"):
            os.utime(wd / KNOWN[key], (OLD, OLD))
    for ms in state["frames"]:
        (wd / "keyframes" / f"frame_{ms:010d}.jpg").write_bytes(b"jpg")
    for name in state["unknown"]:
        (wd / name).write_bytes(b"unknown")
    for name in state["unknown_in_keyframes"]:
        (wd / "keyframes" / name).write_bytes(b"unknown")
    for name in state["manifests"]:
        (wd / name).parent.mkdir(exist_ok=True)
        (wd / name).write_bytes(b"manifest")
    return wd


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(state=work_dir_states)
def test_property_invalidation_is_exact_and_safe(state: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        wd = build(root, state)
        stale = set().union(*(STALE[c] for c in state["changed"]))
        if state["checkpoint"] == "corrupt":
            stale &= {"inference"}  # stages it cannot read are not reset, so only the cache may go
        regenerable = {str(Path(KNOWN[k])) for k, owner in OWNER.items() if owner in stale and k in state["known"]}
        if "keyframes" in stale:
            regenerable |= {f"keyframes/frame_{ms:010d}.jpg" for ms in state["frames"]}
        before = snapshot(root)
        ckpt_before = read_checkpoint(wd).checkpoint

        report = invalidate(wd, state["changed"])

        after = snapshot(root)
        work = f"{STEM}_cinecut_work"
        gone = {k[len(work) + 1:] for k in set(before) - set(after)}
        if "keyframes" in stale and not state["unknown_in_keyframes"]:
            gone.discard("keyframes")  # an emptied keyframes dir may go
        assert gone == regenerable  # never a non-regenerable file, and every stale regenerable one
        assert sorted(report.files_removed) == sorted(regenerable)
        for k, v in after.items():
            if k not in (f"{work}/pipeline_checkpoint.json", work, f"{work}/keyframes"):
                assert before[k] == v, k
        ckpt = read_checkpoint(wd).checkpoint
        if ckpt_before is None:
            assert after.get(f"{work}/pipeline_checkpoint.json") == before.get(f"{work}/pipeline_checkpoint.json")
        else:
            assert ckpt is not None
            assert not stale & set(ckpt.stages_complete)  # nothing downstream of the change left complete
            assert ckpt.stages_complete == [s for s in ckpt_before.stages_complete if s not in stale]
            for stage, names in FIELDS.items():
                for name in names:
                    want = None if stage in stale else getattr(ckpt_before, name)
                    assert getattr(ckpt, name) == want
            assert set(json.loads((wd / "pipeline_checkpoint.json").read_bytes())) == up.UPSTREAM_CHECKPOINT_KEYS

        again = invalidate(wd, state["changed"])
        assert not again.changed_anything
        assert snapshot(root) == after


def test_racing_symlink_swaps_never_reach_outside(tmp_path: Path, outside: Path) -> None:
    """A second process keeps swapping the work dir and its keyframes dir for symlinks to ``outside`` while
    invalidations run: check-then-use races must never follow a link (fds and O_NOFOLLOW, not paths)."""
    film, wd = make_library(tmp_path)
    for name in ("Heat (1995).scenedesc.msgpack", "Heat (1995)_proxy.mp4", "keyframe_timestamps.json"):
        (outside / name).write_bytes(b"precious")
        os.utime(outside / name, ns=(1_000_000_000, 1_000_000_000))
    before = snapshot(outside, skip=())
    parked, kf, kf_parked = tmp_path / "parked", wd / "keyframes", wd / "keyframes.parked"
    real = os.open(wd, os.O_RDONLY | os.O_DIRECTORY)  # the real dirs, whatever their names become
    real_kf = os.open(kf, os.O_RDONLY | os.O_DIRECTORY)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            while True:
                for a, b, link_target in ((wd, parked, outside), (kf, kf_parked, outside / "keyframes")):
                    try:
                        os.rename(a, b)
                        os.symlink(link_target, a)
                        os.unlink(a)
                        os.rename(b, a)
                    except OSError:
                        pass
        finally:
            os._exit(0)
    runs = refused = 0
    try:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            for name in ("Heat (1995).scenedesc.msgpack", "Heat (1995)_proxy.mp4"):
                os.close(os.open(name, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=real))
            os.close(os.open("frame_0000001500.jpg", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=real_kf))
            report = invalidate(wd, ["video"])
            os.utime(film)
            checked = revalidate(film)
            runs += 1
            refused += bool(report.refused) + bool(checked.refused)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        for a, b in ((wd, parked), (kf, kf_parked)):
            if a.is_symlink():
                a.unlink()
            if os.path.lexists(b):
                os.rename(b, a)
        os.close(real)
        os.close(real_kf)
    assert snapshot(outside, skip=()) == before
    assert runs > 20 and refused > 0, (runs, refused)  # the race was really exercised


def test_non_utf8_film_is_invalidated_like_any_other(tmp_path: Path) -> None:
    """Upstream runs the early stages on such a film (it cannot pack a cache for it: msgpack refuses the
    surrogate-escaped path); its checkpoint holds JSON escapes that must survive our rewrite."""
    film = tmp_path / os.fsdecode(b"Am\xe9lie.mkv")
    film.write_bytes(b"film")
    wd = up.work_dir_for(film)
    (wd / "keyframes").mkdir(parents=True)
    (wd / os.fsdecode(b"Am\xe9lie_proxy.mp4")).write_bytes(b"proxy")
    (wd / "keyframes" / "frame_0000001000.jpg").write_bytes(b"jpg")
    up.save_checkpoint(up.PipelineCheckpoint(str(film), "drama", ["proxy", "subtitles", "keyframes"],
                                             proxy_path=str(wd / "x"), keyframe_count=1), wd)
    report = invalidate(wd, ["video"])
    assert report.errors == [] and set(report.stages_reset) == {"proxy", "subtitles", "keyframes"}
    assert sorted(report.files_removed) == [os.fsdecode(b"Am\xe9lie_proxy.mp4"), "keyframes/frame_0000001000.jpg"]
    ckpt = read_checkpoint(wd).checkpoint
    assert ckpt is not None and ckpt.stages_complete == [] and ckpt.source_file == str(film)
    assert up.load_checkpoint_strict(wd).source_file == str(film)
