"""Inference overhead of the daemon's pre-warm worker vs a bare loop over the same frames, same model, same run.

    python bench/bench_worker_overhead.py [--duration 60] [--max-gap 1.5] [--rounds 5]
                                          [--model M --mmproj P] [--n-gpu-layers 0]

The worker path is exactly the daemon's: ``python -m cinecut.worker`` started through
``cinecutd.prewarm.supervisor.WorkerProcess`` (own process group, stdout pipe read without blocking,
stderr to a log file) with the command line the scheduler builds. Its inference phase (from the
``stage: inference`` event to the ``done`` event: cache check, GPU lock, model load, every frame with its
partial-file append, stamp check and progress event, cache save, checkpoint) is compared with a bare
``LlavaEngine`` load plus ``describe()`` over the same keyframe JPEGs. Rounds alternate which goes first;
medians are reported. The fixed cost of a worker process (interpreter start, imports, revalidation) is
shown separately. Default model: the tiny generated LLaVA pair (no download). Results go to
bench/results/worker_overhead.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import print_table, write_result

from cinecut.demo.film import make_synthetic_film
from cinecut.demo.tinymodel import build_tiny_llava
from cinecut.inference.cache import invalidate_cache, load_cache
from cinecut.inference.engine import LlavaEngine
from cinecut.workdir import WorkDir
from cinecutd.config import PrewarmConfig, Window
from cinecutd.prewarm.scheduler import build_worker_argv
from cinecutd.prewarm.supervisor import WorkerProcess

TARGET = 0.05


def supervised_run(argv: list[str], log: Path) -> dict[str, float]:
    """One worker job as the daemon runs it; times are taken when the supervisor reads each event."""
    w = WorkerProcess(argv, log_path=log)
    t0 = time.perf_counter()
    w.start()
    marks: dict[str, float] = {}
    done: dict[str, Any] = {}
    while w.running:
        for ev in w.poll():
            now = time.perf_counter()
            if ev["event"] == "stage" and ev.get("stage") == "inference":
                marks["inference"] = now
            elif ev["event"] == "done":
                marks["done"] = now
                done = ev
        time.sleep(0.002)
    end = time.perf_counter()
    assert w.exit is not None and w.exit.outcome == "done", f"worker failed: {w.exit} (see {log})"
    assert "inference" in marks and "done" in marks, f"missing events: {marks}"
    return {
        "inference_s": marks["done"] - marks["inference"],
        "startup_s": marks["inference"] - t0,
        "job_s": end - t0,
        "frames_computed": float(done.get("frames_computed", -1)),
    }


def bare_run(frames: list[Path], model: Path, mmproj: Path, n_gpu_layers: int, n_ctx: int, max_tokens: int) -> dict[str, float]:
    t0 = time.perf_counter()
    with LlavaEngine(model, mmproj, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, max_tokens=max_tokens) as eng:
        t1 = time.perf_counter()
        described = sum(eng.describe(f) is not None for f in frames)
        t2 = time.perf_counter()
    return {"total_s": t2 - t0, "load_s": t1 - t0, "frames_s": t2 - t1, "described": float(described)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=60.0, help="synthetic film length in seconds (default 60)")
    ap.add_argument("--max-gap", type=float, default=1.5, help="keyframe plan's longest gap, s (default 1.5)")
    ap.add_argument("--rounds", type=int, default=5, help="measured rounds of each (median reported)")
    ap.add_argument("--model", type=Path, help="GGUF text model (default: the tiny generated one)")
    ap.add_argument("--mmproj", type=Path, help="GGUF mmproj (with --model)")
    ap.add_argument("--n-gpu-layers", type=int, default=0, help="-1 all layers on the GPU, 0 CPU (default)")
    ap.add_argument("--n-ctx", type=int, default=4096)
    ap.add_argument("--max-tokens", type=int, default=256)
    args = ap.parse_args(argv)
    if (args.model is None) != (args.mmproj is None):
        ap.error("--model and --mmproj go together")

    with tempfile.TemporaryDirectory(prefix="cinecut-bench-") as tmp_s:
        tmp = Path(tmp_s)
        if args.model is None:
            pair = build_tiny_llava(tmp / "model")
            model, mmproj, model_name = pair.model_path, pair.mmproj_path, "tiny generated LLaVA"
        else:
            model, mmproj, model_name = args.model, args.mmproj, args.model.name
        folder = tmp / "lib" / "Bench Film (2024)"
        folder.mkdir(parents=True)
        film = make_synthetic_film(folder / "Bench Film (2024).mkv", duration_s=args.duration).video
        wd = WorkDir.for_film(film)
        pw = PrewarmConfig(
            enabled=True, window=Window(), model=model, mmproj=mmproj, n_gpu_layers=args.n_gpu_layers,
            n_ctx=args.n_ctx, max_tokens=args.max_tokens, settle_seconds=0, gpu_lock=tmp / "gpu.lock",
            min_free_vram_mb=0, vibe="", python=None,
        )
        cmd = build_worker_argv(sys.executable, film, pw) + ["--max-gap", str(args.max_gap)]
        first = supervised_run(cmd, tmp / "logs" / "warmup.log")  # ingestion + a first inference
        cached = load_cache(film, wd)
        assert cached is not None, "the warm-up run left no valid cache"
        frames = [Path(rec.frame_path) for rec, _ in cached]

        workers: list[dict[str, float]] = []
        bares: list[dict[str, float]] = []

        def worker_round(i: int) -> None:
            invalidate_cache(film, wd)  # stages 1-3 stay complete: only inference runs again
            wd.partial_cache_path.unlink(missing_ok=True)
            r = supervised_run(cmd, tmp / "logs" / f"round{i}.log")
            assert r["frames_computed"] == len(frames), r
            workers.append(r)

        def bare_round() -> None:
            bares.append(bare_run(frames, model, mmproj, args.n_gpu_layers, args.n_ctx, args.max_tokens))

        bare_round()  # warm the page cache and the allocator for both sides
        bares.clear()
        for i in range(args.rounds):
            if i % 2 == 0:
                bare_round()
                worker_round(i)
            else:
                worker_round(i)
                bare_round()

    med = statistics.median
    w_inf = med(r["inference_s"] for r in workers)
    b_tot = med(r["total_s"] for r in bares)
    b_frames = med(r["frames_s"] for r in bares)
    overhead = w_inf / b_tot - 1
    n = len(frames)
    rows = [
        ("bare loop: load + describe", n, b_tot, n / b_frames, "baseline"),
        ("worker: inference phase", n, w_inf, n / max(w_inf - med(r["load_s"] for r in bares), 1e-9),
         f"{overhead:+.1%}"),
        ("worker: whole job (process)", n, med(r["job_s"] for r in workers), 0.0,
         f"+{med(r['startup_s'] for r in workers):.3f} s start"),
    ]
    print_table(
        f"Worker overhead, {model_name}, n_gpu_layers={args.n_gpu_layers}, {n} frames, median of {args.rounds}",
        ["path", "frames", "seconds", "frames/s", "vs bare"],
        rows,
    )
    verdict = "PASS" if overhead < TARGET else "FAIL"
    print(f"inference overhead of the supervised worker: {overhead:+.2%} (target < {TARGET:.0%}): {verdict}")
    path = write_result("worker_overhead", {
        "model": model_name,
        "n_gpu_layers": args.n_gpu_layers,
        "frames": n,
        "rounds": args.rounds,
        "film_duration_s": args.duration,
        "bare": {"median_total_s": b_tot, "median_load_s": med(r["load_s"] for r in bares),
                 "median_frames_s": b_frames, "runs": bares},
        "worker": {"median_inference_s": w_inf, "median_startup_s": med(r["startup_s"] for r in workers),
                   "median_job_s": med(r["job_s"] for r in workers), "runs": workers},
        "first_job_s": first["job_s"],
        "overhead": overhead,
        "target": TARGET,
        "pass": overhead < TARGET,
        "cpus": len(os.sched_getaffinity(0)),
    })
    print(f"wrote {path}")
    return 0 if overhead < TARGET else 1


if __name__ == "__main__":
    raise SystemExit(main())
