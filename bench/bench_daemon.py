"""cinecutd at library scale: invalidation latency, startup reconcile, idle cost, cost of a big copy.

    python bench/bench_daemon.py                 # 10,000 films, 200 replacements, 5 GB copy
    python bench/bench_daemon.py --films 2000 --copy-gb 1 --replacements 100   # quicker

Builds a library of N films, each in its own folder with a work dir holding a realistic ~1 MB
SceneDescription cache (2,000 records), a checkpoint, a proxy, keyframes and our stamps sidecar. The caches
are hard links of one file (the films share one mtime and size, which is all the cache's validity looks
at), so N caches cost 1 MB of disk while every reader still opens and reads a 1 MB file; page cache is hot
for both sides of every comparison.

Measures, in one run:
1. startup reconcile of the whole library (the daemon's header-only probe) against the same reconcile
   using full ``load_cache`` reads, as a ratio (target: < 0.5 s and >= 20x);
2. invalidation latency with the library under watch by a real ``cinecutd`` process: from the
   ``rename`` that replaces a film to its cache gone and its checkpoint reset, p50/p99 (target 5 / 25 ms);
3. the daemon's idle CPU and RSS with the library watched (target ~0 % and < 80 MB);
4. the daemon's CPU time while a multi-GB file is copied into a watched folder.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_result

from cinecut.checkpoint import PipelineCheckpoint, save_checkpoint
from cinecut.inference.cache import encode_cache, load_cache
from cinecut.inference.models import SceneDescription
from cinecut.models import KeyframeRecord
from cinecut.revalidate import revalidate
from cinecut.stamp import SourceStamp
from cinecut.workdir import WorkDir
from cinecutd.config import load_config
from cinecutd.discovery import scan_root
from cinecutd.engine import Engine

FILM_BYTES = 4096
MTIME = 1_700_000_000.25


def film_path(root: Path, i: int) -> Path:
    return root / f"Film {i:05d} (2001)" / f"Film {i:05d} (2001).mkv"


def build_library(root: Path, n: int, records: int) -> Path:
    """N films with complete work dirs; returns the shared cache file."""
    shared = root.parent / "shared.scenedesc.msgpack"
    results = [
        (
            KeyframeRecord(
                i * 2.5, f"/lib/x_cinecut_work/keyframes/frame_{int(i * 2500):010d}.jpg", "scene_change"
            ),
            SceneDescription(
                "A man in a grey suit walks through a crowded train station at dusk, looking over his shoulder",
                "tense, watchful, with a sense of something about to go wrong",
                "walking quickly, glancing back, pushing past commuters toward the platform",
                "a large Victorian train station with iron arches, steam and warm evening light",
            ),
        )
        for i in range(records)
    ]
    shared.write_bytes(encode_cache(results, "/lib/x.mkv", SourceStamp(MTIME, FILM_BYTES)))
    payload = os.urandom(FILM_BYTES)
    for i in range(n):
        film = film_path(root, i)
        film.parent.mkdir(parents=True)
        film.write_bytes(payload)
        os.utime(film, (MTIME, MTIME))
        wd = WorkDir.for_film(film)
        wd.path.mkdir()
        os.link(shared, wd.cache_path)
        wd.proxy_path.write_bytes(b"\0" * 1024)
        os.utime(wd.proxy_path, (MTIME + 10, MTIME + 10))
        wd.keyframes_dir.mkdir()
        for k in range(3):
            (wd.keyframes_dir / f"frame_{k * 2500:010d}.jpg").write_bytes(b"\xff\xd8jpeg")
        wd.timestamps_path.write_text("[0.0, 2.5, 5.0]")
        ckpt = PipelineCheckpoint(
            source_file=str(film),
            vibe="action",
            stages_complete=["proxy", "subtitles", "keyframes", "structural", "narrative"],
            proxy_path=str(wd.proxy_path),
            keyframe_count=records,
            dialogue_event_count=400,
            inference_complete=True,
            cache_hit=False,
            manifest_path=str(wd.path / "TRAILER_MANIFEST.json"),
            proxy_duration_s=6000.0,
        )
        save_checkpoint(ckpt, wd)
        (wd.path / "TRAILER_MANIFEST.json").write_text("{}")
        revalidate(film)  # writes the stamps sidecar, as a running daemon would have
    return shared


def write_config(base: Path, root: Path) -> Path:
    cfg = base / "cinecutd.toml"
    cfg.write_text(
        f'[daemon]\nlog_format = "json"\nlog_level = "warning"\nrescan_interval = 0\nsettle_seconds = 1.0\n'
        f'[[library]]\npath = "{root}"\n[control]\nsocket = "{base / "cinecutd.sock"}"\n'
    )
    return cfg


def reconcile_with_full_loads(root: Path) -> tuple[float, int]:
    """The same reconcile, but validating each cache the expensive way (full unpack)."""
    t0 = time.perf_counter()
    res = scan_root(root, (".mkv",), (".srt",))
    valid = 0
    for film in res.films:
        if load_cache(film, WorkDir.for_film(film)) is not None:
            valid += 1
    return time.perf_counter() - t0, valid


def measure_reconcile(cfg_path: Path, root: Path, repeats: int) -> dict[str, float]:
    config = load_config(cfg_path)
    fast = []
    for _ in range(repeats):
        engine = Engine(config)
        t0 = time.perf_counter()
        summary = engine.reconcile("bench")
        fast.append(time.perf_counter() - t0)
        assert summary["films"] > 0
        warm = sum(1 for s in engine.reg.films.values() if s.cache == "valid")
    slow, valid = reconcile_with_full_loads(root)
    assert valid == warm, (valid, warm)
    best = min(fast)
    return {"reconcile_s": best, "full_load_reconcile_s": slow, "ratio": slow / best, "films_warm": warm}


def start_daemon(cfg: Path, log_path: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cinecutd.cli", "run", "--config", str(cfg)],
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    sock = cfg.parent / "cinecutd.sock"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if sock.exists():
            return proc
        if proc.poll() is not None:
            raise SystemExit(f"daemon exited early; see {log_path}")
        time.sleep(0.05)
    raise SystemExit("daemon did not become ready")


def measure_latency(root: Path, n: int, replacements: int, rng: random.Random) -> dict[str, float]:
    lat = []
    for i in rng.sample(range(n), replacements):
        film = film_path(root, i)
        wd = WorkDir.for_film(film)
        tmp = film.with_name(f".{film.name}.new")
        tmp.write_bytes(os.urandom(FILM_BYTES + 1))
        t0 = time.perf_counter()
        os.rename(tmp, film)
        while os.path.exists(wd.cache_path):
            if time.perf_counter() - t0 > 5:
                raise SystemExit(f"cache of {film} not invalidated within 5 s")
            time.sleep(0.0001)
        t1 = time.perf_counter()
        ckpt = json.loads(wd.checkpoint_path.read_text())
        assert ckpt["stages_complete"] == [] and ckpt["inference_complete"] is None, ckpt
        lat.append((t1 - t0) * 1000)
        time.sleep(0.02)
    lat.sort()
    return {
        "latency_p50_ms": statistics.median(lat),
        "latency_p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
        "latency_max_ms": lat[-1],
        "replacements": len(lat),
    }


def measure_idle(proc: psutil.Process, seconds: float) -> dict[str, float]:
    c0 = proc.cpu_times()
    time.sleep(seconds)
    c1 = proc.cpu_times()
    cpu = (c1.user - c0.user) + (c1.system - c0.system)
    return {"idle_cpu_percent": 100 * cpu / seconds, "rss_mb": proc.memory_info().rss / 2**20}


def measure_copy(proc: psutil.Process, root: Path, gb: float) -> dict[str, float]:
    dest_dir = root / "Incoming Film (2024)"
    dest_dir.mkdir()
    dest = dest_dir / "Incoming Film (2024).mkv"
    chunk = os.urandom(1 << 20)
    c0 = proc.cpu_times()
    t0 = time.perf_counter()
    with open(dest, "wb") as f:
        for _ in range(int(gb * 1024)):
            f.write(chunk)
    elapsed = time.perf_counter() - t0
    time.sleep(2.0)  # the final revalidation after the burst
    c1 = proc.cpu_times()
    cpu = (c1.user - c0.user) + (c1.system - c0.system)
    dest.unlink()
    return {
        "copy_gb": gb,
        "copy_s": elapsed,
        "daemon_cpu_s_during_copy": cpu,
        "daemon_cpu_percent_of_copy": 100 * cpu / elapsed,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--films", type=int, default=10_000)
    ap.add_argument("--records", type=int, default=2_000, help="records per cache (2,000 = ~1 MB)")
    ap.add_argument("--replacements", type=int, default=200)
    ap.add_argument("--copy-gb", type=float, default=5.0)
    ap.add_argument("--idle-seconds", type=float, default=10.0)
    ap.add_argument("--dir", type=Path, default=None, help="where to build the library (default: a temp dir)")
    args = ap.parse_args()
    rng = random.Random(7)
    base = Path(tempfile.mkdtemp(prefix="cinecut-bench-", dir=args.dir))
    root = base / "films"
    root.mkdir()
    try:
        t0 = time.perf_counter()
        shared = build_library(root, args.films, args.records)
        build_s = time.perf_counter() - t0
        cache_bytes = shared.stat().st_size
        cfg = write_config(base, root)
        rec = measure_reconcile(cfg, root, repeats=3)
        proc = start_daemon(cfg, base / "daemon.log")
        ps = psutil.Process(proc.pid)
        try:
            time.sleep(1.0)
            idle = measure_idle(ps, args.idle_seconds)
            lat = measure_latency(root, args.films, args.replacements, rng)
            copy = measure_copy(ps, root, args.copy_gb) if args.copy_gb > 0 else {}
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=10)
        data = {
            "films": args.films,
            "cache_bytes": cache_bytes,
            "library_build_s": build_s,
            **rec,
            **idle,
            **lat,
            **copy,
        }
        rows = [
            ["films under watch", f"{args.films:,}", ""],
            ["cache size", f"{cache_bytes / 1e6:.2f} MB", ""],
            ["startup reconcile (header-only)", f"{rec['reconcile_s']:.3f} s", "< 0.5 s"],
            ["same reconcile with full cache loads", f"{rec['full_load_reconcile_s']:.3f} s", ""],
            ["ratio", f"{rec['ratio']:.1f}x", ">= 20x"],
            ["invalidation latency p50", f"{lat['latency_p50_ms']:.2f} ms", "< 5 ms"],
            ["invalidation latency p99", f"{lat['latency_p99_ms']:.2f} ms", "< 25 ms"],
            ["idle CPU", f"{idle['idle_cpu_percent']:.2f} %", "~0 %"],
            ["RSS", f"{idle['rss_mb']:.1f} MB", "< 80 MB"],
        ]
        if copy:
            rows.append(
                [
                    f"daemon CPU during {args.copy_gb:g} GB copy",
                    f"{copy['daemon_cpu_s_during_copy']:.2f} s ({copy['daemon_cpu_percent_of_copy']:.1f} % of {copy['copy_s']:.1f} s)",
                    "",
                ]
            )
        print_table("cinecutd at library scale", ["measure", "value", "target"], rows)
        print(f"written {write_result('daemon', data)}")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
