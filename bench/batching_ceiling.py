"""The most any batching engine can gain over one frame at a time, on this machine, with this prompt.

    python bench/batching_ceiling.py [--size scaled|7b] [--batch 16 32] [--tokens 100]

Batching makes decoding cheaper per token, not the prompt: a frame's prompt (image rows and the text
after them) is evaluated at full-batch speed by one-at-a-time and batched paths alike. So with ``P``
prompt tokens per frame evaluated at ``p`` seconds each, ``T`` generated tokens, ``d1`` seconds per token
decoding one sequence and ``dB`` per token decoding ``B`` sequences in one batch, no engine that batches
frames does better than

    (P * p + T * d1) / (P * p + T * min(dB))

times the one-at-a-time frames/s (both paths free of overheads such as sampling; the engines measured
have some, so a measured ratio may land a little either side). A target ratio ``X`` needs ``dB`` of at
most ``((P * p + T * d1) / X - P * p) / T``: where that is below ``p``, the prompt's full-batch cost per
token and so the arithmetic floor of the model on the machine, no batching reaches ``X``. Measured here on the same model and context shape as the engine's,
at the positions an answer is decoded at (after the prompt): one sequence is filled with ``P`` tokens,
copied to the others (a KV copy, not a decode), then ``--steps`` decodes are timed at each batch size.
On a GPU decoding one sequence is bound by memory bandwidth and ``dB`` falls far below ``d1``; on two
CPU cores both are bound by arithmetic and the ceiling is low. The throughput bench runs this after its
sides and reports each side's share of the ceiling.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cinecut.inference.engine import DEFAULT_PROMPT
from cinecut.inference.frame_feed import FrameFeeder
from cinecut.inference.seqcontext import N_BATCH, SequenceContext

_CTX_ROUND = 256
#: Ratios whose needed batched decode cost is reported (the issue's CPU target, and twice).
TARGETS = (2.5, 2.0)


def measure_ceiling(
    model: Path,
    mmproj: Path,
    *,
    n_gpu_layers: int,
    threads: int,
    tokens: int,
    batches: list[int],
    steps: int = 8,
) -> dict[str, Any]:
    """Per-token costs and the ceiling they imply (see the module doc); the model is freed after."""
    sc = SequenceContext(model, mmproj, n_gpu_layers=n_gpu_layers, threads=threads)
    try:
        feed = FrameFeeder(sc, DEFAULT_PROMPT)
        feed.shutdown()  # only the prompt's token counts are needed
        prefix, total = len(feed.prefix_tokens), feed.prompt_tokens
        per_frame = total - prefix  # what each frame evaluates after the shared prefix
        width = max(batches)
        n_ctx_seq = -(-(total + tokens + 1) // _CTX_ROUND) * _CTX_ROUND
        sc.create(width, n_ctx_seq, 0)
        rng = random.Random(0)
        n_vocab = int(sc.lc.llama_vocab_n_tokens(sc.lc.llama_model_get_vocab(sc.model)))
        tok = lambda: rng.randrange(n_vocab // 8, n_vocab)  # noqa: E731  (any ids past the specials)
        sc.decode([(tok(), pos, 0, False) for pos in range(prefix)])
        started = time.perf_counter()
        for first in range(prefix, total, N_BATCH):  # the frame's own prompt, in the engine's batch size
            last = min(first + N_BATCH, total)
            sc.decode([(tok(), pos, 0, pos == total - 1) for pos in range(first, last)])
        p = (time.perf_counter() - started) / per_frame
        for seq in range(1, width):
            sc.copy_seq(0, seq)
        at = total + tokens // 2  # the middle of an answer: attention spans the prompt and half of it
        for seq in range(width):  # move every sequence to the middle of its answer (one batch: cheap)
            sc.decode([(tok(), pos, seq, False) for pos in range(total, at)])
        per_token: dict[int, float] = {}
        for b in sorted({1, *batches}):
            started = time.perf_counter()
            for k in range(steps):
                sc.decode([(tok(), at + k, seq, True) for seq in range(b)])
            per_token[b] = (time.perf_counter() - started) / steps / b
            for seq in range(b):
                sc.lc.llama_memory_seq_rm(sc.mem, seq, at, -1)
    finally:
        sc.free()
    d1, best = per_token[1], min(per_token[b] for b in batches)
    prompt_s = per_frame * p
    ceiling = (prompt_s + tokens * d1) / (prompt_s + tokens * best)
    return {
        "needed_decode_ms_per_token": {
            f"{x:g}x": _ms(((prompt_s + tokens * d1) / x - prompt_s) / tokens) for x in TARGETS
        },
        "prompt_tokens_per_frame": per_frame,
        "prompt_ms_per_token": _ms(p),
        "decode_ms_per_token": {str(b): _ms(v) for b, v in per_token.items()},
        "tokens_per_frame": tokens,
        "ceiling_x": round(ceiling, 2),
    }


def _ms(seconds: float) -> float:
    """Milliseconds to four significant digits (a tiny model's costs are microseconds)."""
    return float(f"{seconds * 1000:.4g}")


def describe(c: dict[str, Any]) -> str:
    """One line: the ceiling and the costs it comes from."""
    d = c["decode_ms_per_token"]
    batched = ", ".join(f"{b} at once {ms:.1f}" for b, ms in d.items() if b != "1")
    needed = "; ".join(f"{x} needs {ms:.1f}" for x, ms in c["needed_decode_ms_per_token"].items())
    return (
        f"ceiling for any batching engine here: {c['ceiling_x']:.2f}x one frame at a time "
        f"(prompt {c['prompt_tokens_per_frame']} tokens/frame at {c['prompt_ms_per_token']:.2f} ms each; "
        f"decode ms/token: alone {d['1']:.1f}, {batched}; batched decode ms/token: {needed})"
    )


def main(argv: list[str] | None = None) -> int:
    from bench_prewarm_throughput import _default_models_dir, _quiet_native

    from cinecut.demo.sizedmodel import SHAPES, build_sized_llava

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SHAPES), default="scaled")
    ap.add_argument("--batch", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--n-gpu-layers", type=int, default=None)
    ap.add_argument("--models-dir", type=Path, default=None)
    args = ap.parse_args(argv)
    import os

    pair = build_sized_llava(args.models_dir or _default_models_dir(), args.size)
    ngl = args.n_gpu_layers if args.n_gpu_layers is not None else (-1 if args.size == "7b" else 0)
    with _quiet_native():
        c = measure_ceiling(
            pair.model_path,
            pair.mmproj_path,
            n_gpu_layers=ngl,
            threads=args.threads or os.cpu_count() or 1,
            tokens=args.tokens,
            batches=args.batch,
        )
    print(describe(c))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
