"""Salvage instead of redo: after a subtitle change only new keyframe timestamps reach the model.

Real ffmpeg film, real tiny LLaVA, real invalidation through the stamps. Which frames the model
described is read from the engine's own log line ("frame <path> described in ..."), never from a
wrapper around the engine; results are compared with a full redo of the same inputs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgpack
import pytest
import upstream_reader as up
from test_pipeline import analyzed_film, clone_film_dir

from cinecut.demo.film import SyntheticFilm
from cinecut.inference.cache import decode_cache, load_cache
from cinecut.inference.models import SceneDescription
from cinecut.inference.salvage import (
    SALVAGE_NAME,
    Salvage,
    decode_salvage,
    frame_key,
    read_salvage,
)
from cinecut.pipeline import AnalysisResult, analyze
from cinecut.progress import EventKind, ProgressEvent
from cinecut.revalidate import revalidate
from cinecut.stages import Input, invalidate
from cinecut.stamp import SourceStamp
from cinecut.workdir import WorkDir, subtitle_sidecars

REPO = Path(__file__).resolve().parents[1]
_DESCRIBED = re.compile(r"frame (.+) described in ")

# --------------------------------------------------------------------------------------------- helpers


def _srt_time(t: float) -> str:
    ms = round(t * 1000)
    h, rem = divmod(ms, 3_600_000)
    m, rem = divmod(rem, 60_000)
    s, ms = divmod(rem, 1000)
    return f"{h:02d}:{m:02d}:{s:02d},{ms:03d}"


def write_srt(path: Path, events: list[tuple[float, float, str]]) -> None:
    """Write events as an SRT file (a new mtime: the edit the daemon and the pipeline must notice)."""
    blocks = [f"{n}\n{_srt_time(a)} --> {_srt_time(b)}\n{text}\n" for n, (a, b, text) in enumerate(events, 1)]
    path.write_text("\n".join(blocks), encoding="utf-8")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a later mtime on any clock


def retimed(events: tuple[tuple[float, float, str], ...], lines: tuple[int, ...], by: float) -> list:
    """The same subtitles with a few lines shifted by ``by`` seconds (a fixed sync of a few cues)."""
    return [(a + by, b + by, t) if i in lines else (a, b, t) for i, (a, b, t) in enumerate(events)]


def other_release(events: tuple[tuple[float, float, str], ...]) -> list:
    """Another release's subtitles for the same film: its own timing and line breaks throughout."""
    out = []
    for i, (a, b, text) in enumerate(events):
        a2, b2 = a + 0.23 + 0.05 * (i % 3), b - 0.11
        if b2 - a2 > 1.2 and i % 2 == 0:  # split long cues in two, as releases differ in segmentation
            mid = (a2 + b2) / 2
            out += [(a2, mid - 0.05, text), (mid + 0.05, b2, text)]
        else:
            out.append((a2, b2, text))
    return out


