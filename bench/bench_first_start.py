"""First start of cinecutd on a library upstream already analysed, against the next start.

    python -m bench.bench_first_start                # 10,000 films (from the repository root)
    python -m bench.bench_first_start --films 2000   # quicker

Builds N films, each in its own folder with the work dir a finished upstream run leaves (checkpoint,
SceneDescription cache stamped with the film, proxy, keyframes, timestamps, manifest) and no file of
ours. Starts a real ``cinecutd run`` and times it to READY (it answers on its socket only after its startup
reconcile), stops it, and starts it again. Between the runs it lists every work dir: a first start must
create, rewrite or touch nothing in a work dir that nothing changed (on a NAS every create is a round
trip). Prints a table and writes ``bench/results/first_start.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench._common import print_table, write_result
from cinecut.inference.cache import encode_cache
from cinecut.inference.models import SceneDescription
from cinecut.models import KeyframeRecord
from cinecut.stamp import SourceStamp
from cinecut.workdir import WorkDir
from tests.harness.runner import Daemon, DaemonRunner, Library

MTIME = 1_700_000_000.25
RECORDS = 40


def build_upstream_library(root: Path, n: int) -> list[Path]:
    """N films with the work dirs upstream leaves; returns the work dirs."""
    wds = []
    for i in range(n):
        folder = root / f"Film {i:05d} (2001)"
        folder.mkdir(parents=True)
        film = folder / f"Film {i:05d} (2001).mkv"
        film.write_bytes(f"film {i} ".encode() * 512)
        os.utime(film, (MTIME, MTIME))
        wd = WorkDir.for_film(film)
        wd.keyframes_dir.mkdir(parents=True)
        stamps = [2.5 * k for k in range(RECORDS)]
        results = []
        for k, ts in enumerate(stamps[:3]):
            jpg = wd.keyframes_dir / f"frame_{int(ts * 1000):010d}.jpg"
            jpg.write_bytes(b"\xff\xd8jpeg" + bytes([k]))
        for ts in stamps:
            rec = KeyframeRecord(ts, str(wd.keyframes_dir / f"frame_{int(ts * 1000):010d}.jpg"), "scene_change")
            results.append((rec, SceneDescription("a street at night", "tense", "running", "city")))
        st = os.stat(film)
        wd.cache_path.write_bytes(encode_cache(results, str(film), SourceStamp.from_stat(st)))
        wd.proxy_path.write_bytes(b"\0" * 1024)
        wd.timestamps_path.write_text(json.dumps(stamps))
        (wd.path / "TRAILER_MANIFEST.json").write_text("{}")
        ckpt = {
            "source_file": str(film), "vibe": "action",
            "stages_complete": ["proxy", "subtitles", "keyframes", "structural", "narrative"],
            "proxy_path": str(wd.proxy_path), "keyframe_count": RECORDS, "dialogue_event_count": 400,
            "inference_complete": True, "cache_hit": False,
            "manifest_path": str(wd.path / "TRAILER_MANIFEST.json"), "assembly_manifest_path": None,
            "proxy_duration_s": 6000.0, "structural_anchors": None,
        }
        (wd.path / "pipeline_checkpoint.json").write_text(json.dumps(ckpt))
        wds.append(wd.path)
    return wds


def listing(wds: list[Path]) -> dict[str, tuple[int, int]]:
    """Every entry of every work dir (and its keyframes dir) with inode and mtime."""
    out: dict[str, tuple[int, int]] = {}
    for wd in wds:
        for d in (wd, wd / "keyframes"):
            with os.scandir(d) as it:
                for e in it:
                    st = e.stat(follow_symlinks=False)
                    out[e.path] = (st.st_ino, st.st_mtime_ns)
    return out


def timed_start(runner: DaemonRunner, config: Path) -> tuple[float, float, Daemon]:
    """Seconds to READY, and the startup reconcile's own duration from the daemon's log."""
    d = runner.daemon(config)
    t0 = time.monotonic()
    d.start(ready_timeout=900)
    ready = time.monotonic() - t0
    rec = [r for r in d.logs("reconciled") if r.get("reason") == "startup"]
    return ready, float(rec[-1]["duration_s"]) if rec else float("nan"), d


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--films", type=int, default=10_000)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="cinecut-first-start-"))
    try:
        with DaemonRunner(base) as runner:
            root = runner.library("films")
            t0 = time.monotonic()
            wds = build_upstream_library(root, args.films)
            built_s = time.monotonic() - t0
            before = listing(wds)
            config = runner.config([Library(root)], log_level="info")
            first_s, first_rec, d = timed_start(runner, config)
            after_first = listing(wds)
            d.stop()
            second_s, second_rec, d = timed_start(runner, config)
            trips = []
            for _ in range(3):  # best of 3: the first may meet the watches still being placed after READY
                t0 = time.monotonic()
                d.request("rescan", timeout=600)
                trips.append(time.monotonic() - t0)
            rescan_s = min(trips)
            own = [float(r["duration_s"]) for r in d.logs("reconciled") if r.get("reason") != "startup"]
            rescan_own_s = min(own) if own else float("nan")
            after_second = listing(wds)
            films = d.status()["films"]
            d.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    created = len(after_first.keys() - before.keys())
    changed = sum(1 for k, v in after_first.items() if k in before and before[k] != v)
    created2 = len(after_second.keys() - before.keys())
    rows = [
        ("first start to READY (s)", first_s),
        ("second start to READY (s)", second_s),
        ("first start: startup reconcile (s)", first_rec),
        ("second start: startup reconcile (s)", second_rec),
        ("warm rescan, request to answer, best of 3 (s)", rescan_s),
        ("warm rescan, the daemon's own duration, best of 3 (s)", rescan_own_s),
        ("first start's reconcile / warm rescan", first_rec / rescan_s if rescan_s else 0.0),
        ("files created in work dirs by the first start", created),
        ("entries rewritten or touched by the first start", changed),
        ("files created in work dirs after the second start", created2),
        ("films warm", films["warm"]),
        ("films unverified", films.get("unverified", 0)),
    ]
    print_table(f"cinecutd first start, {args.films:,} upstream work dirs (built in {built_s:.1f} s)",
                ["measure", "value"], rows)
    path = write_result("first_start", {
        "films": args.films,
        "first_start_s": round(first_s, 3),
        "second_start_s": round(second_s, 3),
        "first_start_reconcile_s": first_rec,
        "second_start_reconcile_s": second_rec,
        "warm_rescan_s": round(rescan_s, 3),
        "warm_rescan_own_s": rescan_own_s,
        "files_created_first_start": created,
        "entries_changed_first_start": changed,
        "files_created_second_start": created2,
        "films_warm": films["warm"],
        "films_unverified": films.get("unverified", 0),
    })
    print(f"wrote {path}")
    return 0 if created == 0 and changed == 0 and created2 == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
