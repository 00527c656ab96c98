"""Keyframe planning (properties), scene detection and JPEG extraction on the synthetic film.

Extraction is checked against the picture itself: the synthetic film carries its frame number in a
binary strip, so each JPEG proves which frame it shows.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cinecut.demo.film import read_frame_numbers
from cinecut.ingest import (
    DialogueEvent,
    SubtitleError,
    detect_scene_changes,
    extract_keyframes,
    extract_keyframes_per_frame,
    parse_subtitles,
    plan_keyframes,
)
from cinecut.ingest.keyframes import TMP_DIR_PREFIX, group_runs, is_complete_jpeg
from cinecut.ingest.planning import plan_film
from cinecut.models import KEYFRAME_SOURCES
from cinecut.workdir import keyframe_name

# --------------------------------------------------------------------------------------------- plan

times = st.floats(min_value=-5, max_value=400, allow_nan=False)
events = st.lists(
    st.tuples(times, st.floats(min_value=0, max_value=8)).map(
        lambda p: DialogueEvent(p[0], p[0] + p[1], "x")
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(
    duration=st.floats(min_value=0.01, max_value=400),
    dialogue=events,
    scenes=st.lists(times, max_size=60),
    max_gap=st.floats(min_value=1, max_value=60),
    spacing_ratio=st.floats(min_value=0, max_value=0.49),
)
def test_plan_properties(duration, dialogue, scenes, max_gap, spacing_ratio):
    min_spacing = max_gap * spacing_ratio
    plan = plan_keyframes(duration, dialogue, scenes, max_gap=max_gap, min_spacing=min_spacing)
    ts = [t for t, _ in plan]
    assert plan, "a non-empty film always gets a keyframe"
    assert ts == sorted(ts)
    assert all(0 <= t < duration for t in ts)
    assert all(s in KEYFRAME_SOURCES for _, s in plan)
    names = [keyframe_name(t) for t in ts]
    assert len(set(names)) == len(names), "two keyframes would share a file"
    assert all(b - a >= min_spacing * (1 - 1e-9) for a, b in itertools.pairwise(ts))
    for a, b in itertools.pairwise([0.0, *ts, duration]):
        assert b - a <= max_gap, f"gap {a}..{b} exceeds {max_gap}"
    taken = {int(t * 1000) for t in ts}
    for ev in dialogue:
        m = ev.midpoint_s
        if 0 <= m < duration:  # kept, or dropped only as a near-duplicate of a kept keyframe
            assert int(m * 1000) in taken or any(abs(t - m) < min_spacing for t in ts)
    kept_sources = {s for _, s in plan}
    if not any(0 <= ev.midpoint_s < duration for ev in dialogue):
        assert "subtitle_midpoint" not in kept_sources


def test_plan_sources_and_priorities():
    dialogue = [
        DialogueEvent(10.0, 12.0, "a"),
        DialogueEvent(10.2, 12.0, "dup ms"),
        DialogueEvent(40, 41, "b"),
    ]
    plan = plan_keyframes(100.0, dialogue, [11.2, 20.0, 20.1, 150.0], max_gap=30.0, min_spacing=0.5)
    assert plan == [
        (11.0, "subtitle_midpoint"),
        (20.0, "scene_change"),
        (40.5, "subtitle_midpoint"),
        (70.25, "interval_fallback"),
    ]


def test_plan_without_subtitles_uses_scenes_and_intervals():
    assert plan_keyframes(100.0, [], []) == [
        (25.0, "interval_fallback"),
        (50.0, "interval_fallback"),
        (75.0, "interval_fallback"),
    ]
    assert plan_keyframes(12.0, [], []) == [(6.0, "interval_fallback")]
    assert plan_keyframes(0.0, [], []) == []
    plan = plan_keyframes(70.0, [], [35.0])
    assert plan == [(17.5, "interval_fallback"), (35.0, "scene_change"), (52.5, "interval_fallback")]


def test_plan_rejects_bad_parameters():
    with pytest.raises(ValueError, match="max_gap"):
        plan_keyframes(10.0, [], [], max_gap=0)
    with pytest.raises(ValueError, match="min_spacing"):
        plan_keyframes(10.0, [], [], max_gap=1.0, min_spacing=0.5)


def test_group_runs_splits_on_gaps_and_size():
    ts = [1.0, 2.0, 3.0, 30.0, 31.0, 32.0, 33.0]
    runs = group_runs(ts, seek_gap_s=10, max_per_run=3)
    assert [idx for _, idx in runs] == [[0, 1, 2], [3, 4, 5], [6]]
    assert all(0 <= start < ts[idx[0]] for start, idx in runs)


# ----------------------------------------------------------------------------------- scenes, files


def test_scene_detection_finds_the_cuts(synthetic_film_template):
    found = detect_scene_changes(synthetic_film_template.video)
    cuts = synthetic_film_template.cut_times
    assert len(found) == len(cuts)
    for cut in cuts:
        assert any(abs(f - cut) <= 0.2 for f in found), f"cut at {cut} missed: {found}"


def _expected_frame(t: float, fps: float = 24.0) -> int:
    """The first frame at or after t (what ``ffmpeg -ss t`` shows)."""
    return math.ceil(t * fps - 1e-6)


def _film_plan(film) -> list[tuple[float, str]]:
    dialogue = parse_subtitles(film.subtitle)
    plan = plan_keyframes(film.duration_s, dialogue, list(film.cut_times), max_gap=2.0, min_spacing=0.0)
    # timestamps between frames, two inside one frame interval, exact frame times (stored rounded to the
    # millisecond by Matroska, so a hair *before* the timestamp), and one inside the last frame
    extra = [0.0, 12.3456, 12.3567, 100 / 24, 548 / 24, 579 / 24, film.duration_s - 0.01]
    plan += [(t, "interval_fallback") for t in extra]
    unique = {keyframe_name(t): (t, s) for t, s in sorted(plan, reverse=True)}
    return sorted(unique.values())


def test_batched_equals_per_frame_and_shows_the_right_frames(tmp_path: Path, synthetic_film_template):
    film = synthetic_film_template
    plan = _film_plan(film)
    batched = extract_keyframes(film.video, plan, tmp_path / "batched", max_per_run=8, workers=2)
    single = extract_keyframes_per_frame(film.video, plan, tmp_path / "single")
    assert [Path(r.frame_path).name for r in batched] == [Path(r.frame_path).name for r in single]
    assert len(batched) == len(plan) == len(list((tmp_path / "batched").glob("frame_*.jpg")))
    assert [(r.timestamp_s, r.source) for r in batched] == plan
    assert all(Path(r.frame_path).is_absolute() and is_complete_jpeg(Path(r.frame_path)) for r in batched)
    shown = read_frame_numbers([Path(r.frame_path) for r in batched])  # decodes every JPEG
    last = round(film.duration_s * film.fps) - 1
    expected = [min(_expected_frame(t), last) for t, _ in plan]
    assert shown == expected
    assert read_frame_numbers([Path(r.frame_path) for r in single]) == expected
    assert not any(p.name.startswith(TMP_DIR_PREFIX) for p in (tmp_path / "batched").iterdir())


def test_resume_keeps_complete_files_and_redoes_broken_ones(tmp_path: Path, synthetic_film_template):
    film = synthetic_film_template
    plan = [(t, "interval_fallback") for t in (1.0, 3.0, 7.5, 14.0, 22.0, 27.25)]
    out = tmp_path / "kf"
    first = extract_keyframes(film.video, plan, out)
    paths = [Path(r.frame_path) for r in first]
    before = {p: p.stat().st_mtime_ns for p in paths}
    paths[1].unlink()
    with open(paths[4], "r+b") as f:  # a file cut short by a crash
        f.truncate(100)
    stale = out / f"{TMP_DIR_PREFIX}999999999-dead.tmp"  # a crashed run's scratch dir (pid cannot exist)
    stale.mkdir()
    (stale / "000001.jpg").write_bytes(b"x")
    os.utime(paths[0], ns=(1, 1))
    again = extract_keyframes(film.video, plan, out)
    assert again == first
    assert paths[0].stat().st_mtime_ns == 1, "a complete frame was extracted again"
    for i in (2, 3, 5):
        assert paths[i].stat().st_mtime_ns == before[paths[i]]
    assert all(is_complete_jpeg(p) for p in paths)
    assert read_frame_numbers([paths[1], paths[4]]) == [72, 528]
    assert not stale.exists()


def test_extraction_errors_are_clear(tmp_path: Path, synthetic_film_template):
    with pytest.raises(ValueError, match="unknown keyframe source"):
        extract_keyframes(synthetic_film_template.video, [(1.0, "whim")], tmp_path / "a")
    junk = tmp_path / "junk.mkv"
    junk.write_bytes(b"\x00" * 1000)
    from cinecut.ingest import UnsupportedMediaError

    with pytest.raises(UnsupportedMediaError):
        extract_keyframes(junk, [(1.0, "scene_change")], tmp_path / "b")
    assert list((tmp_path / "b").iterdir()) == []


def test_keyframe_images_decode_at_proxy_size(tmp_path: Path, synthetic_film_template):
    rec = extract_keyframes(synthetic_film_template.video, [(5.0, "scene_change")], tmp_path)[0]
    out = subprocess.run(
        [
            "ffprobe",
            "-v",
            "error",
            "-show_entries",
            "stream=codec_name,width,height",
            "-of",
            "csv=p=0",
            rec.frame_path,
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert out == "mjpeg,320,240"


def test_film_plan_without_subtitles_warns(synthetic_film_template, caplog: pytest.LogCaptureFixture):
    film = synthetic_film_template
    with caplog.at_level(logging.WARNING, logger="cinecut.ingest.planning"):
        fp = plan_film(film.video, None, max_gap=4.0)
    assert fp.warnings == ("no subtitles: keyframes come from scene changes and intervals only",)
    assert "no subtitles" in caplog.text
    assert {s for _, s in fp.plan} == {"scene_change", "interval_fallback"}
    assert [t for t, s in fp.plan if s == "scene_change"] == list(film.cut_times)
    assert fp.timestamps == sorted(fp.timestamps) and fp.duration_s == pytest.approx(film.duration_s, abs=0.1)


def test_film_plan_with_subtitles(tmp_path: Path, synthetic_film_template):
    film = synthetic_film_template
    fp = plan_film(film.video, film.subtitle, duration_s=film.duration_s)
    assert fp.warnings == ()
    mids = [t for t, s in fp.plan if s == "subtitle_midpoint"]
    assert mids == [(a + b) / 2 for a, b, _ in film.events]
    only_comments = tmp_path / "c.ass"
    only_comments.write_text(
        "[Script Info]\nScriptType: v4.00+\n\n[V4+ Styles]\n"
        "Format: Name, Fontname, Fontsize\nStyle: Default,Arial,20\n\n[Events]\n"
        "Format: Layer, Start, End, Style, Name, MarginL, MarginR, MarginV, Effect, Text\n"
        "Comment: 0,0:00:01.00,0:00:02.00,Default,,0,0,0,,note\n",
        encoding="utf-8",
    )
    fp = plan_film(film.video, only_comments, duration_s=film.duration_s)
    assert fp.warnings == ("c.ass has no dialogue: keyframes come from scene changes and intervals only",)
    bad = tmp_path / "bad.srt"
    bad.write_text("not subtitles at all\n", encoding="utf-8")
    with pytest.raises(SubtitleError):
        plan_film(film.video, bad)