class EngineLog(logging.Handler):
    """Collects the JPEG names the real engine reports as described."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.frames: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        m = _DESCRIBED.match(record.getMessage())
        if m:
            self.frames.append(Path(m.group(1)).name)


@pytest.fixture
def engine_log() -> Any:
    logger = logging.getLogger("cinecut.inference")  # whichever engine describes the frames
    handler, level = EngineLog(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def run(film: Path, tiny: Any, tmp_path: Path, **kw: Any) -> AnalysisResult:
    return analyze(film, model=tiny.model_path, mmproj=tiny.mmproj_path, n_gpu_layers=0,
                   gpu_lock_path=tmp_path / "gpu.lock", **kw)


def by_key(results: Any) -> dict[int, Any]:
    return {frame_key(r.timestamp_s): d for r, d in results}


def names_of(keys: Any) -> list[str]:
    return sorted(f"frame_{k:010d}.jpg" for k in keys)


def subtitle_of(film: Path) -> Path:
    return next(p for p in film.parent.iterdir() if p.suffix == ".srt")


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory, synthetic_film_template, tiny_llava) -> Path:
    return analyzed_film(tmp_path_factory, synthetic_film_template, tiny_llava)[0]


@pytest.fixture
def clone(analyzed: Path, tmp_path: Path) -> Path:
    return clone_film_dir(analyzed, tmp_path / "lib" / "Demo Film (2024)")


def full_redo(film: Path, tiny: Any, tmp_path: Path) -> AnalysisResult:
    """The same video and subtitles analysed from nothing (a fresh folder, no work dir, no store)."""
    folder = tmp_path / "redo" / film.parent.name
    folder.mkdir(parents=True)
    shutil.copy2(film, folder / film.name)
    shutil.copy2(subtitle_of(film), folder / subtitle_of(film).name)
    return run(folder / film.name, tiny, tmp_path)


def check_salvage_run(clone: Path, new_events: list, tiny: Any, tmp_path: Path, engine_log: EngineLog) -> dict:
    """Edit the subtitles, run, and check that exactly the new timestamps were described."""
    wd = WorkDir.for_film(clone)
    old = load_cache(clone, wd)
    assert old is not None
    old_desc = by_key(old)
    write_srt(subtitle_of(clone), new_events)
    events: list[ProgressEvent] = []
    result = run(clone, tiny, tmp_path, progress=events.append)

    assert "inference" in result.invalidated and not result.cache_hit
    new_keys = [frame_key(t) for t in json.loads(wd.timestamps_path.read_text())]
    fresh = sorted(set(new_keys) - set(old_desc))
    kept = sorted(set(new_keys) & set(old_desc))
    assert sorted(engine_log.frames) == names_of(fresh)  # the model saw exactly the new timestamps
    assert (result.frames_computed, result.frames_salvaged) == (len(fresh), len(kept))
    salvaged = [e for e in events if e.kind is EventKind.SALVAGED]
    assert [(e.done, e.total, e.message) for e in salvaged] == [
        (len(kept), len(new_keys), f"salvaged {len(kept)} of {len(new_keys)} frames")
    ]
    # What upstream loads: a complete, valid cache of the new plan; records and paths from the new plan.
    loaded = up.load_cache(clone, wd.path)
    assert loaded is not None and [frame_key(r.timestamp_s) for r, _ in loaded] == new_keys
    for rec, desc in loaded:
        assert rec.frame_path == str(wd.keyframes_dir / f"frame_{frame_key(rec.timestamp_s):010d}.jpg")
        assert Path(rec.frame_path).is_file()
        if frame_key(rec.timestamp_s) in old_desc:
            assert SceneDescription(desc.visual_content, desc.mood, desc.action, desc.setting) == old_desc[
                frame_key(rec.timestamp_s)
            ]
    assert not os.path.lexists(wd.path / SALVAGE_NAME) and not wd.partial_cache_path.exists()

    # Identical to a full redo of the same inputs, frame by frame (records, sources and descriptions).
    engine_log.frames.clear()
    redo = full_redo(clone, tiny, tmp_path)
    assert len(engine_log.frames) == len(new_keys)
    assert [(r.timestamp_s, r.source, d) for r, d in redo.results] == [
        (r.timestamp_s, r.source, d) for r, d in result.results
    ]
    return {"fresh": fresh, "kept": kept, "total": len(new_keys)}


# ----------------------------------------------------------------------------------------------- tests


def test_a_few_retimed_lines_describe_only_the_new_timestamps(
    clone: Path, synthetic_film_template: SyntheticFilm, tiny_llava, tmp_path: Path, engine_log: EngineLog
) -> None:
    events = synthetic_film_template.events
    got = check_salvage_run(clone, retimed(events, (1, 4), 0.4), tiny_llava, tmp_path, engine_log)
    assert 1 <= len(got["fresh"]) <= 4  # two cues moved: their midpoints (and what they displaced)
    assert len(got["kept"]) >= got["total"] - 4


def test_another_releases_subtitles_make_most_timestamps_new(
    clone: Path, synthetic_film_template: SyntheticFilm, tiny_llava, tmp_path: Path, engine_log: EngineLog
) -> None:
    got = check_salvage_run(clone, other_release(synthetic_film_template.events), tiny_llava, tmp_path, engine_log)
    assert len(got["fresh"]) > len(synthetic_film_template.events)  # every midpoint moved
    assert got["kept"]  # the scene changes come from the video: still salvaged


def test_a_changed_video_salvages_nothing_and_drops_an_earlier_store(
    clone: Path, synthetic_film_template: SyntheticFilm, tiny_llava, tmp_path: Path, engine_log: EngineLog
) -> None:
    wd = WorkDir.for_film(clone)
    # A subtitle change leaves a store (no run yet)...
    write_srt(subtitle_of(clone), retimed(synthetic_film_template.events, (2,), 0.4))
    rv = revalidate(clone, subtitle_sidecars(clone))
    assert rv.report is not None and rv.report.salvaged > 0 and read_salvage(wd.path) is not None
    # ...then the video changes too (a re-encode with the same duration).
    with open(clone, "ab") as f:
        f.write(b"\0" * 64)
    events: list[ProgressEvent] = []
    result = run(clone, tiny_llava, tmp_path, progress=events.append)
    assert result.frames_salvaged == 0 and not any(e.kind is EventKind.SALVAGED for e in events)
    assert result.frames_computed == result.records == len(engine_log.frames)
    assert not os.path.lexists(wd.path / SALVAGE_NAME)


def test_a_store_of_another_video_state_is_never_used(
    clone: Path, synthetic_film_template: SyntheticFilm, tiny_llava, tmp_path: Path, engine_log: EngineLog
) -> None:
    """Even if the video changed in a way no invalidation saw, the stamp check at use time refuses the store."""
    wd = WorkDir.for_film(clone)
    write_srt(subtitle_of(clone), retimed(synthetic_film_template.events, (2,), 0.4))
    invalidate(wd, [Input.SUBTITLE], reason="test")
    store = read_salvage(wd.path)
    assert store is not None and store.stamp == SourceStamp.of(clone)
    st = clone.stat()
    os.utime(clone, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    (wd.path / "cinecut_stamps.json").unlink()  # no witness of the change is left but the stamp itself
    result = run(clone, tiny_llava, tmp_path)
    assert result.frames_salvaged == 0 and result.frames_computed == result.records == len(engine_log.frames)


def test_a_second_subtitle_change_before_any_run_keeps_the_first_store(
    clone: Path, synthetic_film_template: SyntheticFilm, tiny_llava, tmp_path: Path, engine_log: EngineLog
) -> None:
    wd = WorkDir.for_film(clone)
    old = by_key(load_cache(clone, wd) or [])
    write_srt(subtitle_of(clone), retimed(synthetic_film_template.events, (1,), 0.4))
    assert revalidate(clone, subtitle_sidecars(clone)).report.salvaged == len(old)
    write_srt(subtitle_of(clone), retimed(synthetic_film_template.events, (1, 3), 0.4))
    rv = revalidate(clone, subtitle_sidecars(clone))
    assert rv.changed == [Input.SUBTITLE] and rv.report.salvaged == len(old)  # nothing lost on the way
    store = read_salvage(wd.path)
    assert store is not None and dict(store.frames) == old
    result = run(clone, tiny_llava, tmp_path)
    new_keys = {frame_key(r.timestamp_s) for r, _ in result.results}
    assert sorted(engine_log.frames) == names_of(new_keys - set(old))


def test_an_interrupted_run_loses_nothing_salvaged(
    clone: Path, synthetic_film_template: SyntheticFilm, tiny_llava, tmp_path: Path, engine_log: EngineLog
) -> None:
    """Stopped mid-inference after a subtitle change, then resumed: each new frame is described once."""
    from cinecut.pipeline import AnalysisStopped

    wd = WorkDir.for_film(clone)
    old = by_key(load_cache(clone, wd) or [])
    write_srt(subtitle_of(clone), other_release(synthetic_film_template.events))
    stop = [False]

    def after_first_computed(ev: ProgressEvent) -> None:
        if ev.kind is EventKind.FRAME and ev.computed == 1:
            stop[0] = True

    with pytest.raises(AnalysisStopped):
        run(clone, tiny_llava, tmp_path, progress=after_first_computed, should_stop=lambda: stop[0])
    assert read_salvage(wd.path) is not None  # kept until a complete cache exists
    result = run(clone, tiny_llava, tmp_path)
    new_keys = {frame_key(r.timestamp_s) for r, _ in result.results}
    assert sorted(engine_log.frames) == names_of(new_keys - set(old))  # none twice, none salvaged
    assert not os.path.lexists(wd.path / SALVAGE_NAME)


FAULT_POINTS = (
    "salvage.before_write",
    "atomic_write.before_rename",  # the store's own temp file, before it is renamed into place
    "salvage.after_write",
    "invalidate.before_checkpoint",
    "invalidate.after_checkpoint",
    "invalidate.after_artifact",
    "revalidate.before_stamps",
)


@pytest.mark.parametrize("point", FAULT_POINTS)
def test_sigkill_during_the_salvage_loses_nothing_and_never_leaves_a_partial_cache(
    clone: Path, synthetic_film_template: SyntheticFilm, tiny_llava, tmp_path: Path, engine_log: EngineLog,
    point: str,
) -> None:
    wd = WorkDir.for_film(clone)
    cache_bytes = wd.cache_path.read_bytes()
    old = by_key(decode_cache(cache_bytes)[1])
    write_srt(subtitle_of(clone), retimed(synthetic_film_template.events, (1, 4), 0.4))
    code = (
        "import sys; from pathlib import Path; from cinecut.revalidate import revalidate; "
        "from cinecut.workdir import subtitle_sidecars; f = Path(sys.argv[1]); "
        "revalidate(f, subtitle_sidecars(f))"
    )
    env = {**os.environ, "CINECUTD_FAULTS": f"kill:{point}"}
    proc = subprocess.run([sys.executable, "-c", code, str(clone)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == -9, (point, proc.returncode, proc.stderr)

    # Under the cache's name: the old cache byte for byte, or nothing (never a partial set).
    if wd.cache_path.exists():
        assert wd.cache_path.read_bytes() == cache_bytes
    # Every description is still somewhere: in the cache, in the store, or in both.
    store = read_salvage(wd.path)
    held = dict(store.frames) if store is not None else {}
    if wd.cache_path.exists():
        held.update(old)
    assert held == old, point
    # The next run recovers and describes only the new timestamps.
    result = run(clone, tiny_llava, tmp_path)
    new_keys = {frame_key(r.timestamp_s) for r, _ in result.results}
    assert sorted(engine_log.frames) == names_of(new_keys - set(old)), point
    assert result.frames_salvaged == len(new_keys & set(old))
    loaded = up.load_cache(clone, wd.path)
    assert loaded is not None and len(loaded) == len(new_keys)


# ---------------------------------------------------------------------------------------- the store


def test_the_store_is_never_readable_as_a_cache_and_rejects_hostile_bytes(tmp_path: Path) -> None:
    desc = SceneDescription("a", "b", "c", "d")
    store = Salvage("/lib/f.mkv", SourceStamp(1.5, 10), 3, {1500: desc, 200: desc})
    data = store.encode()
    assert decode_salvage(data) == store
    with pytest.raises(ValueError):
        decode_cache(data)  # upstream-shaped readers refuse it
    assert set(msgpack.unpackb(data, raw=False)) != {"metadata", "results"}
    for bad in (b"", b"\xc1", data[:-1], data + b"\0", msgpack.packb({"format": "x"}),
                msgpack.packb([1, 2]), msgpack.packb({**msgpack.unpackb(data), "frames": [[1, {"a": 1}]]}),
                msgpack.packb({**msgpack.unpackb(data), "frames": [[-1, desc.to_dict()]]}),
                msgpack.packb({**msgpack.unpackb(data), "mtime": "x"}),
                b"\xdd\xff\xff\xff\xff" * 3):
        with pytest.raises(ValueError):
            decode_salvage(bad)


def test_frames_the_model_failed_on_are_not_salvaged(analyzed: Path, tmp_path: Path) -> None:
    film = copy_film_with_cache(analyzed, tmp_path)
    wd = WorkDir.for_film(film)
    meta, results = decode_cache(wd.cache_path.read_bytes())
    failed = {frame_key(results[0][0].timestamp_s)}
    from cinecut.inference.cache import save_cache

    save_cache([(r, None if frame_key(r.timestamp_s) in failed else d) for r, d in results], film, wd,
               stamp=meta.stamp)
    report = invalidate(wd, [Input.SUBTITLE], reason="test")
    store = read_salvage(wd.path)
    assert store is not None and set(store.frames) == set(by_key(results)) - failed
    assert (report.salvaged, report.salvaged_of) == (len(results) - 1, len(results))


def copy_film_with_cache(analyzed: Path, tmp_path: Path) -> Path:
    return clone_film_dir(analyzed, tmp_path / "lib" / "Demo Film (2024)")


def test_a_video_change_salvages_nothing(analyzed: Path, tmp_path: Path) -> None:
    """A video change deletes the cache without salvaging; so does an invalidation of the whole graph."""
    for changed in ([Input.VIDEO], [Input.VIDEO, Input.SUBTITLE]):
        film = clone_film_dir(analyzed, tmp_path / changed[-1] / "Demo Film (2024)")
        wd = WorkDir.for_film(film)
        report = invalidate(wd, changed, reason="test")
        assert report.salvaged == 0 and not os.path.lexists(wd.path / SALVAGE_NAME)
        assert wd.cache_name in report.files_removed



def test_cinecut_analyze_says_how_many_frames_it_salvaged(
    clone: Path, synthetic_film_template: SyntheticFilm, tiny_llava, tmp_path: Path
) -> None:
    wd = WorkDir.for_film(clone)
    old = set(by_key(load_cache(clone, wd) or []))
    write_srt(subtitle_of(clone), retimed(synthetic_film_template.events, (1, 4), 0.4))
    out = tmp_path / "out.json"
    p = subprocess.run(
        [str(Path(sys.executable).parent / "cinecut"), "analyze", str(clone), "--model", str(tiny_llava.model_path),
         "--mmproj", str(tiny_llava.mmproj_path), "--n-gpu-layers", "0", "--gpu-lock", str(tmp_path / "gpu.lock"),
         "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert p.returncode == 0, p.stderr
    data = json.loads(out.read_text())
    keys = {frame_key(r["record"]["timestamp_s"]) for r in data["results"]}
    kept = len(keys & old)
    assert f"salvaged {kept} of {len(keys)} frames" in p.stdout
    assert (data["frames_salvaged"], data["frames_computed"]) == (kept, len(keys - old))
