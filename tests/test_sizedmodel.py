"""Random-weight LLaVA-1.5 pairs with real shapes: the 7B layout exactly, and a scaled pair that really runs."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import gguf
import pytest

from cinecut.demo.sizedmodel import (
    LLAVA_7B,
    N_VOCAB,
    SCALED,
    _text_tensors,
    _vision_tensors,
    _vocab,
    build_sized_llava,
)
from cinecut.inference.parallel import ParallelLlavaEngine


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def test_7b_layout_is_llava_15_7b_exactly() -> None:
    tokens, _, _ = _vocab()
    assert len(tokens) == len(set(tokens)) == N_VOCAB == 32000
    text = {name: (gtype, dims) for name, gtype, dims, _ in _text_tensors(LLAVA_7B, tokens)}
    assert text["token_embd.weight"] == (gguf.GGMLQuantizationType.Q4_0, (32000, 4096))
    assert text["output.weight"] == (gguf.GGMLQuantizationType.Q6_K, (32000, 4096))
    assert text["blk.31.ffn_gate.weight"] == (gguf.GGMLQuantizationType.Q4_0, (11008, 4096))
    assert text["blk.31.ffn_down.weight"] == (gguf.GGMLQuantizationType.Q4_0, (4096, 11008))
    assert "blk.32.attn_q.weight" not in text
    n_params = sum(d[0] * (d[1] if len(d) > 1 else 1) for _, d in text.values())
    assert n_params == LLAVA_7B.text_params == 6_738_415_616  # LLaMA-7B's parameter count
    vision = {name: dims for name, _, dims, _ in _vision_tensors(LLAVA_7B)}
    assert vision["v.patch_embd.weight"] == (1024, 3, 14, 14)
    assert vision["v.position_embd.weight"] == (577, 1024)  # 576 image tokens + the class token
    assert "v.blk.22.ffn_up.weight" in vision and "v.blk.23.ffn_up.weight" not in vision
    assert vision["mm.0.weight"] == (4096, 1024) and vision["mm.2.weight"] == (4096, 4096)
    assert LLAVA_7B.image_tokens == 576
    assert 0.4e9 < SCALED.text_params < 0.6e9 and SCALED.image_tokens < LLAVA_7B.image_tokens


@pytest.fixture(scope="module")
def scaled(tmp_path_factory: pytest.TempPathFactory):
    return build_sized_llava(tmp_path_factory.mktemp("scaled"), "scaled")


def test_scaled_pair_is_deterministic_quantised_and_reused(scaled, tmp_path: Path) -> None:
    again = build_sized_llava(tmp_path, "scaled")
    assert _digest(again.model_path) == _digest(scaled.model_path)
    assert _digest(again.mmproj_path) == _digest(scaled.mmproj_path)
    mtime = again.model_path.stat().st_mtime_ns
    assert build_sized_llava(tmp_path, "scaled") == again and again.model_path.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [again.model_path.name, again.mmproj_path.name]
    )
    reader = gguf.GGUFReader(scaled.model_path)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q4_0
    assert types["output.weight"] == gguf.GGMLQuantizationType.Q6_K


def test_scaled_answers_always_run_to_max_tokens(scaled, tmp_path: Path) -> None:
    frames = []
    for i, size in enumerate(("320x240", "640x360")):
        out = tmp_path / f"f{i}.jpg"
        subprocess.run(
            ["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i", f"testsrc2=size={size}",
             "-frames:v", "1", str(out)],
            check=True, timeout=60,
        )  # fmt: skip
        frames.append(out)
    reasons: list[str] = []
    with ParallelLlavaEngine(
        scaled.model_path, scaled.mmproj_path, n_gpu_layers=0, parallel=2, max_tokens=12,
        on_answer=lambda _p, _text, why: reasons.append(why),
    ) as eng:  # fmt: skip
        assert eng.describe_all(frames) == [None, None]  # random words: never a complete answer
        assert eng.prompt_tokens > SCALED.image_tokens
        assert eng.stats["tokens"] == 24  # the fixed token count, for every frame
    assert reasons == ["length", "length"]
