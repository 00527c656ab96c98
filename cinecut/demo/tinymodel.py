"""A tiny random-weight LLaVA-1.5 pair (text GGUF + mmproj GGUF), generated with the ``gguf`` package.

No real model can be downloaded in tests or in the demo, yet the inference path must run for real:
llama.cpp loads both files, the CLIP encoder embeds the keyframe, and the JSON-schema grammar drives
generation. Purely random weights would wander inside a JSON string until ``max_tokens``, so a few
weights are shaped to make the model a small next-token table:

* the last ``len(_ROWS)`` residual dimensions are reserved; every token embedding carries a one-hot
  "class" code there (the ``"`` token has its own class, every other token the default one);
* no layer writes into the reserved dimensions (their rows of ``attn_output``/``ffn_down`` are zero),
  so at the last position they still hold the current token's class;
* ``output_norm`` keeps only the reserved dimensions and ``output.weight`` turns each class into a
  preference ranking over a few tokens, plus a small bonus for longer pieces so that a key the grammar
  spells out is emitted as one whole-word token.

Under any JSON grammar the sampler then picks the best-ranked token the grammar allows: ``"`` after
``{``, ``,`` and ``:``; a word right after an opening quote; ``"`` after the word; ``}``/``]`` before ``,``;
end-of-text once the document is complete. Every string value becomes one non-empty word, and a
SceneDescription answer takes ~35 tokens. The vision tower and the rest of the text model stay random.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

#: Bumped whenever the generated files change, so stale builds are never reused.
FORMAT_VERSION: Final = 1

# Text model: llama architecture.
N_EMBD: Final = 64
N_LAYER: Final = 2
N_FF: Final = 128
N_HEAD: Final = 4
N_CTX_TRAIN: Final = 4096
HEAD_DIM: Final = N_EMBD // N_HEAD

# Vision tower: a CLIP ViT with the LLaVA-1.5 two-layer MLP projector.
V_IMAGE: Final = 32
V_PATCH: Final = 8
V_EMBD: Final = 32
V_FF: Final = 64  # must differ from V_EMBD: llama.cpp's CLIP loader infers the FFN layout from shapes
V_HEAD: Final = 2
V_LAYER: Final = 2  # LLaVA reads the second-to-last layer, so at least two
V_PATCHES: Final = (V_IMAGE // V_PATCH) ** 2

#: The word every string value becomes, and words tokenized whole so prompts stay short.
ANSWER_WORD: Final = "scene"
_WORDS: Final = (
    "A a an the and or of to in on at for with from by is are be as it this that its what who "
    "chat between curious human artificial intelligence assistant gives helpful detailed polite answers "
    "questions USER ASSISTANT you describe image frame film movie scene shot keyframe trailer "
    "JSON object keys visual content visual_content mood action setting only one short sentence "
    "each key string strings value values reply respond answer describes people place "
    "light dark night day inside outside"
).split()

# Reserved residual dimensions: one per next-token class.
_ROWS: Final = ("default", "quote")
_CLASS_SCALE: Final = 1.0
# Each step down a ranking divides the logit by 1.5: more than llama.cpp's default repeat penalty (1.1).
_RANK_RATIO: Final = 1.5
# The lowest rank (x1.5 / 1.1 for a repeat) still beats the longest multi-character piece's bonus.
_RANK_BASE: Final = 4.0
_PIECE_BONUS: Final = 0.2


@dataclass(frozen=True, slots=True)
class TinyLlava:
    """Paths of a generated pair: what ``Llama(model_path)`` and ``Llava15ChatHandler(mmproj)`` load."""

    model_path: Path
    mmproj_path: Path


def add_llama_tokenizer(w: Any, tokens: list[str], scores: list[float], types: list[int]) -> None:
    """The LLaMA SentencePiece tokenizer keys every generated text model carries (unk 0, bos 1, eos 2)."""
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)


def _vocab() -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style vocabulary: specials, 256 byte tokens, ASCII, whole words and their prefixes.

    llama.cpp's SPM tokenizer only merges adjacent pieces whose concatenation is a token, so every word
    comes with all its prefixes (with and without the ``▁`` space marker).
    """
    from gguf import TokenType

    tokens = ["<unk>", "<s>", "</s>"]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [TokenType.BYTE] * 256
    normal: list[str] = ["▁"] + [chr(c) for c in range(0x21, 0x7F)]
    for word in _WORDS:
        for text in (word, "▁" + word):
            normal += [text[:n] for n in range(2, len(text) + 1)]
    seen = set(tokens)
    for text in normal:
        if text not in seen:
            seen.add(text)
            tokens.append(text)
            types.append(TokenType.NORMAL)
    # Longer pieces score higher so whole words win the merges.
    scores = [0.0] * 259 + [float(len(t)) for t in tokens[259:]]
    return tokens, scores, [int(t) for t in types]


