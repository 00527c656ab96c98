"""Random-weight LLaVA-1.5 pairs with real model shapes, for measuring throughput without a download.

Compute cost depends on tensor shapes and quantisation, not on weight values, so a pair with LLaVA-1.5-7B's
exact shapes (LLaMA-7B text model in Q4_0, ``output.weight`` in Q6_K as llama.cpp's quantiser leaves it,
and the CLIP ViT-L/14-336 mmproj with its two-layer MLP projector, 576 image tokens, F16 weights) costs
what the real model costs. Quantised blocks are written directly (random nibbles with a valid fp16
scale), never quantised from floats, so the 4 GB pair takes seconds.

``scaled`` is the same architecture at ~0.5 B parameters with a small CLIP (64 image tokens): on a
2-core CPU decoding dominates a frame's time, as it does for the 7B model on a GPU.

Random weights answer nothing meaningful and would stop at random points, so the rows of
``output.weight`` for every token that could close a JSON string (``"`` and its byte token) are zero:
under the SceneDescription grammar, generation then runs to ``max_tokens`` every time, which fixes the
generated tokens per frame for every side of a comparison.

``python -m cinecut.demo.sizedmodel DEST_DIR --size 7b|scaled`` builds (or reuses) a pair.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

#: Bumped whenever the generated files change, so stale builds are never reused.
FORMAT_VERSION: Final = 2
N_VOCAB: Final = 32000  # LLaMA's SentencePiece vocabulary size

# ggml block layouts: (elements per block, bytes per block, byte offsets of the fp16 scales)
_Q4_0: Final = (32, 18, (0,))
_Q6_K: Final = (256, 210, (208,))
_Q4_0_TYPE: Final = 2
_Q6_K_TYPE: Final = 14
_F16_TYPE: Final = 1
_F32_TYPE: Final = 0
#: Target standard deviation of a weight, so activations stay finite through every layer.
_WEIGHT_STD: Final = 0.02


@dataclass(frozen=True, slots=True)
class ModelShape:
    """The shapes of a LLaVA-1.5 pair: a llama text model and a CLIP ViT with an MLP projector."""

    name: str
    n_embd: int
    n_layer: int
    n_ff: int
    n_head: int
    v_image: int
    v_patch: int
    v_embd: int
    v_ff: int
    v_head: int
    v_layer: int
    n_ctx_train: int = 4096

    @property
    def image_tokens(self) -> int:
        return (self.v_image // self.v_patch) ** 2

    @property
    def text_params(self) -> int:
        per_layer = 4 * self.n_embd * self.n_embd + 3 * self.n_embd * self.n_ff + 2 * self.n_embd
        return self.n_layer * per_layer + 2 * N_VOCAB * self.n_embd + self.n_embd


#: LLaVA-1.5-7B: LLaMA-7B (Vicuna) text model; CLIP ViT-L/14 at 336 px with 23 of its 24 layers
#: (LLaVA reads the second-to-last one, so the converter drops the last).
LLAVA_7B: Final = ModelShape(
    name="7b", n_embd=4096, n_layer=32, n_ff=11008, n_head=32,
    v_image=336, v_patch=14, v_embd=1024, v_ff=4096, v_head=16, v_layer=23,
)  # fmt: skip
#: ~0.5 B parameters, 64 image tokens: decoding dominates on a 2-core CPU.
SCALED: Final = ModelShape(
    name="scaled", n_embd=1280, n_layer=20, n_ff=3456, n_head=20,
    v_image=112, v_patch=14, v_embd=256, v_ff=1024, v_head=4, v_layer=6,
)  # fmt: skip
SHAPES: Final = {s.name: s for s in (LLAVA_7B, SCALED)}


@dataclass(frozen=True, slots=True)
class SizedLlava:
    """Paths of a generated pair and the shape it was built with."""

    model_path: Path
    mmproj_path: Path
    shape: ModelShape


def _vocab() -> tuple[list[str], list[float], list[int]]:
    """The tiny model's vocabulary (specials, bytes, ASCII, words) padded to LLaMA's 32,000 tokens.

    The padding is every two- and three-letter lowercase piece, with and without the ``▁`` marker:
    real-looking SentencePiece pieces, none of which contains a quote.
    """
    import itertools
    import string

    from cinecut.demo.tinymodel import _vocab as tiny_vocab

    tokens, scores, types = tiny_vocab()
    seen = set(tokens)
    letters = string.ascii_lowercase
    pieces = itertools.chain(
        ("".join(p) for p in itertools.product(letters, repeat=2)),
        ("▁" + "".join(p) for p in itertools.product(letters, repeat=2)),
        ("".join(p) for p in itertools.product(letters, repeat=3)),
        ("▁" + "".join(p) for p in itertools.product(letters, repeat=3)),
    )
    for piece in pieces:
        if len(tokens) >= N_VOCAB:
            break
        if piece not in seen:
            seen.add(piece)
            tokens.append(piece)
            scores.append(float(len(piece)))
            types.append(1)  # NORMAL
    return tokens, scores, types


class _Blocks:
    """Random quantised rows from a seeded generator: random bytes, every fp16 scale set to a valid value."""

    def __init__(self, rng: Any) -> None:
        self.rng = rng

    def rows(self, layout: tuple[int, int, tuple[int, ...]], n_rows: int, n_cols: int) -> Any:
        import numpy as np

        per_block, block_bytes, scale_offsets = layout
        n_blocks = n_cols // per_block
        data = np.frombuffer(self.rng.bytes(n_rows * n_blocks * block_bytes), dtype=np.uint8).copy()
        blocks = data.reshape(n_rows * n_blocks, block_bytes)
        # Q4_0 nibbles are uniform over -8..7 (std ~4.6); Q6_K's six-bit values over -32..31 times an int8
        # sub-block scale (std ~18 x ~74): the fp16 scale brings a weight's std to _WEIGHT_STD.
        scale = _WEIGHT_STD / (4.6 if layout is _Q4_0 else 18.5 * 74.0)
        scale_bytes = np.frombuffer(np.float16(scale).tobytes(), dtype=np.uint8)
        for off in scale_offsets:
            blocks[:, off : off + 2] = scale_bytes
        return blocks.reshape(n_rows, n_blocks * block_bytes)


def _text_tensors(
    shape: ModelShape, tokens: Sequence[str]
) -> Iterator[tuple[str, int, tuple[int, int], Any]]:
    """(name, ggml type, numpy shape in elements, lazy array factory) for every text tensor, file order."""
    d, ff = shape.n_embd, shape.n_ff
    yield "token_embd.weight", _Q4_0_TYPE, (N_VOCAB, d), ("q", _Q4_0, "embd")
    for il in range(shape.n_layer):
        p = f"blk.{il}."
        yield p + "attn_norm.weight", _F32_TYPE, (d,), ("ones",)
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            yield p + name + ".weight", _Q4_0_TYPE, (d, d), ("q", _Q4_0, name)
        yield p + "ffn_norm.weight", _F32_TYPE, (d,), ("ones",)
        yield p + "ffn_gate.weight", _Q4_0_TYPE, (ff, d), ("q", _Q4_0, "gate")
        yield p + "ffn_up.weight", _Q4_0_TYPE, (ff, d), ("q", _Q4_0, "up")
        yield p + "ffn_down.weight", _Q4_0_TYPE, (d, ff), ("q", _Q4_0, "down")
    yield "output_norm.weight", _F32_TYPE, (d,), ("ones",)
    yield "output.weight", _Q6_K_TYPE, (N_VOCAB, d), ("output", _Q6_K, [tokens.index('"'), 3 + 0x22])


def _vision_tensors(shape: ModelShape) -> Iterator[tuple[str, int, tuple[int, ...], Any]]:
    e, ff, n = shape.v_embd, shape.v_ff, shape.n_embd
    yield "v.patch_embd.weight", _F16_TYPE, (e, 3, shape.v_patch, shape.v_patch), ("randn",)
    yield "v.class_embd", _F32_TYPE, (e,), ("randn",)
    yield "v.position_embd.weight", _F16_TYPE, (shape.image_tokens + 1, e), ("randn",)
    yield "v.pre_ln.weight", _F32_TYPE, (e,), ("ones",)
    yield "v.pre_ln.bias", _F32_TYPE, (e,), ("zeros",)
    for il in range(shape.v_layer):
        p = f"v.blk.{il}."
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            yield p + name + ".weight", _F16_TYPE, (e, e), ("randn",)
            yield p + name + ".bias", _F32_TYPE, (e,), ("zeros",)
        for name in ("ln1", "ln2"):
            yield p + name + ".weight", _F32_TYPE, (e,), ("ones",)
            yield p + name + ".bias", _F32_TYPE, (e,), ("zeros",)
        yield p + "ffn_up.weight", _F16_TYPE, (ff, e), ("randn",)
        yield p + "ffn_up.bias", _F32_TYPE, (ff,), ("zeros",)
        yield p + "ffn_down.weight", _F16_TYPE, (e, ff), ("randn",)
        yield p + "ffn_down.bias", _F32_TYPE, (e,), ("zeros",)
    yield "mm.0.weight", _F16_TYPE, (n, e), ("randn",)
    yield "mm.0.bias", _F32_TYPE, (n,), ("zeros",)
    yield "mm.2.weight", _F16_TYPE, (n, n), ("randn",)
    yield "mm.2.bias", _F32_TYPE, (n,), ("zeros",)


def _nbytes(gtype: int, dims: tuple[int, ...]) -> tuple[tuple[int, ...], Any, int]:
    """(numpy shape of the stored array, its dtype, byte size) for a tensor of ``dims`` elements."""
    import numpy as np

    if gtype in (_Q4_0_TYPE, _Q6_K_TYPE):
        per_block, block_bytes, _ = _Q4_0 if gtype == _Q4_0_TYPE else _Q6_K
        rows, cols = dims
        row_bytes = cols // per_block * block_bytes
        return (rows, row_bytes), np.dtype(np.uint8), rows * row_bytes
    dtype = np.dtype(np.float16 if gtype == _F16_TYPE else np.float32)
    count = 1
    for x in dims:
        count *= x
    return dims, dtype, count * dtype.itemsize


def _materialise(spec: tuple[Any, ...], gtype: int, dims: tuple[int, ...], blocks: _Blocks, rng: Any) -> Any:
    import numpy as np

    kind = spec[0]
    if kind == "ones":
        return np.ones(dims, dtype=np.float32)
    if kind == "zeros":
        return np.zeros(dims, dtype=np.float32)
    if kind == "randn" and gtype == _F16_TYPE:
        # Random fp16 bit patterns with the exponent forced into 2^-9..2^-6: finite, |w| ~0.002-0.03, and
        # ~20x faster than drawing normals for the 300 M weights of a ViT-L.
        count = int(np.prod(dims))
        bits = np.frombuffer(rng.bytes(2 * count), dtype=np.uint16).copy()
        bits = (bits & 0x83FF) | ((((bits >> 10) & 0x3) + 6) << 10).astype(np.uint16)
        return bits.view(np.float16).reshape(dims)
    if kind == "randn":
        return rng.standard_normal(dims, dtype=np.float32) * _WEIGHT_STD
    rows = blocks.rows(spec[1], dims[0], dims[1])
    if kind == "output":
        rows[spec[2], :] = 0  # zero scales and values: these tokens' logits are 0, far below the top ones
    return rows


def _write(
    path: Path, arch: str, configure: Any, tensors: list[tuple[str, int, tuple[int, ...], Any]], seed: int
) -> None:
    """Stream a GGUF file tensor by tensor (never the whole model in memory), atomically renamed."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    blocks = _Blocks(rng)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        configure(writer)
        for name, gtype, dims, _spec in tensors:
            np_shape, dtype, nbytes = _nbytes(gtype, dims)
            raw = gguf.GGMLQuantizationType(gtype) if dtype == np.uint8 else None
            writer.add_tensor_info(name, np_shape, dtype, nbytes, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _name, gtype, dims, spec in tensors:
            writer.write_tensor_data(_materialise(spec, gtype, dims, blocks, rng))
        writer.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _configure_text(shape: ModelShape, tokens: list[str], scores: list[float], types: list[int]) -> Any:
    def configure(w: Any) -> None:
        w.add_name(f"cinecut random LLaVA-1.5 {shape.name} (text)")
        w.add_context_length(shape.n_ctx_train)
        w.add_embedding_length(shape.n_embd)
        w.add_block_count(shape.n_layer)
        w.add_feed_forward_length(shape.n_ff)
        w.add_head_count(shape.n_head)
        w.add_head_count_kv(shape.n_head)
        w.add_rope_dimension_count(shape.n_embd // shape.n_head)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_file_type(2)  # MOSTLY_Q4_0
        from cinecut.demo.tinymodel import add_llama_tokenizer

        add_llama_tokenizer(w, tokens, scores, types)

    return configure


def _configure_vision(shape: ModelShape) -> Any:
    def configure(w: Any) -> None:
        w.add_name(f"cinecut random LLaVA-1.5 {shape.name} (mmproj)")
        w.add_file_type(1)  # F16
        w.add_clip_has_vision_encoder(True)
        w.add_clip_projector_type("mlp")
        w.add_bool("clip.has_llava_projector", True)
        w.add_vision_image_size(shape.v_image)
        w.add_vision_patch_size(shape.v_patch)
        w.add_vision_embedding_length(shape.v_embd)
        w.add_vision_feed_forward_length(shape.v_ff)
        w.add_vision_projection_dim(shape.n_embd)
        w.add_vision_block_count(shape.v_layer)
        w.add_vision_head_count(shape.v_head)
        w.add_vision_attention_layernorm_eps(1e-5)
        w.add_vision_image_mean([0.48145466, 0.4578275, 0.40821073])
        w.add_vision_image_std([0.26862954, 0.26130258, 0.27577711])
        w.add_vision_use_gelu(False)  # CLIP's quick-GELU

    return configure


def build_sized_llava(dest_dir: Path, size: str = "scaled", *, seed: int = 0) -> SizedLlava:
    """Generate (or reuse) the ``size`` pair in ``dest_dir``; deterministic for ``seed``.

    File names carry a digest of the format version, size and seed, so a pair is reused only when it
    was built for the same parameters; each file appears complete or not at all (atomic rename).
    """
    shape = SHAPES[size]
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    tag = hashlib.sha256(f"v{FORMAT_VERSION}:{size}:seed={seed}".encode()).hexdigest()[:12]
    pair = SizedLlava(
        model_path=dest_dir / f"llava-{size}-{tag}-q4_0.gguf",
        mmproj_path=dest_dir / f"llava-{size}-{tag}-mmproj-f16.gguf",
        shape=shape,
    )
    if not pair.mmproj_path.is_file():
        _write(pair.mmproj_path, "clip", _configure_vision(shape), list(_vision_tensors(shape)), seed + 1)
    if not pair.model_path.is_file():
        tokens, scores, types = _vocab()
        text = list(_text_tensors(shape, tokens))
        _write(pair.model_path, "llama", _configure_text(shape, tokens, scores, types), text, seed)
    return pair


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cinecut.demo.sizedmodel DEST_DIR [--size 7b|scaled]``: build the pair, print both paths."""
    parser = argparse.ArgumentParser(
        prog="python -m cinecut.demo.sizedmodel", description=__doc__.split("\n")[0]
    )
    parser.add_argument("dest_dir", type=Path, help="directory to write the two GGUF files into")
    parser.add_argument("--size", choices=sorted(SHAPES), default="scaled")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    args = parser.parse_args(argv)
    try:
        pair = build_sized_llava(args.dest_dir, args.size, seed=args.seed)
    except OSError as exc:
        print(f"error: cannot write the model into {args.dest_dir}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"model:  {pair.model_path}")
    print(f"mmproj: {pair.mmproj_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
