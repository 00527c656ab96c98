"""Keyframe extraction: batched runs vs upstream's one ffmpeg process per frame, same film, same run.

    python bench/bench_keyframes.py [--frames 200] [--duration 90] [--source proxy|film] [--repeat 1]

Builds a synthetic film (and, by default, its 420p proxy, which is what the keyframes stage reads), plans
about ``--frames`` keyframes from its subtitles, scene changes and interval fallbacks, extracts them both
ways into fresh directories, checks that both show the same frames, and reports wall time, CPU time of
the ffmpeg children and the ratio. Results go to bench/results/keyframes.json.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import print_table, write_result

from cinecut.demo.film import make_synthetic_film, read_frame_numbers
from cinecut.ingest.keyframes import (
    extract_keyframes,
    extract_keyframes_per_frame,
    group_runs,
    plan_keyframes,
)
from cinecut.ingest.probe import probe
from cinecut.ingest.proxy import make_proxy
from cinecut.ingest.scenes import detect_scene_changes
from cinecut.ingest.subtitles import DialogueEvent, parse_subtitles
from cinecut.models import KeyframeRecord


def plan_of_size(
    duration: float, dialogue: Sequence[DialogueEvent], scenes: Sequence[float], frames: int
) -> list[tuple[float, str]]:
    """The plan whose interval fallback brings it closest to ``frames`` keyframes (bisection on max_gap)."""
    lo, hi = 0.25, 30.0
    best = plan_keyframes(duration, dialogue, scenes, max_gap=hi, min_spacing=0.1)
    for _ in range(40):
        mid = (lo + hi) / 2
        plan = plan_keyframes(duration, dialogue, scenes, max_gap=mid, min_spacing=0.1)
        if abs(len(plan) - frames) < abs(len(best) - frames):
            best = plan
        if len(plan) > frames:
            lo = mid
        else:
            hi = mid
    return best


def timed(fn: Callable[[], list[KeyframeRecord]]) -> tuple[float, float, list[KeyframeRecord]]:
    """(wall seconds, CPU seconds of finished children, result)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    result = fn()
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=200, help="keyframes to plan (default 200)")
    ap.add_argument("--duration", type=float, default=90.0, help="synthetic film length in seconds")
    ap.add_argument(
        "--source", choices=("proxy", "film"), default="proxy", help="extract from (default proxy)"
    )
    ap.add_argument("--repeat", type=int, default=1, help="runs of each method (median reported)")
    ap.add_argument("--workers", type=int, default=None, help="parallel batched runs (default: automatic)")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="cinecut-bench-") as tmp_s:
        tmp = Path(tmp_s)
        t0 = time.perf_counter()
        film = make_synthetic_film(tmp / "Bench Film (2024).mkv", duration_s=args.duration)
        video = film.video
        if args.source == "proxy":
            video = tmp / "Bench Film (2024)_proxy.mp4"
            make_proxy(film.video, video)
        setup_s = time.perf_counter() - t0
        info = probe(video)
        scenes = detect_scene_changes(video)
        assert film.subtitle is not None
        plan = plan_of_size(info.duration_s, parse_subtitles(film.subtitle), scenes, args.frames)
        runs = group_runs([t for t, _ in plan], seek_gap_s=15.0, max_per_run=64, time_base=info.time_base)

        batched: list[tuple[float, float]] = []
        single: list[tuple[float, float]] = []
        for i in range(args.repeat):
            wall, cpu, recs_b = timed(
                lambda i=i: extract_keyframes(video, plan, tmp / f"batched{i}", workers=args.workers)
            )
            batched.append((wall, cpu))
            wall, cpu, recs_s = timed(
                lambda i=i: extract_keyframes_per_frame(video, plan, tmp / f"single{i}")
            )
            single.append((wall, cpu))
        names_equal = [Path(r.frame_path).name for r in recs_b] == [Path(r.frame_path).name for r in recs_s]
        shown_b = read_frame_numbers([Path(r.frame_path) for r in recs_b])
        shown_s = read_frame_numbers([Path(r.frame_path) for r in recs_s])
        same_frames = sum(a == b for a, b in zip(shown_b, shown_s))

    b_wall = statistics.median(w for w, _ in batched)
    s_wall = statistics.median(w for w, _ in single)
    b_cpu = statistics.median(c for _, c in batched)
    s_cpu = statistics.median(c for _, c in single)
    n = len(plan)
    rows = [
        ("batched", len(runs), b_wall, b_cpu, 1000 * b_wall / n),
        ("per-frame (upstream)", n, s_wall, s_cpu, 1000 * s_wall / n),
    ]
    print_table(
        f"{n} keyframes from a {info.duration_s:.0f} s {info.width}x{info.height} {args.source}",
        ["method", "ffmpeg runs", "wall s", "child CPU s", "ms/frame"],
        rows,
    )
    ratio = s_wall / b_wall
    print(f"speed-up (wall): {ratio:.1f}x   CPU: {s_cpu / b_cpu:.1f}x   same frames: {same_frames}/{n}")
    path = write_result(
        "keyframes",
        {
            "frames": n,
            "source": args.source,
            "video": {
                "duration_s": info.duration_s,
                "width": info.width,
                "height": info.height,
                "fps": info.fps,
            },
            "setup_s": round(setup_s, 3),
            "batched": {
                "runs": len(runs),
                "wall_s": [w for w, _ in batched],
                "child_cpu_s": [c for _, c in batched],
            },
            "per_frame": {"runs": n, "wall_s": [w for w, _ in single], "child_cpu_s": [c for _, c in single]},
            "ratio_wall": round(ratio, 2),
            "ratio_cpu": round(s_cpu / b_cpu, 2),
            "same_names": names_equal,
            "same_frames": same_frames,
        },
    )
    print(f"wrote {path}")
    return 0 if names_equal and same_frames == n else 1


if __name__ == "__main__":
    sys.exit(main())
