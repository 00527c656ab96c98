"""analyze(): stages 1 to 4 with real ffmpeg, the tiny generated LLaVA, and upstream's own reader calls.

The helpers at the top are shared with the CLI and worker tests: ingesting a film costs seconds, so a
finished analysis and a "ready for inference" work dir are built once per session and cloned (as
``cp -a`` would copy a library folder, then the checkpoint rewritten as a rename migration does).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import upstream_reader as up

from cinecut import safefs
from cinecut.checkpoint import load_checkpoint, save_checkpoint
from cinecut.demo.film import SyntheticFilm, make_synthetic_film
from cinecut.demo.tinymodel import TinyLlava
from cinecut.inference import session
from cinecut.inference.cache import CacheMetadata, load_cache, read_cache_file, save_cache
from cinecut.inference.engine import LlavaEngine
from cinecut.inference.partial import PartialHeader, PartialWriter, plan_of, read_partial
from cinecut.locks import GpuLock, work_dir_lock
from cinecut.models import KeyframeRecord
from cinecut.pipeline import (
    AnalysisStopped,
    BusyError,
    FilmChangedError,
    ModelError,
    WorkDirError,
    analyze,
    cap_plan,
    choose_subtitle,
    default_gpu_lock_path,
    prepare_lock_dir,
)
from cinecut.progress import EventKind, ProgressEvent
from cinecut.stages import Input, invalidate
from cinecut.stamp import SourceStamp
from cinecut.stamps import read_stamps
from cinecut.workdir import WorkDir

# ----------------------------------------------------------------------------------- shared helpers


class CountingFactory:
    """Builds real LlavaEngines and counts them: the proof that a cache hit never loads the model."""

    def __init__(self) -> None:
        self.built = 0

    def __call__(self, model: Path, mmproj: Path, **kwargs: Any) -> LlavaEngine:
        self.built += 1
        return LlavaEngine(model, mmproj, **kwargs)


def copy_film(template: SyntheticFilm, folder: Path) -> Path:
    """The film and its subtitle sidecar, copied with their mtimes."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy2(template.video, folder / template.video.name)
    if template.subtitle is not None:
        shutil.copy2(template.subtitle, folder / template.subtitle.name)
    return folder / template.video.name


def clone_film_dir(film: Path, folder: Path, *, keep_cache: bool = True) -> Path:
    """Copy a film's folder (film, sidecars, work dir) and re-home the work dir's absolute paths.

    ``keep_cache=False`` leaves the work dir "ready for inference": stages 1-3 complete, no cache, and
    partial results holding only the plan, as a run stopped before its first frame leaves it.
    """
    shutil.copytree(film.parent, folder, ignore=shutil.ignore_patterns(".ready", "*.facts.json"))
    new_film = folder / film.name
    wd = WorkDir.for_film(new_film)
    ckpt = load_checkpoint(wd)
    assert ckpt is not None
    ckpt.source_file = str(new_film)
    ckpt.proxy_path = str(wd.proxy_path)
    save_checkpoint(ckpt, wd)
    if wd.cache_path.exists():
        meta, results = read_cache_file(wd.cache_path)
        moved = [
            (KeyframeRecord(r.timestamp_s, str(wd.keyframes_dir / Path(r.frame_path).name), r.source), d)
            for r, d in results
        ]
        if keep_cache:
            save_cache(moved, new_film, wd, stamp=meta.stamp)
        else:
            header = PartialHeader.for_plan(str(new_film), meta.stamp, plan_of([r for r, _ in moved]))
            with safefs.work_dir_fd(wd.path) as fd:
                PartialWriter.create(fd, wd.partial_name, header).close()
            wd.cache_path.unlink()
    return new_film


