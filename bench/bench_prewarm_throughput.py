"""Pre-warm throughput: frames/s and films per night, sequential vs parallel, side by side in one run.

    python bench/bench_prewarm_throughput.py [--size scaled|7b] [--frames 8] [--tokens 100]
                                             [--parallel 8] [--n-gpu-layers N] [--models-dir DIR]

Sides, all on the same llama.cpp build, the same generated model pair and the same keyframe JPEGs:

* ``upstream``: what upstream CineCut gets from ``llama-server -np 1 -c 2048`` with its defaults, one frame
  per request: the SceneDescription JSON-schema grammar, temperature 0.1, ``max_tokens`` as fixed below,
  and what the server does unasked: ``cache_prompt`` (the text before the image, the same in every
  request, stays in the slot's cache and is not evaluated again), flash attention ``auto`` (enabled on
  the CPU and on CUDA), the grammar checked after the sampler chain, the image encoded inline. Here as
  that one-slot loop over the same llama.cpp calls, with every core (llama-server's default threads).
* ``chat``: the same requests through llama-cpp-python's ``create_chat_completion`` (Llava15ChatHandler),
  which does none of those three (the whole prompt every frame, no flash attention, the grammar over
  the whole vocabulary every token); kept to compare with results measured before ``upstream`` was.
* ``engine``: our current one-frame-at-a-time engine (:class:`cinecut.inference.engine.LlavaEngine`), as
  the pipeline runs it with ``parallel = 1`` (llama-cpp-python's default threads: half the cores for
  generation, all for the prompt; ``--threads`` does not apply to it).
* ``parallel-1``: the parallel engine with one sequence (its sampler and image overlap, no batching).
* ``parallel-N``: the parallel engine with N frames in flight (continuous batching).

The model is random (:mod:`cinecut.demo.sizedmodel`): every answer runs to exactly ``--tokens``
generated tokens (100 by default, about what a real four-field JSON answer takes) on every side, which
the table shows per side. ``--size scaled`` (~0.5 B, 64 image tokens) is the CPU configuration;
``--size 7b`` has LLaVA-1.5-7B's exact shapes and quantisation (Q4_0, 576 image tokens) and is meant for
a GPU (``--n-gpu-layers -1``, the default for that size), where VRAM used is read with nvidia-ml-py.
Films per night: frames/s x the window (5 h) / keyframes per film (1,200). Models are generated into
``--models-dir`` (default: the user's cache directory), never into the repository. Results go to
bench/results/prewarm_throughput.json (``prewarm_throughput_7b.json`` for the 7B shape).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import print_table, write_result
from batching_ceiling import describe as describe_ceiling
from batching_ceiling import measure_ceiling

from cinecut.demo.sizedmodel import SHAPES, build_sized_llava
from cinecut.inference.engine import LlavaEngine
from cinecut.inference.models import SCENE_DESCRIPTION_SCHEMA
from cinecut.inference.parallel import ParallelLlavaEngine

WINDOW_H = 5.0
FILM_KEYFRAMES = 1200
UPSTREAM_TEMPERATURE = 0.1
UPSTREAM_N_CTX = 2048


def _default_models_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cinecut" / "bench-models"


def make_keyframes(dest: Path, count: int) -> list[Path]:
    """``count`` distinct 640x360 JPEGs (moving test pattern), as the keyframe stage writes them."""
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi",
         "-i", f"testsrc2=size=640x360:rate=2:duration={count}", "-frames:v", str(count + 1),
         "-q:v", "3", str(dest / "kf_%04d.jpg")],
        check=True,
    )  # fmt: skip
    frames = sorted(dest.glob("kf_*.jpg"))
    if len(frames) < count + 1:
        raise SystemExit(f"ffmpeg wrote {len(frames)} keyframes, wanted {count + 1}")
    return frames[: count + 1]


class _Vram:
    """Device memory in use (all visible NVIDIA GPUs), or None without nvidia-ml-py / a GPU."""

    def __init__(self) -> None:
        self.nvml: Any = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
        except Exception:
            self.nvml = None

    def used_mib(self) -> float | None:
        if self.nvml is None:
            return None
        try:
            n = self.nvml.nvmlDeviceGetCount()
            return (
                sum(
                    self.nvml.nvmlDeviceGetMemoryInfo(self.nvml.nvmlDeviceGetHandleByIndex(i)).used
                    for i in range(n)
                )
                / 2**20
            )
        except Exception:
            return None


def _server_side(
    model: Path, mmproj: Path, n_gpu_layers: int, tokens: int, threads: int
) -> tuple[Any, Callable[[Path], int]]:
    """llama-server's one slot, one request per frame: its defaults, not our engine's tricks.

    The prompt prefix shared with the previous request stays in the cache (``cache_prompt``), the rest
    (image rows, then text) is decoded, then one token per decode, sampled by the chain with the grammar
    checked after it (repeat penalty 1.0, the server's default). No overlap: the image is read and
    encoded inside the request, as the server does.
    """
    from cinecut.inference.engine import DEFAULT_PROMPT
    from cinecut.inference.frame_feed import FrameFeeder
    from cinecut.inference.prefill import Prefiller
    from cinecut.inference.seq_sampling import SamplingParams, SequenceSampler, Vocabulary
    from cinecut.inference.seqcontext import SequenceContext

    sc = SequenceContext(model, mmproj, n_gpu_layers=n_gpu_layers, threads=threads)
    voc = Vocabulary(sc.lc, sc.model)
    feed = FrameFeeder(sc, DEFAULT_PROMPT)
    feed.shutdown()  # inline only
    sc.create(1, UPSTREAM_N_CTX, 0)
    prefill = Prefiller(sc, [], prefix_seq=0)
    params = SamplingParams(temperature=UPSTREAM_TEMPERATURE, repeat_penalty=1.0)
    cached: list[int] = []  # the text the slot's cache starts with

    class Slot:
        context = sc  # what the tests inspect

        def close(self) -> None:
            sc.free()

    def one(path: Path) -> int:
        prepared = feed.prepare(path)
        parts = prepared.parts
        assert prepared.error is None and parts[0][0] == "text"
        if cached and parts[0][1] == cached:  # cache_prompt: keep the common prefix, drop the rest
            sc.lc.llama_memory_seq_rm(sc.mem, 0, len(cached), -1)
            plan = [(0, parts[1:], len(cached))]
        else:
            sc.drop_seq(0)
            plan = [(0, parts, 0)]
        sampler = SequenceSampler(voc, params)
        state = {"n_past": 0, "token": -1}

        def ready(_i: int, row: int, n_past: int) -> None:
            state["n_past"], state["token"] = n_past, sampler.sample(sc.logits(row))

        try:
            prefill.evaluate(plan, ready)
            cached[:] = parts[0][1]
            n = 0
            while not voc.is_eog(state["token"]):
                n += 1
                if n >= tokens:
                    break
                sc.decode([(state["token"], state["n_past"], 0, True)])
                state["n_past"] += 1
                state["token"] = sampler.sample(sc.logits(0))
            return n
        finally:
            sampler.free()
            feed.free(prepared)

    return Slot(), one


def _chat_side(
    model: Path, mmproj: Path, n_gpu_layers: int, tokens: int, threads: int
) -> tuple[Any, Callable[[Path], int]]:
    """One chat completion per frame through llama-cpp-python (results measured before ``upstream``)."""
    import base64

    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Llava15ChatHandler

    from cinecut.inference.engine import DEFAULT_PROMPT

    handler = Llava15ChatHandler(clip_model_path=str(mmproj), verbose=False)
    llm = Llama(
        model_path=str(model), chat_handler=handler, n_ctx=UPSTREAM_N_CTX, n_gpu_layers=n_gpu_layers,
        n_threads=threads, n_threads_batch=threads, verbose=False,
    )  # fmt: skip
    response_format = {"type": "json_object", "schema": SCENE_DESCRIPTION_SCHEMA}

    def one(path: Path) -> int:
        uri = "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode()
        reply = llm.create_chat_completion(
            messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": DEFAULT_PROMPT}]}],
            response_format=response_format, temperature=UPSTREAM_TEMPERATURE, max_tokens=tokens,
        )  # fmt: skip
        return int(reply["usage"]["completion_tokens"])

    return llm, one


def _engine_side(
    model: Path, mmproj: Path, n_gpu_layers: int, tokens: int
) -> tuple[Any, Callable[[Path], int]]:
    """Our current engine, exactly as the pipeline builds it (its own defaults for the rest)."""
    engine = LlavaEngine(model, mmproj, n_gpu_layers=n_gpu_layers, max_tokens=tokens)
    counted = [0]
    llm = engine._llm
    original = llm.create_chat_completion

    def counting(*args: Any, **kwargs: Any) -> Any:
        reply = original(*args, **kwargs)
        counted[0] = int(reply["usage"]["completion_tokens"])
        return reply

    llm.create_chat_completion = counting

    def one(path: Path) -> int:
        engine.describe(path)
        return counted[0]

    return engine, one


@contextlib.contextmanager
def _quiet_native() -> Iterator[None]:
    from cinecut.inference.engine import _route_native_logs

    _route_native_logs()  # llama.cpp's and libmtmd's chatter goes to logging, not the table
    logging.getLogger("cinecut").setLevel(logging.ERROR)
    yield


def run_side(
    name: str, build: Callable[[], tuple[Any, Any]], frames: list[Path], vram: _Vram
) -> dict[str, Any]:
    """Load, describe one warm-up frame (untimed), then time the frames; the model is freed after."""
    before = vram.used_mib()
    started = time.perf_counter()
    obj, one = build()
    load_s = time.perf_counter() - started
    warm, timed = frames[0], frames[1:]
    try:
        if isinstance(obj, ParallelLlavaEngine):
            obj.describe(warm)
            t0 = dict(obj.stats), dict(obj.timings)
            started, cpu = time.perf_counter(), time.process_time()
            obj.describe_all(timed)
            elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
            per_frame_tokens = (obj.stats["tokens"] - t0[0]["tokens"]) / len(timed)
            parts = {k: round(v - t0[1][k], 3) for k, v in obj.timings.items()}
        else:
            one(warm)
            started, cpu = time.perf_counter(), time.process_time()
            counts = [one(f) for f in timed]
            elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
            per_frame_tokens = sum(counts) / len(counts)
            parts = {}
        used = vram.used_mib()
    finally:
        close = getattr(obj, "close", None)
        if close is not None:
            close()
    fps = len(timed) / elapsed
    row = {
        "side": name,
        "frames": len(timed),
        "seconds": round(elapsed, 2),
        # CPU seconds this process spent per frame (all its threads): the work, whatever else the
        # machine ran meanwhile; with --threads 1 free of llama.cpp's spinning thread barriers.
        "cpu_s_per_frame": round(cpu / len(timed), 3),
        "frames_per_s": round(fps, 4),
        "tokens_per_frame": round(per_frame_tokens, 1),
        "films_per_night": round(fps * WINDOW_H * 3600 / FILM_KEYFRAMES, 2),
        "load_s": round(load_s, 2),
        "vram_used_mib": None if used is None or before is None else round(used - before),
        "parts_s": parts,
    }
    print(f"  {name}: {fps:.3f} frames/s ({per_frame_tokens:.0f} tokens/frame, {elapsed:.1f} s)", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SHAPES), default="scaled")
    ap.add_argument("--frames", type=int, default=8, help="timed keyframes per side (plus one warm-up)")
    ap.add_argument("--tokens", type=int, default=100, help="generated tokens per frame, every side")
    ap.add_argument(
        "--parallel",
        type=int,
        nargs="+",
        default=None,
        help="parallel engine sizes to run (default: 1 16 on the CPU, 1 4 8 for 7b)",
    )
    ap.add_argument("--n-gpu-layers", type=int, default=None, help="default: 0 for scaled, -1 for 7b")
    ap.add_argument("--models-dir", type=Path, default=None)
    ap.add_argument(
        "--sides",
        nargs="+",
        default=["upstream", "engine", "parallel"],
        choices=["upstream", "chat", "engine", "parallel"],
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="CPU threads of the upstream and parallel sides (default: every core, llama-server's default; "
        "on a machine other jobs load, 1 avoids llama.cpp's spinning thread barriers distorting the result)",
    )
    ap.add_argument(
        "--ceiling",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="after the sides, measure the most any batching engine can gain here (bench/batching_ceiling.py)",
    )
    ap.add_argument("--note", default="", help="free text stored with the results (e.g. the machine)")
    args = ap.parse_args(argv)
    n_gpu_layers = args.n_gpu_layers if args.n_gpu_layers is not None else (-1 if args.size == "7b" else 0)
    sizes = args.parallel or ([1, 4, 8] if args.size == "7b" else [1, 16])
    logging.basicConfig(level=logging.ERROR)
    load_before = os.getloadavg()[0]

    started = time.perf_counter()
    pair = build_sized_llava(args.models_dir or _default_models_dir(), args.size)
    gen_s = time.perf_counter() - started
    shape = pair.shape
    print(
        f"model {args.size}: {shape.text_params / 1e9:.2f} B text parameters, {shape.image_tokens} image "
        f"tokens ({pair.model_path.stat().st_size / 2**30:.2f} GiB, ready in {gen_s:.1f} s); "
        f"{args.tokens} tokens per frame; n_gpu_layers {n_gpu_layers}",
        flush=True,
    )
    vram = _Vram()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cinecut-bench-kf-") as tmp, _quiet_native():
        frames = make_keyframes(Path(tmp), args.frames)
        m, p = pair.model_path, pair.mmproj_path
        if "upstream" in args.sides:
            rows.append(
                run_side(
                    "upstream",
                    lambda: _server_side(m, p, n_gpu_layers, args.tokens, args.threads),
                    frames,
                    vram,
                )
            )
        if "chat" in args.sides:
            rows.append(
                run_side(
                    "chat", lambda: _chat_side(m, p, n_gpu_layers, args.tokens, args.threads), frames, vram
                )
            )
        if "engine" in args.sides:
            rows.append(
                run_side("engine", lambda: _engine_side(m, p, n_gpu_layers, args.tokens), frames, vram)
            )
        if "parallel" in args.sides:
            for n in sizes:

                def build(n: int = n) -> tuple[Any, Any]:
                    eng = ParallelLlavaEngine(
                        m,
                        p,
                        parallel=n,
                        n_gpu_layers=n_gpu_layers,
                        max_tokens=args.tokens,
                        temperature=UPSTREAM_TEMPERATURE,
                        n_threads=args.threads,
                    )
                    return eng, None

                rows.append(run_side(f"parallel-{n}", build, frames, vram))
        ceiling = None
        if args.ceiling and any(r["side"].startswith("parallel-") for r in rows):
            widest = max(sizes)
            ceiling = measure_ceiling(
                m, p, n_gpu_layers=n_gpu_layers, threads=args.threads, tokens=args.tokens,
                batches=sorted({widest, 2 * widest}),
            )  # fmt: skip
    base = next((r["frames_per_s"] for r in rows if r["side"] == "upstream"), None)
    for r in rows:
        r["x_upstream"] = round(r["frames_per_s"] / base, 2) if base else None
    print_table(
        f"pre-warm throughput, {args.size} model, {args.tokens} tokens/frame "
        f"({WINDOW_H:g} h window, {FILM_KEYFRAMES} keyframes per film)",
        ["side", "frames/s", "x upstream", "CPU s/frame", "tokens/frame", "films/night", "VRAM MiB", "image s", "prefill s", "steps s"],
        [[r["side"], r["frames_per_s"], r["x_upstream"], r["cpu_s_per_frame"], r["tokens_per_frame"], r["films_per_night"],
          r["vram_used_mib"] if r["vram_used_mib"] is not None else "-",
          r["parts_s"].get("image_s", "-"), r["parts_s"].get("prefill_s", "-"), r["parts_s"].get("step_s", "-")]
         for r in rows],
    )  # fmt: skip
    out = write_result(
        "prewarm_throughput" if args.size == "scaled" else f"prewarm_throughput_{args.size}",
        {
            "size": args.size,
            "text_params": shape.text_params,
            "image_tokens": shape.image_tokens,
            "tokens_per_frame": args.tokens,
            "n_gpu_layers": n_gpu_layers,
            "threads": args.threads,
            "window_hours": WINDOW_H,
            "film_keyframes": FILM_KEYFRAMES,
            "load_average_before": load_before,
            "load_average_after": os.getloadavg()[0],
            "note": args.note,
            "sides": rows,
            "ceiling": ceiling,
        },
    )
    if ceiling is not None:
        print(describe_ceiling(ceiling))
    print(f"wrote {out}")
    print(json.dumps({r["side"]: r["frames_per_s"] for r in rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
