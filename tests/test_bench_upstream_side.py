"""The benchmark's sequential baseline does what upstream's llama-server does by default, no less."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from cinecut.demo.tinymodel import TinyLlava

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def two_frames(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("frames")
    subprocess.run(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc2=size=320x240:rate=2",
         "-frames:v", "2", "-q:v", "5", str(out / "kf_%02d.jpg")],
        check=True, timeout=60,
    )  # fmt: skip
    return sorted(out.glob("*.jpg"))


def test_upstream_side_reuses_the_prompt_prefix_like_cache_prompt(
    tiny_llava: TinyLlava, two_frames: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(BENCH))
    import llama_cpp
    from bench_prewarm_throughput import _server_side

    from cinecut.inference.parallel import ParallelLlavaEngine

    with ParallelLlavaEngine(
        tiny_llava.model_path, tiny_llava.mmproj_path, n_gpu_layers=0, parallel=1
    ) as eng:
        prompt, prefix = eng.prompt_tokens, len(eng._feed.prefix_tokens)
    assert 0 < prefix < prompt
    slot, one = _server_side(tiny_llava.model_path, tiny_llava.mmproj_path, 0, 8, 1)
    try:
        ctx = slot.context.ctx
        assert one(two_frames[0]) > 0
        assert llama_cpp.llama_perf_context(ctx).n_p_eval == prompt  # a cold slot evaluates everything
        llama_cpp.llama_perf_context_reset(ctx)
        assert one(two_frames[1]) > 0
        # llama-server's default cache_prompt: the text before the image is not evaluated again
        assert llama_cpp.llama_perf_context(ctx).n_p_eval == prompt - prefix
    finally:
        slot.close()


def test_the_batching_ceiling_follows_from_its_own_measurements(
    tiny_llava: TinyLlava, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bench's ceiling is the formula of its module doc applied to what it measured, and the decode
    cost a target needs is the one that makes the formula give that target."""
    monkeypatch.syspath_prepend(str(BENCH))
    from batching_ceiling import TARGETS, describe, measure_ceiling

    c = measure_ceiling(
        tiny_llava.model_path, tiny_llava.mmproj_path, n_gpu_layers=0, threads=1, tokens=20, batches=[2, 4]
    )
    p, n, t = c["prompt_ms_per_token"], c["prompt_tokens_per_frame"], c["tokens_per_frame"]
    d = c["decode_ms_per_token"]
    assert set(d) == {"1", "2", "4"} and n > 0 and p > 0 and all(v > 0 for v in d.values())

    def ratio(batched: float) -> float:
        return (n * p + t * d["1"]) / (n * p + t * batched)

    assert c["ceiling_x"] == pytest.approx(ratio(min(d["2"], d["4"])), abs=0.02)
    for x in TARGETS:
        needed = c["needed_decode_ms_per_token"][f"{x:g}x"]
        assert ratio(needed) == pytest.approx(x, rel=0.01)
    assert f"{c['ceiling_x']:.2f}x" in describe(c)