def _rankings(tokens: Sequence[str]) -> dict[str, list[int]]:
    """Per class, token ids from most to least preferred; the grammar skips what it does not allow."""
    tid = {t: i for i, t in enumerate(tokens)}
    structural = ['"', "}", "]", ",", ":", "{", "[", "1", "t"]
    default = [tid["</s>"]] + [tid[t] for t in structural]
    quote = [tid[ANSWER_WORD], tid[":"], tid["}"], tid["]"], tid[","]]
    return {"default": default, "quote": quote + [i for i in default if i not in quote]}


def _piece_bonus(token: str) -> float:
    """A small logit for multi-character pieces, longest first: a key the grammar spells out then takes
    one token instead of one per character. Below every ranked token, so it never changes their order."""
    return _PIECE_BONUS * len(token) if len(token) > 1 and not token.startswith(("<", "▁")) else 0.0


def _text_tensors(rng: Any, tokens: Sequence[str]) -> dict[str, Any]:
    """Random llama weights, with the next-token table wired through the reserved dimensions."""
    import numpy as np

    n_vocab = len(tokens)
    reserved = range(N_EMBD - len(_ROWS), N_EMBD)
    res_dim = dict(zip(_ROWS, reserved))

    def rand(*shape: int, std: float = 0.02) -> Any:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    embd = rand(n_vocab, N_EMBD)
    embd[:, list(reserved)] = 0.0
    embd[:, res_dim["default"]] = _CLASS_SCALE
    quote = tokens.index('"')
    embd[quote, res_dim["default"]] = 0.0
    embd[quote, res_dim["quote"]] = _CLASS_SCALE

    out = np.zeros((n_vocab, N_EMBD), dtype=np.float32)
    bonus = np.array([_piece_bonus(t) for t in tokens], dtype=np.float32)
    for dim in res_dim.values():
        out[:, dim] = bonus
    for row, ranking in _rankings(tokens).items():
        for rank, token in enumerate(ranking):
            out[token, res_dim[row]] = _RANK_BASE * _RANK_RATIO ** (len(ranking) - rank)
    out_norm = np.zeros(N_EMBD, dtype=np.float32)
    out_norm[list(reserved)] = 1.0

    t: dict[str, Any] = {"token_embd.weight": embd, "output_norm.weight": out_norm, "output.weight": out}
    for il in range(N_LAYER):
        p = f"blk.{il}."
        attn_out = rand(N_EMBD, N_EMBD)
        ffn_down = rand(N_EMBD, N_FF)
        attn_out[list(reserved), :] = 0.0
        ffn_down[list(reserved), :] = 0.0
        t |= {
            p + "attn_norm.weight": np.ones(N_EMBD, dtype=np.float32),
            p + "attn_q.weight": rand(N_EMBD, N_EMBD),
            p + "attn_k.weight": rand(N_EMBD, N_EMBD),
            p + "attn_v.weight": rand(N_EMBD, N_EMBD),
            p + "attn_output.weight": attn_out,
            p + "ffn_norm.weight": np.ones(N_EMBD, dtype=np.float32),
            p + "ffn_gate.weight": rand(N_FF, N_EMBD),
            p + "ffn_up.weight": rand(N_FF, N_EMBD),
            p + "ffn_down.weight": ffn_down,
        }
    return t


def _vision_tensors(rng: Any) -> dict[str, Any]:
    """Random CLIP ViT + LLaVA MLP projector weights (numpy shapes are ggml's, reversed)."""
    import numpy as np

    def rand(*shape: int, std: float = 0.02) -> Any:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def ones(n: int) -> Any:
        return np.ones(n, dtype=np.float32)

    def zeros(n: int) -> Any:
        return np.zeros(n, dtype=np.float32)

    t: dict[str, Any] = {
        "v.patch_embd.weight": rand(V_EMBD, 3, V_PATCH, V_PATCH).astype(np.float16),
        "v.class_embd": rand(V_EMBD),
        "v.position_embd.weight": rand(V_PATCHES + 1, V_EMBD),
        "v.pre_ln.weight": ones(V_EMBD),
        "v.pre_ln.bias": zeros(V_EMBD),
    }
    for il in range(V_LAYER):
        p = f"v.blk.{il}."
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            t[p + name + ".weight"] = rand(V_EMBD, V_EMBD)
            t[p + name + ".bias"] = zeros(V_EMBD)
        t |= {
            p + "ln1.weight": ones(V_EMBD),
            p + "ln1.bias": zeros(V_EMBD),
            p + "ln2.weight": ones(V_EMBD),
            p + "ln2.bias": zeros(V_EMBD),
            p + "ffn_up.weight": rand(V_FF, V_EMBD),
            p + "ffn_up.bias": zeros(V_FF),
            p + "ffn_down.weight": rand(V_EMBD, V_FF),
            p + "ffn_down.bias": zeros(V_EMBD),
        }
    t |= {
        "mm.0.weight": rand(N_EMBD, V_EMBD),
        "mm.0.bias": zeros(N_EMBD),
        "mm.2.weight": rand(N_EMBD, N_EMBD),
        "mm.2.bias": zeros(N_EMBD),
    }
    return t


