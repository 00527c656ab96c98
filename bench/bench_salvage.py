"""Salvage vs full redo after a subtitle change: frames described again and time, on the tiny LLaVA.

    python bench/bench_salvage.py [--duration 300] [--retimed 5]

A synthetic film (cinecut/demo/film.py: a cue every ~4.4 s, ~820 lines an hour, the density of a
feature film's subtitles; a cut every 3-7 s) is analysed once per case. Then its subtitles change in one
of two ways:

- ``retimed``: a few cues shifted by 0.4 s (a sync fix of some lines),
- ``other release``: another release's subtitles (every cue a little earlier or later, long cues split),

and the next run is measured twice from the same starting state: with salvage (what the pipeline
does), and as a full redo (the salvage store removed after the invalidation: what happened before).
Both runs must end with identical SceneDescriptions. Results go to bench/results/salvage.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import print_table, write_result

from cinecut.demo.film import SyntheticFilm, make_synthetic_film
from cinecut.demo.tinymodel import TinyLlava, build_tiny_llava
from cinecut.inference.salvage import SALVAGE_NAME
from cinecut.pipeline import AnalysisResult, analyze
from cinecut.progress import EventKind, ProgressEvent
from cinecut.revalidate import revalidate
from cinecut.workdir import WorkDir, subtitle_sidecars

Events = list[tuple[float, float, str]]


def _srt_time(t: float) -> str:
    ms = round(t * 1000)
    h, rem = divmod(ms, 3_600_000)
    m, rem = divmod(rem, 60_000)
    s, ms = divmod(rem, 1000)
    return f"{h:02d}:{m:02d}:{s:02d},{ms:03d}"


def write_srt(path: Path, events: Events) -> None:
    blocks = [f"{n}\n{_srt_time(a)} --> {_srt_time(b)}\n{text}\n" for n, (a, b, text) in enumerate(events, 1)]
    path.write_text("\n".join(blocks), encoding="utf-8")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def retimed(events: Events, count: int) -> Events:
    """``count`` cues spread over the film shifted by +0.4 s."""
    step = max(1, len(events) // max(count, 1))
    picks = set(range(step // 2, len(events), step)[:count])
    return [(a + 0.4, b + 0.4, t) if i in picks else (a, b, t) for i, (a, b, t) in enumerate(events)]


def other_release(events: Events) -> Events:
    """Another release: its own timing throughout, and long cues split in two."""
    out: Events = []
    for i, (a, b, text) in enumerate(events):
        a2, b2 = a + 0.23 + 0.05 * (i % 3), b - 0.11
        if b2 - a2 > 1.2 and i % 2 == 0:
            mid = (a2 + b2) / 2
            out += [(a2, mid - 0.05, text), (mid + 0.05, b2, text)]
        else:
            out.append((a2, b2, text))
    return out


def run(film: Path, tiny: TinyLlava, lock: Path) -> tuple[AnalysisResult, float, float]:
    """Analyse; returns (result, total seconds, inference-stage seconds)."""
    marks: dict[str, float] = {}

    def on(ev: ProgressEvent) -> None:
        if ev.kind is EventKind.STAGE and ev.stage == "inference":
            marks["start"] = time.perf_counter()
        elif ev.kind in (EventKind.CACHE_SAVED, EventKind.CACHE_HIT):
            marks["end"] = time.perf_counter()

    t0 = time.perf_counter()
    result = analyze(film, model=tiny.model_path, mmproj=tiny.mmproj_path, n_gpu_layers=0, gpu_lock_path=lock,
                     progress=on)
    total = time.perf_counter() - t0
    return result, total, marks.get("end", t0) - marks.get("start", t0)


def case(root: Path, template: SyntheticFilm, tiny: TinyLlava, name: str, new_events: Events,
         salvage: bool) -> dict[str, Any]:
    folder = root / f"{name}-{'salvage' if salvage else 'redo'}" / template.video.stem
    folder.mkdir(parents=True)
    film = folder / template.video.name
    shutil.copy2(template.video, film)
    assert template.subtitle is not None
    sub = folder / template.subtitle.name
    shutil.copy2(template.subtitle, sub)
    lock = root / "gpu.lock"
    first, first_s, _ = run(film, tiny, lock)
    write_srt(sub, new_events)
    rv = revalidate(film, subtitle_sidecars(film))  # what the daemon does on the edit
    if not salvage:
        (WorkDir.for_film(film).path / SALVAGE_NAME).unlink(missing_ok=True)
    result, total_s, infer_s = run(film, tiny, lock)
    return {
        "plan_before": first.records,
        "first_run_s": round(first_s, 3),
        "kept_by_invalidation": rv.report.salvaged if rv.report else 0,
        "frames": result.records,
        "described": result.frames_computed,
        "salvaged": result.frames_salvaged,
        "inference_s": round(infer_s, 3),
        "total_s": round(total_s, 3),
        "results": [(r.timestamp_s, r.source, d) for r, d in result.results],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=300.0, help="synthetic film length in seconds (default 300)")
    ap.add_argument("--retimed", type=int, default=5, help="cues shifted in the 'retimed' case (default 5)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cinecut-bench-salvage-") as tmp_s:
        tmp = Path(tmp_s)
        tiny = build_tiny_llava(tmp / "model")
        template = make_synthetic_film(tmp / "template" / "Bench Film (2024).mkv", duration_s=args.duration)
        events = list(template.events)
        changes = {"retimed": retimed(events, args.retimed), "other release": other_release(events)}
        rows, out = [], {}
        for name, new_events in changes.items():
            got = {mode: case(tmp, template, tiny, name, new_events, mode == "salvage") for mode in ("salvage", "redo")}
            s, r = got["salvage"], got["redo"]
            if s["results"] != r["results"]:
                raise SystemExit(f"{name}: salvaged results differ from a full redo")
            for mode in ("salvage", "redo"):
                got[mode].pop("results")
            saved = 1 - s["described"] / r["described"] if r["described"] else 0.0
            rows.append([name, s["frames"], s["salvaged"], s["described"], r["described"], f"{saved:.0%}",
                         s["inference_s"], r["inference_s"]])
            out[name] = {**got, "frames_saved_fraction": round(saved, 4),
                         "changed_cues": sum(1 for a, b in zip(events, new_events, strict=False) if a != b)
                         if name == "retimed" else len(new_events)}
        print_table(
            f"Salvage vs redo ({args.duration:.0f} s film, {len(events)} cues, tiny LLaVA, CPU)",
            ["change", "plan", "kept", "described", "redo", "saved", "infer s", "redo s"],
            rows,
        )
        print("plan: keyframes of the new plan; kept: salvaged; described / redo: frames the model described "
              "with salvage / in a full redo; infer s: inference stage wall time (full runs in the JSON)")
        path = write_result("salvage", {"duration_s": args.duration, "cues": len(events), "cases": out})
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