def _shared(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    return tmp_path_factory.getbasetemp() / name


def analyzed_film(
    tmp_path_factory: pytest.TempPathFactory, template: SyntheticFilm, tiny: TinyLlava
) -> tuple[Path, dict[str, Any]]:
    """A film fully analysed once per session (default plan), and the facts of that first run."""
    base = _shared(tmp_path_factory, "cinecut-analyzed")
    facts_path = base / "run.facts.json"
    if not (base / ".ready").exists():
        shutil.rmtree(base, ignore_errors=True)
        film = copy_film(template, base)
        factory, events = CountingFactory(), []
        result = analyze(
            film,
            model=tiny.model_path,
            mmproj=tiny.mmproj_path,
            n_gpu_layers=0,
            gpu_lock_path=base.parent / "analyzed-gpu.lock",
            progress=events.append,
            engine_factory=factory,
        )
        facts = {
            "engines": factory.built,
            "events": [[e.kind.value, e.stage, e.done, e.total] for e in events],
            "stages_run": result.stages_run,
            "frames_computed": result.frames_computed,
            "warnings": result.warnings,
        }
        facts_path.write_text(json.dumps(facts))
        (base / ".ready").touch()
    return base / template.video.name, json.loads(facts_path.read_text())


def ready_for_inference_film(
    tmp_path_factory: pytest.TempPathFactory, template: SyntheticFilm, tiny: TinyLlava
) -> Path:
    """A film with a dense plan (~45 keyframes), stages 1-3 done, stopped before its first frame.

    Long enough (in frames) that a test reacting to the first progress line lands mid-inference.
    """
    base = _shared(tmp_path_factory, "cinecut-dense")
    if not (base / ".ready").exists():
        shutil.rmtree(base, ignore_errors=True)
        # The analysed film's proxy is reused; only the keyframes are planned again, more densely.
        film = clone_film_dir(analyzed_film(tmp_path_factory, template, tiny)[0], base, keep_cache=False)
        invalidate(WorkDir.for_film(film), [Input.SUBTITLE], reason="a denser keyframe plan")
        in_inference = threading.Event()

        def watch(ev: ProgressEvent) -> None:
            if ev.kind is EventKind.STAGE and ev.stage == "inference":
                in_inference.set()

        with pytest.raises(AnalysisStopped):
            analyze(
                film,
                model=tiny.model_path,
                mmproj=tiny.mmproj_path,
                n_gpu_layers=0,
                gpu_lock_path=base.parent / "dense-gpu.lock",
                progress=watch,
                should_stop=in_inference.is_set,
                max_gap=0.8,
                min_spacing=0.3,
            )
        (base / ".ready").touch()
    return base / template.video.name


def partial_count(film: Path) -> int:
    got = read_partial(WorkDir.for_film(film).partial_cache_path)
    return got.done if got is not None else 0


def upstream_results(film: Path) -> list[tuple[up.KeyframeRecord, up.SceneDescription | None]]:
    """The cache as upstream loads it (raises where upstream would)."""
    got = up.load_cache(film, WorkDir.for_film(film).path)
    assert got is not None, "upstream sees no valid cache"
    return got


# ----------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory, synthetic_film_template, tiny_llava) -> tuple[Path, dict[str, Any]]:
    return analyzed_film(tmp_path_factory, synthetic_film_template, tiny_llava)


@pytest.fixture
def clone(analyzed, tmp_path: Path) -> Path:
    return clone_film_dir(analyzed[0], tmp_path / "lib" / "Demo Film (2024)")


@pytest.fixture
def ready(analyzed, tmp_path: Path) -> Path:
    """A clone with stages 1-3 complete and no cache: the next run is pure inference."""
    return clone_film_dir(analyzed[0], tmp_path / "lib" / "Demo Film (2024)", keep_cache=False)


def run(film: Path, tiny: TinyLlava, tmp_path: Path, **kw: Any):
    kw.setdefault("n_gpu_layers", 0)
    kw.setdefault("gpu_lock_path", tmp_path / "gpu.lock")
    return analyze(
        film, model=kw.pop("model", tiny.model_path), mmproj=kw.pop("mmproj", tiny.mmproj_path), **kw
    )


# -------------------------------------------------------------------------------------------- tests


def test_full_analysis_leaves_exactly_the_upstream_layout(analyzed, synthetic_film_template) -> None:
    film, facts = analyzed
    wd = WorkDir.for_film(film)
    assert sorted(os.listdir(wd.path)) == sorted(
        [
            "pipeline_checkpoint.json",
            wd.cache_name,
            wd.proxy_name,
            "keyframe_timestamps.json",
            "keyframes",
            "cinecut.lock",
            "cinecut_stamps.json",
        ]
    )
    raw = json.loads(wd.checkpoint_path.read_text())
    assert set(raw) == up.UPSTREAM_CHECKPOINT_KEYS
    ckpt = up.PipelineCheckpoint(**raw)
    assert ckpt.source_file == str(film)
    assert ckpt.stages_complete == ["proxy", "subtitles", "keyframes"]
    assert ckpt.proxy_path == str(wd.proxy_path) and wd.proxy_path.stat().st_size > 0
    assert ckpt.proxy_duration_s == pytest.approx(synthetic_film_template.duration_s, abs=0.1)
    assert ckpt.dialogue_event_count == len(synthetic_film_template.events)
    assert (ckpt.inference_complete, ckpt.cache_hit) == (True, False)
    assert ckpt.structural_anchors is None and ckpt.manifest_path is None

    timestamps = json.loads(wd.timestamps_path.read_text())
    assert timestamps == sorted(timestamps) and all(isinstance(t, float) for t in timestamps)
    assert ckpt.keyframe_count == len(timestamps) > 0
    names = sorted(os.listdir(wd.keyframes_dir))
    assert names == sorted(f"frame_{int(t * 1000):010d}.jpg" for t in timestamps)

    data = msgpack.unpackb(wd.cache_path.read_bytes(), raw=False, strict_map_key=False)
    assert list(data) == ["metadata", "results"]
    assert data["metadata"] == {"source_file": str(film), **SourceStamp.of(film).to_dict()}
    results = upstream_results(film)
    assert [r.timestamp_s for r, _ in results] == timestamps
    assert all(Path(r.frame_path).is_absolute() and Path(r.frame_path).is_file() for r, _ in results)
    sources = {r.source for r, _ in results}
    assert "subtitle_midpoint" in sources and "scene_change" in sources
    mids = [r.timestamp_s for r, _ in results if r.source == "subtitle_midpoint"]
    assert mids == [(a + b) / 2 for a, b, _ in synthetic_film_template.events]
    assert all(d is not None and d.visual_content for _, d in results)

    stamps = read_stamps(wd.path)
    assert stamps is not None and stamps.video == SourceStamp.of(film)
    assert facts["engines"] == 1
    assert facts["stages_run"] == ["proxy", "subtitles", "keyframes", "inference"]
    starts = [stage for kind, stage, _, _ in facts["events"] if kind == "stage"]
    assert starts == ["proxy", "subtitles", "keyframes", "inference"]
    frames = [(done, total) for kind, _, done, total in facts["events"] if kind == "frame"]
    assert frames == [(i, len(timestamps)) for i in range(1, len(timestamps) + 1)]
    assert facts["frames_computed"] == len(timestamps) and facts["warnings"] == []


def test_second_run_is_a_cache_hit_that_never_loads_the_model(clone: Path, tmp_path: Path) -> None:
    wd = WorkDir.for_film(clone)
    before = {
        p.name: p.stat().st_mtime_ns for p in [wd.cache_path, wd.proxy_path, *wd.keyframes_dir.iterdir()]
    }
    factory, events = CountingFactory(), []
    result = analyze(
        clone,
        model=tmp_path / "absent.gguf",
        mmproj=tmp_path / "absent-mmproj.gguf",
        gpu_lock_path=tmp_path / "gpu.lock",
        engine_factory=factory,
        progress=events.append,
    )
    assert factory.built == 0
    assert result.cache_hit and result.stages_run == [] and result.frames_computed == 0
    assert [(r.timestamp_s, d) for r, d in result.results] == [
        (r.timestamp_s, d) for r, d in load_cache(clone, wd) or []
    ]
    hit = [e for e in events if e.kind is EventKind.CACHE_HIT]
    assert len(hit) == 1 and hit[0].done == result.records and hit[0].path == str(wd.cache_path)
    ckpt = up.load_checkpoint_strict(wd.path)
    assert (ckpt.inference_complete, ckpt.cache_hit) == (True, True)
    assert ckpt.stages_complete == ["proxy", "subtitles", "keyframes"]
    after = {
        p.name: p.stat().st_mtime_ns for p in [wd.cache_path, wd.proxy_path, *wd.keyframes_dir.iterdir()]
    }
    assert after == before  # nothing was recomputed or rewritten


def test_replaced_film_resets_every_stage_and_recomputes(clone: Path, tiny_llava, tmp_path: Path) -> None:
    wd = WorkDir.for_film(clone)
    # Later stages of an upstream run, and a manifest the user edited.
    ckpt = load_checkpoint(wd)
    assert ckpt is not None
    ckpt.stages_complete += ["structural", "narrative", "assembly", "music"]
    ckpt.manifest_path = str(wd.path / "TRAILER_MANIFEST.json")
    ckpt.structural_anchors = {"act1_end": 10.0}
    save_checkpoint(ckpt, wd)
    (wd.path / "TRAILER_MANIFEST.json").write_text('{"edited": true}')
    old_stamp = SourceStamp.of(clone)
    replacement = make_synthetic_film(tmp_path / "new.mkv", duration_s=8.0, with_subtitles=False)
    os.replace(replacement.video, clone)  # same name, new content (keeps the old subtitle sidecar)
    events: list[ProgressEvent] = []
    result = run(clone, tiny_llava, tmp_path, progress=events.append)
    assert set(result.invalidated) >= {
        "proxy",
        "subtitles",
        "keyframes",
        "structural",
        "narrative",
        "inference",
    }
    assert any(e.kind is EventKind.INVALIDATED and "film" in e.message for e in events)
    assert result.stages_run == ["proxy", "subtitles", "keyframes", "inference"]
    new = up.load_checkpoint_strict(wd.path)
    assert new.stages_complete == ["proxy", "subtitles", "keyframes"]
    assert new.proxy_duration_s == pytest.approx(8.0, abs=0.1)
    assert new.manifest_path is None and new.structural_anchors is None
    assert (wd.path / "TRAILER_MANIFEST.json").read_text() == '{"edited": true}'  # user data stays
    meta = CacheMetadata.from_obj(msgpack.unpackb(wd.cache_path.read_bytes(), raw=False)["metadata"])
    assert meta.stamp == SourceStamp.of(clone) != old_stamp
    timestamps = json.loads(wd.timestamps_path.read_text())
    assert all(t < 8.0 for t in timestamps) and new.keyframe_count == len(timestamps)
    assert sorted(os.listdir(wd.keyframes_dir)) == sorted(
        f"frame_{int(t * 1000):010d}.jpg" for t in timestamps
    )
    assert [r.timestamp_s for r, _ in upstream_results(clone)] == timestamps


@pytest.mark.parametrize("change_at", ["middle", "last"])
def test_film_changed_during_inference_is_never_saved(
    ready: Path, tiny_llava, tmp_path: Path, change_at: str
) -> None:
    wd = WorkDir.for_film(ready)
    total = len(json.loads(wd.timestamps_path.read_text()))
    at = 2 if change_at == "middle" else total
    old = SourceStamp.of(ready)

    def touch_film(ev: ProgressEvent) -> None:
        if ev.kind is EventKind.FRAME and ev.done == at:
            with open(ready, "ab") as f:
                f.write(b"\0" * 16)

    with pytest.raises(FilmChangedError, match="changed during analysis") as info:
        run(ready, tiny_llava, tmp_path, progress=touch_film)
    assert "results discarded" in str(info.value)
    assert not wd.cache_path.exists()
    assert not wd.partial_cache_path.exists()
    assert not any(n.endswith(".cache.tmp") for n in os.listdir(wd.path))
    assert up.load_checkpoint_strict(wd.path).stages_complete == []  # reset through the stage graph
    stamps = read_stamps(wd.path)  # the sidecar now records the new film: the next run starts over
    assert stamps is not None and stamps.video == SourceStamp.of(ready) != old


def test_stop_and_resume_redo_no_frame(ready: Path, tiny_llava, tmp_path: Path) -> None:
    wd = WorkDir.for_film(ready)
    total = len(json.loads(wd.timestamps_path.read_text()))
    k = total // 2
    stop = threading.Event()

    def stop_at_k(ev: ProgressEvent) -> None:
        if ev.kind is EventKind.FRAME and ev.done == k:
            stop.set()

    factory = CountingFactory()
    with pytest.raises(AnalysisStopped) as info:
        run(ready, tiny_llava, tmp_path, progress=stop_at_k, should_stop=stop.is_set, engine_factory=factory)
    assert (info.value.done, info.value.total) == (k, total)
    assert partial_count(ready) == k and not wd.cache_path.exists()
    assert up.load_checkpoint_strict(wd.path).inference_complete is None
    result = run(ready, tiny_llava, tmp_path, engine_factory=factory)
    assert (result.frames_resumed, result.frames_computed) == (k, total - k)  # zero frames re-done
    assert factory.built == 2 and result.stages_run == ["inference"]
    assert not wd.partial_cache_path.exists()
    # Resumed results equal a clean run's: the same model describes the same frames the same way.
    original = load_cache(ready, wd)
    assert original is not None and [d for _, d in original] == [d for _, d in result.results]


@pytest.mark.parametrize(
    ("n_gpu_layers", "gpu_build"), [(0, True), (-1, False), (-1, True)], ids=["cpu", "cpu-build", "gpu-build"]
)
def test_prewarm_yields_the_gpu_between_frames_and_resumes(
    ready: Path,
    tiny_llava,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    n_gpu_layers: int,
    gpu_build: bool,
) -> None:
    # Whether llama.cpp was built with GPU offload decides if the model's memory must be freed on yield;
    # the build at hand is CPU-only in CI, so both answers are given here.
    monkeypatch.setattr(session, "offloads_to_gpu", lambda: gpu_build)
    lock_path = tmp_path / "gpu.lock"
    k = 3
    seen: dict[str, Any] = {}
    interactive_done = threading.Event()
    events: list[ProgressEvent] = []

    def interactive_run() -> None:
        gpu = GpuLock(lock_path, purpose="cinecut analyze", interactive=True)
        gpu.acquire(10)
        seen["frames_at_grant"] = partial_count(ready)
        time.sleep(0.2)
        gpu.release()
        interactive_done.set()

    def on_event(ev: ProgressEvent) -> None:
        events.append(ev)
        if ev.kind is EventKind.FRAME and ev.done == k:
            threading.Thread(target=interactive_run, daemon=True).start()
            deadline = time.monotonic() + 10
            while not GpuLock(lock_path, purpose="probe", interactive=False).someone_waiting():
                assert time.monotonic() < deadline
                time.sleep(0.005)
            seen["frames_at_request"] = ev.done

    factory = CountingFactory()
    result = run(
        ready,
        tiny_llava,
        tmp_path,
        interactive=False,
        n_gpu_layers=n_gpu_layers,
        progress=on_event,
        engine_factory=factory,
    )
    assert interactive_done.is_set()
    kinds = [e.kind for e in events]
    assert kinds.count(EventKind.YIELDED) == 1 and kinds.count(EventKind.RESUMED) == 1
    yielded = next(e for e in events if e.kind is EventKind.YIELDED)
    assert yielded.done - seen["frames_at_request"] == 0  # not one more frame after the request
    assert seen["frames_at_grant"] == k
    assert result.frames_computed == result.records  # nothing redone around the yield
    # On the GPU the model's memory goes with the GPU; on the CPU the model stays loaded and is reused.
    assert factory.built == (2 if n_gpu_layers != 0 and gpu_build else 1)


def test_each_stage_resumes_from_the_checkpoint(synthetic_film_template, tiny_llava, tmp_path: Path) -> None:
    (tmp_path / "lib").mkdir()
    film = make_synthetic_film(tmp_path / "lib" / "Short.mkv", duration_s=6.0).video
    wd = WorkDir.for_film(film)
    stop = threading.Event()

    def after_proxy(ev: ProgressEvent) -> None:
        if ev.kind is EventKind.STAGE_DONE and ev.stage == "proxy":
            stop.set()

    with pytest.raises(AnalysisStopped):
        run(film, tiny_llava, tmp_path, progress=after_proxy, should_stop=stop.is_set)
    assert up.load_checkpoint_strict(wd.path).stages_complete == ["proxy"]
    proxy_before = wd.proxy_path.stat()
    result = run(film, tiny_llava, tmp_path, max_gap=1.5, max_keyframes=3)
    assert result.stages_run == ["subtitles", "keyframes", "inference"]
    assert wd.proxy_path.stat().st_mtime_ns == proxy_before.st_mtime_ns
    assert result.records == 3 and up.load_checkpoint_strict(wd.path).keyframe_count == 3


def test_no_subtitles_warns_and_plans_from_scenes_and_intervals(tiny_llava, tmp_path: Path) -> None:
    (tmp_path / "lib").mkdir()
    made = make_synthetic_film(tmp_path / "lib" / "Silent.mkv", duration_s=10.0, with_subtitles=False)
    events: list[ProgressEvent] = []
    result = run(made.video, tiny_llava, tmp_path, max_gap=3.0, progress=events.append)
    assert result.subtitle is None and result.dialogue_event_count == 0
    warnings = [e.message for e in events if e.kind is EventKind.WARNING]
    assert warnings == ["no subtitles: keyframes come from scene changes and intervals only"]
    assert {r.source for r, _ in result.results} == {"scene_change", "interval_fallback"}
    ts = [0.0, *(r.timestamp_s for r, _ in result.results), made.duration_s]
    assert max(b - a for a, b in itertools.pairwise(ts)) <= 3.0
    assert up.load_checkpoint_strict(WorkDir.for_film(made.video).path).dialogue_event_count == 0


def test_subtitle_choice_prefers_untagged_then_english_then_srt(tmp_path: Path) -> None:
    film = tmp_path / "Heat (1995).mkv"
    film.write_bytes(b"x")
    names = [
        "Heat (1995).fr.srt",
        "Heat (1995).en.forced.srt",
        "Heat (1995).en.sdh.srt",
        "Heat (1995).en.ass",
        "Heat (1995).en.srt",
        "Heat (1995).srt",
        "Heat (1995) trailer.srt",
    ]
    for n in names:
        (tmp_path / n).write_text("")
    expected = [
        "Heat (1995).srt",
        "Heat (1995).en.srt",
        "Heat (1995).en.ass",
        "Heat (1995).en.sdh.srt",
        "Heat (1995).en.forced.srt",
        "Heat (1995).fr.srt",
        None,
    ]
    for want in expected:
        chosen = choose_subtitle(film)
        assert (chosen.name if chosen else None) == want
        if chosen:
            chosen.unlink()


def test_model_needed_only_on_a_miss_and_checked_before_ingesting(
    synthetic_film_template, tiny_llava, ready: Path, tmp_path: Path
) -> None:
    fresh = copy_film(synthetic_film_template, tmp_path / "fresh")
    with pytest.raises(ModelError, match="--model and --mmproj"):
        analyze(fresh, gpu_lock_path=tmp_path / "gpu.lock")
    with pytest.raises(ModelError, match="no such file"):
        analyze(
            fresh, model=tmp_path / "absent.gguf", mmproj=tiny_llava.mmproj_path, gpu_lock_path=tmp_path / "g"
        )
    assert not WorkDir.for_film(fresh).proxy_path.exists()  # failed before the proxy was made
    garbage = tmp_path / "broken.gguf"
    garbage.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ModelError, match=r"broken\.gguf"):
        run(ready, tiny_llava, tmp_path, model=garbage)
    assert partial_count(ready) == 0 and not WorkDir.for_film(ready).cache_path.exists()


