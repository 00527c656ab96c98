"""Work-dir naming, models, source stamps and our stamps sidecar, checked against upstream's conventions."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import upstream_reader as up

from cinecut.inference.models import SCENE_DESCRIPTION_SCHEMA, SceneDescription, parse_scene_description
from cinecut.models import KeyframeRecord
from cinecut.stamp import SourceStamp, film_path
from cinecut.stamps import InputStamps, current_stamps, read_stamps, write_stamps_at
from cinecut.workdir import (
    WorkDir,
    as_work_dir,
    is_trailer_name,
    is_work_dir_name,
    keyframe_name,
    same_stem_conflicts,
    subtitle_sidecars,
    trailer_stem,
)


def test_paths_follow_upstream_naming(tmp_path: Path) -> None:
    film = tmp_path / "Heat (1995)" / "Heat (1995).mkv"
    wd = WorkDir.for_film(film)
    assert wd.path == up.work_dir_for(film) == tmp_path / "Heat (1995)" / "Heat (1995)_cinecut_work"
    assert wd.cache_path == up.cache_path_for(film, wd.path)
    assert wd.checkpoint_path.name == "pipeline_checkpoint.json"
    assert wd.proxy_path.name == "Heat (1995)_proxy.mp4"
    assert wd.timestamps_path.name == "keyframe_timestamps.json"
    assert wd.keyframes_dir.name == "keyframes"
    assert wd.partial_cache_path.name == "Heat (1995).scenedesc.partial"
    assert wd.partial_cache_path != wd.cache_path  # partial progress never under the cache's name
    assert wd.trailer_path("noir") == tmp_path / "Heat (1995)" / "Heat (1995)_trailer_noir.mp4"
    ours = {wd.lock_path.name, wd.stamps_path.name}
    upstream_names = {wd.checkpoint_path.name, wd.cache_path.name, wd.proxy_path.name, wd.timestamps_path.name,
                      *up.LATER_STAGE_OUTPUTS}
    assert not ours & upstream_names
    # A stem with dots: only the last suffix is the extension, as pathlib (and upstream) see it.
    dotted = WorkDir.for_film(tmp_path / "Mr. Smith Goes.To.Washington.mp4")
    assert dotted.path.name == "Mr. Smith Goes.To.Washington_cinecut_work"
    assert as_work_dir(wd.path).stem == "Heat (1995)"
    assert as_work_dir(wd.path, film) == wd


def test_keyframe_names_match_upstream() -> None:
    assert keyframe_name(1.5) == "frame_0000001500.jpg"
    assert keyframe_name(0.0) == "frame_0000000000.jpg"
    assert keyframe_name(7199.9994) == f"frame_{int(7199.9994 * 1000):010d}.jpg"


def test_work_dir_and_trailer_names() -> None:
    assert is_work_dir_name("Heat_cinecut_work") and not is_work_dir_name("_cinecut_work")
    assert not is_work_dir_name("Heat_cinecut_work.bak")
    assert is_trailer_name("Heat (1995)_trailer_noir.mp4") and trailer_stem("Heat_trailer_a_b.mp4") == "Heat"
    assert not is_trailer_name("Heat (1995).mp4") and not is_trailer_name("Heat_trailer_.mp4")


def test_two_films_one_stem_are_detected(tmp_path: Path) -> None:
    a, b, c = tmp_path / "Heat.mkv", tmp_path / "Heat.mp4", tmp_path / "Alien.mkv"
    conflicts = same_stem_conflicts([a, b, c])
    assert conflicts == {tmp_path / "Heat_cinecut_work": [a, b]}
    assert same_stem_conflicts([a, c]) == {}


def test_subtitle_sidecars(tmp_path: Path) -> None:
    film = tmp_path / "Heat.mkv"
    names = ["Heat.srt", "Heat.en.srt", "Heat.en.forced.ass", "Heat.EN.SRT", "Heat 2.srt", "Heat.mkv",
             "Heatwave.srt", "Heat.a.b.c.d.srt", "Heat.txt", "Heat_trailer_x.mp4"]
    for n in names:
        (tmp_path / n).write_text("x")
    found = [p.name for p in subtitle_sidecars(film)]
    assert found == sorted(["Heat.srt", "Heat.en.srt", "Heat.en.forced.ass", "Heat.EN.SRT"])


def test_source_stamp_is_exact(tmp_path: Path) -> None:
    f = tmp_path / "f.mkv"
    f.write_bytes(b"12345")
    os.utime(f, ns=(1_700_000_000_123_456_789, 1_700_000_000_123_456_789))
    s = SourceStamp.of(f)
    assert s == SourceStamp(os.stat(f).st_mtime, 5)
    assert SourceStamp.from_dict(json.loads(json.dumps(s.to_dict()))) == s  # JSON repr round-trips floats
    assert s != SourceStamp(s.mtime + 1e-6, 5) and s != SourceStamp(s.mtime, 6)
    assert SourceStamp.maybe(tmp_path / "gone") is None
    link = tmp_path / "link.mkv"
    link.symlink_to(f)
    assert SourceStamp.of(link) == s  # a symlinked film is stamped through, as upstream's os.stat does
    assert film_path(link) == f  # upstream records a film by its realpath (typer resolve_path=True)
    for bad in ({"mtime": "1", "size": 1}, {"mtime": 1.0, "size": -1}, {"mtime": True, "size": 1}, [1, 2]):
        with pytest.raises(ValueError):
            SourceStamp.from_dict(bad)


def test_models_are_strict_about_upstream_shapes() -> None:
    rec = KeyframeRecord(1.5, "/k/frame_0000001500.jpg", "subtitle_midpoint")
    assert KeyframeRecord.from_dict(rec.to_dict()) == rec
    assert up.KeyframeRecord(**rec.to_dict()).timestamp_s == 1.5
    for bad in ({**rec.to_dict(), "extra": 1}, {"timestamp_s": 1.0}, {**rec.to_dict(), "source": "guess"},
                {**rec.to_dict(), "timestamp_s": float("inf")}, {**rec.to_dict(), "timestamp_s": True}):
        with pytest.raises(ValueError):
            KeyframeRecord.from_dict(bad)
    desc = SceneDescription("a", "b", "c", "d")
    assert up.SceneDescription(**desc.to_dict()) == up.SceneDescription("a", "b", "c", "d")
    with pytest.raises(ValueError):
        SceneDescription.from_dict({**desc.to_dict(), "camera": "x"})
    assert set(SCENE_DESCRIPTION_SCHEMA["properties"]) == set(up.SceneDescription.__dataclass_fields__)
    assert SCENE_DESCRIPTION_SCHEMA["additionalProperties"] is False


def test_parse_scene_description_never_half_fills() -> None:
    good = '{"visual_content": " a man ", "mood": "tense", "action": "runs", "setting": "roof", "x": 1}'
    assert parse_scene_description(good) == SceneDescription("a man", "tense", "runs", "roof")
    for bad in ('{"visual_content": "a", "mood": "b", "action": "c"}', "not json", "[1]", None, b"\xff",
                '{"visual_content": "", "mood": "b", "action": "c", "setting": "d"}', "[" * 100_000):
        assert parse_scene_description(bad) is None


def test_stamps_sidecar_round_trip_and_symlink(tmp_path: Path) -> None:
    film = tmp_path / "Heat.mkv"
    film.write_bytes(b"film")
    (tmp_path / "Heat.en.srt").write_text("sub")
    wd = WorkDir.for_film(film)
    wd.path.mkdir()
    stamps = current_stamps(film, subtitle_sidecars(film))
    assert stamps.video == SourceStamp.of(film) and stamps.inode == film.stat().st_ino
    assert len(stamps.subtitles) == 1
    fd = os.open(wd.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        write_stamps_at(fd, stamps)
    finally:
        os.close(fd)
    assert read_stamps(wd.path) == stamps
    assert not [p for p in wd.path.iterdir() if p.name.endswith(".tmp")]
    # Our sidecar is invisible to upstream: it is not one of the names upstream reads.
    assert wd.stamps_path.name not in {"pipeline_checkpoint.json", wd.cache_path.name}
    outside = tmp_path / "outside.json"
    outside.write_text(wd.stamps_path.read_text())
    wd.stamps_path.unlink()
    wd.stamps_path.symlink_to(outside)
    assert read_stamps(wd.path) is None  # a planted link is never read through
    gone = current_stamps(tmp_path / "Gone.mkv", [tmp_path / "Gone.srt"])
    assert gone.video is None and gone.subtitles == ()


def test_stamps_with_duplicate_subtitle_names_are_unusable_not_a_crash(tmp_path: Path) -> None:
    wd = tmp_path / "X_cinecut_work"
    wd.mkdir()
    entry = {"name": ".en.srt", "mtime": 1.0, "size": 1}
    doc = {"format": 1, "source_file": "/x", "video": None, "subtitles": [entry, {**entry, "mtime": 2.0}]}
    (wd / "cinecut_stamps.json").write_text(json.dumps(doc))
    assert read_stamps(wd) is None
    with pytest.raises(ValueError):
        InputStamps.from_dict(doc)


def test_stamps_of_a_non_utf8_film_round_trip(tmp_path: Path) -> None:
    film = tmp_path / os.fsdecode(b"Caf\xe9.mkv")
    film.write_bytes(b"film")
    sub = tmp_path / os.fsdecode(b"Caf\xe9.fr.srt")
    sub.write_text("1")
    wd = WorkDir.for_film(film)
    wd.path.mkdir()
    stamps = current_stamps(film, subtitle_sidecars(film))
    assert len(stamps.subtitles) == 1
    fd = os.open(wd.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        write_stamps_at(fd, stamps)
    finally:
        os.close(fd)
    assert read_stamps(wd.path) == stamps
