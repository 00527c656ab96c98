"""Upstream CineCut's public Python API, exercised against OUR modules.

Our modules keep upstream's module paths, so code written against upstream imports ours. These tests
exercise exactly the behaviours of upstream's own ``test_checkpoint.py`` and ``test_cache.py`` (same
calls, same assertions), then the rest of the public surface listed on the work-dir format page:
``cinecut.inference.models`` (``validate_scene_description`` raising ``pydantic.ValidationError``, the
type upstream's callers catch), ``cinecut.models`` and upstream's error semantics of ``load_checkpoint``.
"""

from __future__ import annotations

import errno
import json
import os
from dataclasses import fields
from pathlib import Path

import pydantic
import pytest

from cinecut.checkpoint import CHECKPOINT_FILENAME, PipelineCheckpoint, load_checkpoint, save_checkpoint
from cinecut.inference.cache import load_cache, save_cache
from cinecut.inference.models import SCENE_DESCRIPTION_SCHEMA, SceneDescription, validate_scene_description
from cinecut.models import DialogueEvent, KeyframeRecord

# ------------------------------------------------------------------------------ cinecut.checkpoint


def test_checkpoint_filename_is_upstreams() -> None:
    assert CHECKPOINT_FILENAME == "pipeline_checkpoint.json"


def test_initial_stages_complete_empty() -> None:
    ckpt = PipelineCheckpoint(source_file="/tmp/film.mkv", vibe="action")
    assert ckpt.stages_complete == []


def test_source_file_and_vibe_are_positional() -> None:
    ckpt = PipelineCheckpoint("/tmp/film.mkv", "action")
    assert (ckpt.source_file, ckpt.vibe) == ("/tmp/film.mkv", "action")


def test_mark_stage_complete_appends() -> None:
    ckpt = PipelineCheckpoint(source_file="/tmp/film.mkv", vibe="action")
    ckpt.mark_stage_complete("proxy")
    assert ckpt.is_stage_complete("proxy")


def test_mark_stage_complete_idempotent() -> None:
    ckpt = PipelineCheckpoint(source_file="/tmp/film.mkv", vibe="action")
    ckpt.mark_stage_complete("proxy")
    ckpt.mark_stage_complete("proxy")
    assert ckpt.stages_complete.count("proxy") == 1


def test_mark_stage_complete_accepts_any_stage_name_in_order() -> None:
    ckpt = PipelineCheckpoint(source_file="/tmp/film.mkv", vibe="action")
    for stage in ("inference", "proxy", "some_future_stage", "proxy"):
        ckpt.mark_stage_complete(stage)
    assert ckpt.stages_complete == ["inference", "proxy", "some_future_stage"]


def test_is_stage_complete_false_for_unknown() -> None:
    ckpt = PipelineCheckpoint(source_file="/tmp/film.mkv", vibe="action")
    assert not ckpt.is_stage_complete("inference")


def test_missing_checkpoint_returns_none(tmp_path: Path) -> None:
    assert load_checkpoint(tmp_path) is None


def test_corrupt_json_returns_none(tmp_path: Path) -> None:
    (tmp_path / CHECKPOINT_FILENAME).write_text("{broken", encoding="utf-8")
    assert load_checkpoint(tmp_path) is None


def test_corrupt_type_returns_none(tmp_path: Path) -> None:
    """Valid JSON but wrong structure (upstream: TypeError) -> None."""
    (tmp_path / CHECKPOINT_FILENAME).write_text(json.dumps({"bad": "data"}), encoding="utf-8")
    assert load_checkpoint(tmp_path) is None


