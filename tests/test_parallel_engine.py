"""The parallel engine: several frames in one batch give the answers one-at-a-time gives, in keyframe order.

Real llama.cpp, real libmtmd, the generated tiny LLaVA pair; no mock anywhere.
"""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
from test_pipeline import analyzed_film, clone_film_dir, partial_count, run

from cinecut.demo.tinymodel import TinyLlava
from cinecut.inference.cache import load_cache
from cinecut.inference.engine import LlavaEngine
from cinecut.inference.models import SceneDescription
from cinecut.inference.parallel import (
    CPU_AUTO_PARALLEL,
    CPU_MAX_AUTO_PARALLEL,
    MAX_AUTO_PARALLEL,
    VRAM_RESERVE,
    ParallelLlavaEngine,
    available_ram_bytes,
    choose_parallel,
    kv_cache_bytes,
)
from cinecut.pipeline import AnalysisStopped
from cinecut.progress import EventKind, ProgressEvent
from cinecut.workdir import WorkDir


@pytest.fixture(scope="module")
def frames(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Seven different keyframes (JPEG, two sizes) and a PNG, as ffmpeg writes them."""
    out = tmp_path_factory.mktemp("frames")
    for size, count, name in (("320x240", 4, "a"), ("640x360", 3, "b")):
        subprocess.run(
            ["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i", f"testsrc2=size={size}:rate=2",
             "-frames:v", str(count), "-q:v", "5", str(out / f"{name}_%02d.jpg")],
            check=True, timeout=60,
        )  # fmt: skip
    subprocess.run(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc2=size=96x64",
         "-frames:v", "1", str(out / "c.png")],
        check=True, timeout=60,
    )  # fmt: skip
    return sorted(out.glob("*.*"))


@pytest.fixture
def bad_frames(tmp_path: Path) -> dict[str, Path]:
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image at all")
    corrupt = tmp_path / "corrupt.jpg"  # passes the magic check, so the image decoder must fail it
    corrupt.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00\x17garbage" * 50)
    return {"garbage": garbage, "corrupt": corrupt, "missing": tmp_path / "missing.jpg", "dir": tmp_path}


def _sequential(tiny: TinyLlava, paths: list[Path], **kw: Any) -> list[SceneDescription | None]:
    with LlavaEngine(tiny.model_path, tiny.mmproj_path, n_gpu_layers=0, **kw) as eng:
        return [eng.describe(p) for p in paths]


@pytest.mark.parametrize("parallel", [1, 3, 8])
def test_parallel_answers_equal_the_current_engine_frame_by_frame(
    tiny_llava: TinyLlava, frames: list[Path], bad_frames: dict[str, Path], parallel: int
) -> None:
    # Bad frames between good ones: a None must land on exactly its own frame, in keyframe order.
    paths = [frames[0], bad_frames["garbage"], *frames[1:4], bad_frames["corrupt"], *frames[4:],
             bad_frames["missing"], frames[0], bad_frames["dir"]]  # fmt: skip
    expected = _sequential(tiny_llava, paths)
    assert [d is None for d in expected] == [p in bad_frames.values() for p in paths]
    answers: list[tuple[Path, str]] = []
    with ParallelLlavaEngine(
        tiny_llava.model_path, tiny_llava.mmproj_path, n_gpu_layers=0, parallel=parallel,
        on_answer=lambda p, text, _why: answers.append((p, text)),
    ) as eng:  # fmt: skip
        got = eng.describe_all(paths)
        if parallel > 1:
            assert eng.stats["decode_steps"] < eng.stats["tokens"]  # frames really shared decode steps
    assert got == expected
    assert sorted(str(p) for p, _ in answers) == sorted(str(p) for p in paths if p not in bad_frames.values())


def test_greedy_parallel_and_sequential_are_identical(tiny_llava: TinyLlava, frames: list[Path]) -> None:
    texts: dict[int, list[str]] = {}
    for parallel in (1, 4):
        got: dict[Path, str] = {}
        with ParallelLlavaEngine(
            tiny_llava.model_path, tiny_llava.mmproj_path, n_gpu_layers=0, parallel=parallel, temperature=0.0,
            on_answer=lambda p, text, _why: got.__setitem__(p, text),  # noqa: B023
        ) as eng:  # fmt: skip
            descriptions = eng.describe_all(frames)
        assert all(isinstance(d, SceneDescription) for d in descriptions)
        texts[parallel] = [got[p] for p in frames]
    assert texts[1] == texts[4]


def test_frames_asked_for_without_prefetch_and_out_of_order_still_match(
    tiny_llava: TinyLlava, frames: list[Path]
) -> None:
    expected = _sequential(tiny_llava, frames[:3])
    with ParallelLlavaEngine(
        tiny_llava.model_path, tiny_llava.mmproj_path, n_gpu_layers=0, parallel=2
    ) as eng:
        eng.prefetch(frames[:3])
        assert eng.describe(frames[2]) == expected[2]  # the caller may skip ahead
        assert eng.describe(frames[0]) == expected[0]
        assert eng.describe(frames[1]) == expected[1]
        assert eng.describe(frames[5]) is not None  # never announced: computed on demand


def test_a_truncated_answer_is_none_and_the_next_frame_still_works(
    tiny_llava: TinyLlava, frames: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    with ParallelLlavaEngine(
        tiny_llava.model_path, tiny_llava.mmproj_path, n_gpu_layers=0, parallel=2, max_tokens=5
    ) as eng:
        assert eng.describe_all(frames[:3]) == [None, None, None]
        assert eng.stats["tokens"] == 15  # exactly max_tokens each
    assert "hit max_tokens" in caplog.text


def test_close_drops_frames_in_flight_and_use_after_close_is_a_bug(
    tiny_llava: TinyLlava, frames: list[Path]
) -> None:
    eng = ParallelLlavaEngine(tiny_llava.model_path, tiny_llava.mmproj_path, n_gpu_layers=0, parallel=3)
    eng.prefetch(frames)
    assert eng.describe(frames[0]) is not None
    eng.close()
    eng.close()
    assert eng.closed
    with pytest.raises(RuntimeError):
        eng.describe(frames[1])


def test_kv_cache_is_sized_per_frame_and_logged(
    tiny_llava: TinyLlava, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="cinecut.inference.parallel")
    with ParallelLlavaEngine(
        tiny_llava.model_path, tiny_llava.mmproj_path, n_gpu_layers=0, parallel=0, max_tokens=100
    ) as eng:
        assert eng.parallel == CPU_MAX_AUTO_PARALLEL  # auto on the CPU: the tiny model's KV fits 16 times
        assert eng.n_ctx_seq >= eng.prompt_tokens + 100 and eng.n_ctx_seq % 256 == 0
        assert eng.kv_bytes == (eng.parallel + 1) * kv_cache_bytes(
            2, 64, eng.n_ctx_seq
        )  # + the shared prefix
    assert "parallel = auto: 16 sequences (CPU inference: " in caplog.text
    assert "KV cache" in caplog.text


def test_auto_parallel_from_free_vram() -> None:
    gib = 1 << 30
    kv = 512 << 20  # a 7B model's f16 KV cache for ~1,000 tokens
    assert choose_parallel(on_gpu=True, free_vram=VRAM_RESERVE + 3 * kv + 1, kv_per_sequence=kv)[0] == 3
    assert choose_parallel(on_gpu=True, free_vram=80 * gib, kv_per_sequence=kv)[0] == MAX_AUTO_PARALLEL
    assert choose_parallel(on_gpu=True, free_vram=gib // 2, kv_per_sequence=kv)[0] == 1  # never 0
    assert choose_parallel(on_gpu=True, free_vram=None, kv_per_sequence=kv)[0] == 2
    assert choose_parallel(on_gpu=False, free_vram=None, kv_per_sequence=kv)[0] == CPU_AUTO_PARALLEL
    # On the CPU: a quarter of the available memory, between 1 and CPU_MAX_AUTO_PARALLEL.
    assert choose_parallel(on_gpu=False, free_vram=None, kv_per_sequence=kv, available_ram=64 * gib)[0] == 16
    assert choose_parallel(on_gpu=False, free_vram=None, kv_per_sequence=kv, available_ram=12 * gib)[0] == 6
    assert choose_parallel(on_gpu=False, free_vram=None, kv_per_sequence=kv, available_ram=gib)[0] == 1


def test_available_memory_is_the_kernels_figure_lowered_to_the_cgroups_limit(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32000000 kB\nMemFree:  1000 kB\nMemAvailable:   20000000 kB\n")
    own = Path("/proc/self/cgroup").read_text().strip().splitlines()
    rel = next((line.split(":", 2)[2] for line in own if line.startswith("0::")), None)
    root = tmp_path / "cgroup"
    assert available_ram_bytes(meminfo, root) == 20000000 * 1024  # no cgroup files: the kernel's figure
    if rel is not None:  # cgroup v2: this process's own group, under a stand-in root
        group = root / rel.lstrip("/")
        group.mkdir(parents=True)
        (group / "memory.max").write_text("max\n")
        (group / "memory.current").write_text("5000000000\n")
        assert available_ram_bytes(meminfo, root) == 20000000 * 1024
        (group / "memory.max").write_text("8000000000\n")  # MemoryMax=8G with 5 GB in use: 3 GB left
        assert available_ram_bytes(meminfo, root) == 3000000000
    meminfo.write_text("MemTotal: 1 kB\n")  # a kernel without the figure: unknown
    assert available_ram_bytes(meminfo, root) is None
    assert available_ram_bytes(tmp_path / "missing", root) is None
    real = available_ram_bytes()
    assert real is not None and real > 0


# ------------------------------------------------------------------------------- through the pipeline


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory, synthetic_film_template, tiny_llava) -> tuple[Path, dict[str, Any]]:
    return analyzed_film(tmp_path_factory, synthetic_film_template, tiny_llava)


@pytest.fixture
def ready(analyzed, tmp_path: Path) -> Path:
    return clone_film_dir(analyzed[0], tmp_path / "lib" / "Demo Film (2024)", keep_cache=False)


def test_pipeline_parallel_stop_and_resume_equals_a_sequential_run(
    analyzed, ready: Path, tiny_llava: TinyLlava, tmp_path: Path
) -> None:
    wd = WorkDir.for_film(ready)
    sequential = load_cache(analyzed[0], WorkDir.for_film(analyzed[0]))
    assert sequential is not None
    total = len(sequential)
    k = total // 2
    stop = threading.Event()

    def stop_at_k(ev: ProgressEvent) -> None:
        if ev.kind is EventKind.FRAME and ev.done == k:
            stop.set()

    with pytest.raises(AnalysisStopped) as info:
        run(ready, tiny_llava, tmp_path, parallel=3, progress=stop_at_k, should_stop=stop.is_set)
    assert (info.value.done, info.value.total) == (k, total)
    assert partial_count(ready) == k and not wd.cache_path.exists()  # in order: frames 1..k, no gaps
    result = run(ready, tiny_llava, tmp_path, parallel=3)
    assert (result.frames_resumed, result.frames_computed) == (k, total - k)
    assert [r.timestamp_s for r, _ in result.results] == [r.timestamp_s for r, _ in sequential]
    assert [d for _, d in result.results] == [d for _, d in sequential]
    saved = load_cache(ready, wd)
    assert saved is not None and [d for _, d in saved] == [d for _, d in sequential]


def test_parallel_out_of_range_is_refused(ready: Path, tiny_llava: TinyLlava, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="parallel"):
        run(ready, tiny_llava, tmp_path, parallel=65)


def test_cli_parallel_option_runs_and_is_bounded(ready: Path, tiny_llava: TinyLlava, tmp_path: Path) -> None:
    from test_cli_analyze import cinecut

    common = ["--model", tiny_llava.model_path, "--mmproj", tiny_llava.mmproj_path, "--n-gpu-layers", "0",
              "--gpu-lock", tmp_path / "gpu.lock"]  # fmt: skip
    bad = cinecut("analyze", ready, "--parallel", "65", *common)
    assert bad.returncode == 2 and "--parallel" in bad.stderr
    good = cinecut("analyze", ready, "--parallel", "3", "--json", "-", *common)
    assert good.returncode == 0, good.stderr
    assert load_cache(ready, WorkDir.for_film(ready)) is not None


@pytest.mark.parametrize("fault", ["fail-once", "fail"])
def test_a_failed_batch_is_retried_frame_by_frame_and_loses_nothing(
    analyzed, ready: Path, tiny_llava: TinyLlava, tmp_path: Path, fault: str
) -> None:
    """llama_decode refusing a batch of several frames (as a GPU out of memory does) costs no frame:
    each frame of it runs again alone, and the cache equals a sequential run's. ``fail``: every batch of
    several frames is refused for the whole run; ``fail-once``: only the first."""
    from test_cli_analyze import _env, cinecut

    sequential = load_cache(analyzed[0], WorkDir.for_film(analyzed[0]))
    assert sequential is not None and len(sequential) > 3
    common = ["--model", tiny_llava.model_path, "--mmproj", tiny_llava.mmproj_path, "--n-gpu-layers", "0",
              "--gpu-lock", tmp_path / "gpu.lock"]  # fmt: skip
    env = _env(CINECUTD_FAULTS=f"{fault}:llama_decode.batch")
    got = cinecut("analyze", ready, "--parallel", "3", "--json", "-", *common, env=env)
    assert got.returncode == 0, got.stderr
    retried = got.stderr.count("retrying each alone")
    assert retried >= 1, got.stderr
    if fault == "fail":  # every admission of several frames failed, not just the first
        assert retried > 1, got.stderr
    saved = load_cache(ready, WorkDir.for_film(ready))
    assert saved is not None
    assert [r.timestamp_s for r, _ in saved] == [r.timestamp_s for r, _ in sequential]
    assert [d for _, d in saved] == [d for _, d in sequential]