def test_a_locked_work_dir_is_waited_for_or_refused(clone: Path, tmp_path: Path) -> None:
    wd = WorkDir.for_film(clone)
    lock = work_dir_lock(wd, purpose="cinecut analyze", announce=True)
    assert lock.try_acquire()
    try:
        with pytest.raises(BusyError, match="locked by cinecut analyze"):
            analyze(clone, gpu_lock_path=tmp_path / "gpu.lock", lock_wait=0)
        events: list[ProgressEvent] = []
        started = time.monotonic()
        with pytest.raises(BusyError, match="still locked"):
            analyze(clone, gpu_lock_path=tmp_path / "gpu.lock", lock_wait=0.3, progress=events.append)
        assert time.monotonic() - started >= 0.3
        assert [e.kind for e in events] == [EventKind.WAITING_LOCK]
        threading.Timer(0.3, lock.release).start()
        result = analyze(clone, gpu_lock_path=tmp_path / "gpu.lock", lock_wait=10)
        assert result.cache_hit
    finally:
        lock.release()


def test_a_symlinked_work_dir_is_refused(clone: Path, tmp_path: Path) -> None:
    wd = WorkDir.for_film(clone)
    elsewhere = tmp_path / "elsewhere"
    os.rename(wd.path, elsewhere)
    wd.path.symlink_to(elsewhere)
    with pytest.raises(WorkDirError, match="symlink"):
        analyze(clone, gpu_lock_path=tmp_path / "gpu.lock")