def test_valid_checkpoint_round_trip(tmp_path: Path) -> None:
    ckpt = PipelineCheckpoint(source_file="/tmp/test.mkv", vibe="drama")
    ckpt.mark_stage_complete("proxy")
    ckpt.proxy_path = "/tmp/work/proxy.mp4"
    ckpt.dialogue_event_count = 55
    save_checkpoint(ckpt, tmp_path)

    loaded = load_checkpoint(tmp_path)
    assert loaded is not None
    assert loaded.source_file == "/tmp/test.mkv"
    assert loaded.vibe == "drama"
    assert loaded.is_stage_complete("proxy")
    assert not loaded.is_stage_complete("inference")
    assert loaded.proxy_path == "/tmp/work/proxy.mp4"
    assert loaded.dialogue_event_count == 55


def test_save_checkpoint_takes_upstreams_keyword_names(tmp_path: Path) -> None:
    save_checkpoint(checkpoint=PipelineCheckpoint("/tmp/f.mkv", "v"), work_dir=tmp_path)
    loaded = load_checkpoint(work_dir=tmp_path)
    assert loaded is not None and loaded.source_file == "/tmp/f.mkv"


def test_no_tmp_files_remain_after_save(tmp_path: Path) -> None:
    save_checkpoint(PipelineCheckpoint(source_file="/tmp/film.mkv", vibe="action"), tmp_path)
    assert list(tmp_path.glob("*.ckpt.tmp")) == []


def test_checkpoint_file_created(tmp_path: Path) -> None:
    save_checkpoint(PipelineCheckpoint(source_file="/tmp/film.mkv", vibe="action"), tmp_path)
    assert (tmp_path / CHECKPOINT_FILENAME).exists()


def test_overwrite_existing_checkpoint(tmp_path: Path) -> None:
    ckpt = PipelineCheckpoint(source_file="/tmp/film.mkv", vibe="action")
    ckpt.mark_stage_complete("proxy")
    save_checkpoint(ckpt, tmp_path)
    ckpt.mark_stage_complete("subtitles")
    save_checkpoint(ckpt, tmp_path)
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None
    assert loaded.is_stage_complete("proxy")
    assert loaded.is_stage_complete("subtitles")


def test_a_saved_unknown_stage_name_loads_back(tmp_path: Path) -> None:
    ckpt = PipelineCheckpoint("/tmp/film.mkv", "action")
    ckpt.mark_stage_complete("inference")
    save_checkpoint(ckpt, tmp_path)
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None and loaded.is_stage_complete("inference")


def _load_as_another_user(work_dir: Path) -> str:
    """Run ``load_checkpoint`` where the checkpoint is unreadable (mode 0600, another owner when we are
    root; mode 0000 otherwise) and say what happened: ``raised <errno>``, ``none`` or ``loaded``."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_fd)
        outcome = "error"
        try:
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            try:
                outcome = "none" if load_checkpoint(work_dir) is None else "loaded"
            except OSError as exc:
                outcome = f"raised {errno.errorcode.get(exc.errno or 0, exc.errno)} {type(exc).__name__}"
        finally:
            os.write(write_fd, outcome.encode())
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as f:
        outcome = f.read().decode()
    os.waitpid(pid, 0)
    return outcome


def test_an_unreadable_checkpoint_propagates_permission_error(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Upstream catches only JSONDecodeError and TypeError: a PermissionError is not "no checkpoint"."""
    base = Path(tmp_path_factory.mktemp("perm"))
    os.chmod(base, 0o755)
    for parent in base.parents:  # another user must be able to reach the work dir
        if parent == Path("/") or os.stat(parent).st_mode & 0o001:
            continue
        os.chmod(parent, os.stat(parent).st_mode | 0o001)
    save_checkpoint(PipelineCheckpoint("/lib/film.mkv", "action"), base)
    ckpt = base / CHECKPOINT_FILENAME
    os.chmod(ckpt, 0o600 if os.geteuid() == 0 else 0)
    try:
        assert _load_as_another_user(base) == "raised EACCES PermissionError"
    finally:
        os.chmod(ckpt, 0o600)


# ------------------------------------------------------------------------ cinecut.inference.cache