def _write_gguf(path: Path, arch: str, configure: Any, tensors: dict[str, Any]) -> None:
    """Write a GGUF file atomically: a unique temp file in the same directory, fsynced, then renamed."""
    import gguf

    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        configure(writer)
        for name, array in tensors.items():
            writer.add_tensor(name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a model is not a secret
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _configure_text(tokens: list[str], scores: list[float], types: list[int]) -> Any:
    def configure(w: Any) -> None:
        w.add_name("cinecut tiny random LLaVA (text)")
        w.add_context_length(N_CTX_TRAIN)
        w.add_embedding_length(N_EMBD)
        w.add_block_count(N_LAYER)
        w.add_feed_forward_length(N_FF)
        w.add_head_count(N_HEAD)
        w.add_head_count_kv(N_HEAD)
        w.add_rope_dimension_count(HEAD_DIM)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_file_type(0)  # all F32
        add_llama_tokenizer(w, tokens, scores, types)

    return configure


def _configure_vision(w: Any) -> None:
    w.add_name("cinecut tiny random LLaVA (mmproj)")
    w.add_clip_has_vision_encoder(True)
    w.add_clip_projector_type("mlp")
    w.add_bool("clip.has_llava_projector", True)
    w.add_vision_image_size(V_IMAGE)
    w.add_vision_patch_size(V_PATCH)
    w.add_vision_embedding_length(V_EMBD)
    w.add_vision_feed_forward_length(V_FF)
    w.add_vision_projection_dim(N_EMBD)
    w.add_vision_block_count(V_LAYER)
    w.add_vision_head_count(V_HEAD)
    w.add_vision_attention_layernorm_eps(1e-5)
    w.add_vision_image_mean([0.48145466, 0.4578275, 0.40821073])
    w.add_vision_image_std([0.26862954, 0.26130258, 0.27577711])
    w.add_vision_use_gelu(True)


def build_tiny_llava(dest_dir: Path, *, seed: int = 0) -> TinyLlava:
    """Generate (or reuse) the pair in ``dest_dir``; deterministic for ``seed``, ~0.1 s, ~0.6 MB.

    File names carry a digest of the format version and seed, so an existing pair is reused only when
    it was built for the same parameters; each file appears complete or not at all (atomic rename).
    """
    import numpy as np

    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    tag = hashlib.sha256(f"v{FORMAT_VERSION}:seed={seed}".encode()).hexdigest()[:12]
    pair = TinyLlava(
        model_path=dest_dir / f"tiny-llava-{tag}.gguf",
        mmproj_path=dest_dir / f"tiny-llava-{tag}-mmproj.gguf",
    )
    if pair.model_path.is_file() and pair.mmproj_path.is_file():
        return pair
    tokens, scores, types = _vocab()
    rng = np.random.default_rng(seed)
    text = _text_tensors(rng, tokens)
    vision = _vision_tensors(rng)
    _write_gguf(pair.mmproj_path, "clip", _configure_vision, vision)
    _write_gguf(pair.model_path, "llama", _configure_text(tokens, scores, types), text)
    return pair


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cinecut.demo.tinymodel DEST_DIR``: build the pair and print both paths."""
    parser = argparse.ArgumentParser(
        prog="python -m cinecut.demo.tinymodel", description=__doc__.split("\n")[0]
    )
    parser.add_argument("dest_dir", type=Path, help="directory to write the two GGUF files into")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    args = parser.parse_args(argv)
    try:
        pair = build_tiny_llava(args.dest_dir, seed=args.seed)
    except OSError as exc:
        print(
            f"error: cannot write the tiny model into {args.dest_dir}: {exc.strerror or exc}", file=sys.stderr
        )
        return 1
    print(f"model:  {pair.model_path}")
    print(f"mmproj: {pair.mmproj_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