def test_default_gpu_lock_path_resolution(tmp_path: Path) -> None:
    system = tmp_path / "run-cinecut"
    xdg = tmp_path / "xdg"
    xdg.mkdir()
    tmp_root = tmp_path / "tmp"
    tmp_root.mkdir(mode=0o1777)
    tmp_root.chmod(0o1777)
    env = {"XDG_RUNTIME_DIR": str(xdg)}
    assert (
        default_gpu_lock_path(system_dir=system, environ=env, tmp_root=tmp_root)
        == xdg / "cinecut" / "gpu.lock"
    )
    system.mkdir()
    assert default_gpu_lock_path(system_dir=system, environ=env, tmp_root=tmp_root) == system / "gpu.lock"
    fallback = default_gpu_lock_path(system_dir=tmp_path / "absent", environ={}, tmp_root=tmp_root)
    assert fallback == tmp_root / f"cinecut-{os.getuid()}" / "gpu.lock"
    prepare_lock_dir(fallback)
    assert fallback.parent.stat().st_mode & 0o777 == 0o700
    # Someone else's directory (or a symlink) in a shared sticky dir is refused.
    shutil.rmtree(fallback.parent)
    (tmp_path / "trap").mkdir()
    fallback.parent.symlink_to(tmp_path / "trap")
    with pytest.raises(WorkDirError, match="owned by"):
        prepare_lock_dir(fallback)
    if os.geteuid() == 0:
        fallback.parent.unlink()
        fallback.parent.mkdir()
        os.chown(fallback.parent, 12345, 12345)
        with pytest.raises(WorkDirError, match="owned by"):
            prepare_lock_dir(fallback)


def test_cap_plan_keeps_ends_and_spreads_evenly() -> None:
    plan = [(float(i), "interval_fallback") for i in range(10)]
    assert cap_plan(plan, None) == plan and cap_plan(plan, 20) == plan
    assert [t for t, _ in cap_plan(plan, 4)] == [0.0, 3.0, 6.0, 9.0]
    assert len(cap_plan(plan, 1)) == 1