def make_record(ts: float, tmp_path: Path) -> KeyframeRecord:
    f = tmp_path / f"frame_{int(ts * 1000):06d}.jpg"
    f.write_bytes(b"\xff\xd8\xff")
    return KeyframeRecord(timestamp_s=ts, frame_path=str(f), source="subtitle_midpoint")


def make_desc() -> SceneDescription:
    return SceneDescription(visual_content="forest", mood="tense", action="running", setting="night")


def make_source_file(tmp_path: Path, name: str = "film.mkv") -> Path:
    src = tmp_path / name
    src.write_bytes(b"\x00" * 1024)
    return src


def _work(tmp_path: Path) -> Path:
    work_dir = tmp_path / "work"
    work_dir.mkdir()
    return work_dir


def test_cache_save_and_load_roundtrip(tmp_path: Path) -> None:
    src, work_dir = make_source_file(tmp_path), _work(tmp_path)
    records = [
        (make_record(1.0, tmp_path), make_desc()),
        (make_record(2.5, tmp_path), make_desc()),
        (make_record(3.75, tmp_path), None),
    ]
    save_cache(records, src, work_dir)
    loaded = load_cache(src, work_dir)
    assert loaded is not None and len(loaded) == len(records)
    for (orig_rec, orig_desc), (load_rec, load_desc) in zip(records, loaded, strict=True):
        assert load_rec.timestamp_s == orig_rec.timestamp_s
        assert load_rec.frame_path == orig_rec.frame_path
        assert load_rec.source == orig_rec.source
        if orig_desc is None:
            assert load_desc is None
        else:
            assert load_desc is not None
            assert (load_desc.visual_content, load_desc.mood, load_desc.action, load_desc.setting) == (
                orig_desc.visual_content,
                orig_desc.mood,
                orig_desc.action,
                orig_desc.setting,
            )


def test_cache_hit_returns_list(tmp_path: Path) -> None:
    src, work_dir = make_source_file(tmp_path), _work(tmp_path)
    records = [(make_record(t, tmp_path), make_desc()) for t in (0.5, 1.0, 2.0)]
    save_cache(records, src, work_dir)
    result = load_cache(src, work_dir)
    assert isinstance(result, list) and len(result) == len(records)


def test_cache_miss_no_file(tmp_path: Path) -> None:
    src, work_dir = make_source_file(tmp_path), _work(tmp_path)
    assert load_cache(src, work_dir) is None


def test_cache_invalidated_mtime_change(tmp_path: Path) -> None:
    source_a = tmp_path / "film_a.mkv"
    source_a.write_bytes(b"\x00" * 512)
    work_dir = _work(tmp_path)
    save_cache([(make_record(1.0, tmp_path), make_desc())], source_a, work_dir)
    st = source_a.stat()
    os.utime(source_a, (st.st_atime + 3600, st.st_mtime + 3600))
    assert load_cache(source_a, work_dir) is None


def test_cache_invalidated_size_change(tmp_path: Path) -> None:
    src, work_dir = make_source_file(tmp_path), _work(tmp_path)
    save_cache([(make_record(1.0, tmp_path), make_desc())], src, work_dir)
    with src.open("ab") as f:
        f.write(b"\xde\xad\xbe\xef" * 64)
    assert load_cache(src, work_dir) is None


def test_corrupt_cache_returns_none(tmp_path: Path) -> None:
    src, work_dir = make_source_file(tmp_path), _work(tmp_path)
    (work_dir / f"{src.stem}.scenedesc.msgpack").write_bytes(b"\xde\xad\xbe\xef\x00\x01garbage\x80\x99\xff")
    assert load_cache(src, work_dir) is None


def test_load_cache_never_raises_whatever_it_is_given(tmp_path: Path) -> None:
    src, work_dir = make_source_file(tmp_path), _work(tmp_path)
    save_cache([(make_record(1.0, tmp_path), make_desc())], src, work_dir)
    (work_dir / "film.scenedesc.msgpack").chmod(0o600)
    assert load_cache(tmp_path / "gone.mkv", work_dir) is None
    assert load_cache(src, tmp_path / "no-such-dir") is None
    assert load_cache(None, work_dir) is None  # type: ignore[arg-type]  # upstream: an exception -> None


def test_cache_file_location(tmp_path: Path) -> None:
    src, work_dir = make_source_file(tmp_path, name="mymovie.mkv"), _work(tmp_path)
    returned_path = save_cache([(make_record(1.0, tmp_path), make_desc())], src, work_dir)
    expected = work_dir / "mymovie.scenedesc.msgpack"
    assert returned_path == expected
    assert returned_path.exists()
    assert str(returned_path).startswith(str(tmp_path))


def test_none_description_survives_roundtrip(tmp_path: Path) -> None:
    src, work_dir = make_source_file(tmp_path), _work(tmp_path)
    record = make_record(5.0, tmp_path)
    save_cache([(record, None)], src, work_dir)
    loaded = load_cache(src, work_dir)
    assert loaded is not None and len(loaded) == 1
    loaded_record, loaded_desc = loaded[0]
    assert loaded_desc is None and loaded_record.timestamp_s == record.timestamp_s


# ----------------------------------------------------------------------- cinecut.inference.models


def test_scene_description_fields_and_schema_are_upstreams() -> None:
    names = ["visual_content", "mood", "action", "setting"]
    assert [f.name for f in fields(SceneDescription)] == names
    assert SceneDescription("a", "b", "c", "d").mood == "b"  # positional, in upstream's order
    assert {
        "type": "object",
        "properties": {n: {"type": "string"} for n in names},
        "required": names,
        "additionalProperties": False,
    } == SCENE_DESCRIPTION_SCHEMA


def test_validate_scene_description_returns_a_scene_description() -> None:
    data = {"visual_content": "a dark alley", "mood": "tense", "action": "a chase", "setting": "night"}
    desc = validate_scene_description(data)
    assert isinstance(desc, SceneDescription)
    assert (desc.visual_content, desc.mood, desc.action, desc.setting) == tuple(data.values())


@pytest.mark.parametrize(
    "bad",
    [
        {"visual_content": "a", "mood": "b", "action": "c"},  # a missing field
        {"visual_content": 1, "mood": "b", "action": "c", "setting": "d"},  # not a string
        {"visual_content": None, "mood": "b", "action": "c", "setting": "d"},
        {},
        "not a dict",
        None,
        ["a", "b", "c", "d"],
    ],
)
def test_validate_scene_description_raises_pydantics_validation_error(bad: object) -> None:
    """Upstream's inference loop catches ``pydantic.ValidationError``: any other type would escape it."""
    with pytest.raises(pydantic.ValidationError):
        validate_scene_description(bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------- cinecut.models


def test_keyframe_record_is_upstreams() -> None:
    assert [f.name for f in fields(KeyframeRecord)] == ["timestamp_s", "frame_path", "source"]
    rec = KeyframeRecord(12.5, "/k/frame_0000012500.jpg", "subtitle_midpoint")
    assert (rec.timestamp_s, rec.frame_path, rec.source) == (12.5, "/k/frame_0000012500.jpg", "subtitle_midpoint")


def test_dialogue_event_is_upstreams() -> None:
    names = ["start_ms", "end_ms", "start_s", "end_s", "midpoint_s", "text", "emotion"]
    assert [f.name for f in fields(DialogueEvent)] == names
    ev = DialogueEvent(1000, 3000, 1.0, 3.0, 2.0, "Hello.", "neutral")
    assert (ev.start_ms, ev.end_ms, ev.midpoint_s, ev.text, ev.emotion) == (1000, 3000, 2.0, "Hello.", "neutral")
    kw = DialogueEvent(start_ms=0, end_ms=500, start_s=0.0, end_s=0.5, midpoint_s=0.25, text="x", emotion="intense")
    assert kw.emotion == "intense"
