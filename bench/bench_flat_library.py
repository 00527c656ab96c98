"""A flat library (every film in one folder) against one folder per film, and eagerness during rescans.

    python bench/bench_flat_library.py                      # 2,500 / 5,000 / 10,000 films
    python bench/bench_flat_library.py --sizes 1000 2000    # quicker

For each size and layout, a library of films with finished work dirs (checkpoint, cache header, proxy,
our stamps sidecar) and a subtitle each is built, then measured:

1. time to READY of a real ``cinecutd run`` (process start to the control socket answering);
2. a warm rescan in-process (``Engine.reconcile``, best of 3), beside the lean floor loop a correct rescan
   cannot beat (list the folder, stat the film, read the checkpoint, pread the cache header);
3. at the largest size, flat layout: the invalidation latency of a replacement made while a requested
   rescan of the whole library runs (p50 / max over a few tries), and whether the rescan was still
   running when the invalidation landed.

Prints a table and writes ``bench/results/flat_library.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_result

from cinecut.checkpoint import PipelineCheckpoint, save_checkpoint
from cinecut.inference.cache import encode_cache
from cinecut.inference.models import SceneDescription
from cinecut.models import KeyframeRecord
from cinecut.revalidate import revalidate
from cinecut.stamp import SourceStamp
from cinecut.workdir import CHECKPOINT_NAME, WorkDir
from cinecutd.client import ClientError, ControlClient
from cinecutd.config import load_config
from cinecutd.engine import Engine
from cinecutd.logs import configure_logging

FILM_BYTES = 4096
MTIME = 1_700_000_000.25
SRT = "1\n00:00:01,000 --> 00:00:02,500\nHello.\n"


def film_path(root: Path, i: int, flat: bool) -> Path:
    name = f"Film {i:05d} (2001)"
    return root / f"{name}.mkv" if flat else root / name / f"{name}.mkv"


def build_library(root: Path, n: int, flat: bool) -> None:
    """``n`` films with subtitles and finished work dirs; stamps recorded as a running daemon would."""
    shared = root.parent / f"shared-{root.name}.scenedesc.msgpack"
    records = [(KeyframeRecord(i * 2.5, f"/x/frame_{i:04d}.jpg", "scene_change"),
                SceneDescription("a scene", "calm", "walking", "street")) for i in range(20)]
    shared.write_bytes(encode_cache(records, "/lib/x.mkv", SourceStamp(MTIME, FILM_BYTES)))
    payload = os.urandom(FILM_BYTES)
    root.mkdir(parents=True)
    for i in range(n):
        film = film_path(root, i, flat)
        film.parent.mkdir(exist_ok=True)
        film.write_bytes(payload)
        os.utime(film, (MTIME, MTIME))
        sub = film.with_suffix(".en.srt")
        sub.write_text(SRT)
        wd = WorkDir.for_film(film)
        wd.path.mkdir()
        os.link(shared, wd.cache_path)
        wd.proxy_path.write_bytes(b"\0" * 256)
        os.utime(wd.proxy_path, (MTIME + 10, MTIME + 10))
        save_checkpoint(PipelineCheckpoint(source_file=str(film), vibe="action", stages_complete=["proxy"],
                                           proxy_path=str(wd.proxy_path)), wd)
        revalidate(film, [sub])


def write_config(base: Path, root: Path, name: str) -> Path:
    cfg = base / f"{name}.toml"
    cfg.write_text(
        f'[daemon]\nlog_format = "json"\nlog_level = "info"\nrescan_interval = 0\nsettle_seconds = 1.0\n'
        f'[[library]]\npath = "{root}"\n[control]\nsocket = "{base / (name + ".sock")}"\n'
    )
    return cfg


def floor_loop(root: Path, flat: bool) -> tuple[float, int]:
    """What any correct rescan must do per film, in plain Python: list, stat, read checkpoint, pread header."""
    t0 = time.perf_counter()
    n = 0
    folders = [root] if flat else [Path(e.path) for e in os.scandir(root) if e.is_dir() and not e.name.endswith("_work")]
    for folder in folders:
        for entry in os.scandir(folder):
            if not entry.name.endswith(".mkv"):
                continue
            os.stat(entry.path)
            stem = entry.name[:-4]
            wd = os.path.join(folder, f"{stem}_cinecut_work")
            with open(os.path.join(wd, CHECKPOINT_NAME), "rb") as f:
                f.read()
            try:
                fd = os.open(os.path.join(wd, f"{stem}.scenedesc.msgpack"), os.O_RDONLY)
            except FileNotFoundError:
                continue  # invalidated by the latency measurement
            try:
                os.pread(fd, 256, 0)
            finally:
                os.close(fd)
            n += 1
    return time.perf_counter() - t0, n


def measure_rescan(cfg: Path, root: Path, flat: bool, repeats: int = 3) -> dict[str, float]:
    engine = Engine(load_config(cfg))
    engine.reconcile("startup")
    times, floors = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        engine.reconcile("bench")
        times.append(time.perf_counter() - t0)
        floors.append(floor_loop(root, flat)[0])
    return {"rescan_s": min(times), "floor_s": min(floors), "rescan_vs_floor": min(times) / min(floors)}


class Daemon:
    def __init__(self, cfg: Path) -> None:
        self.cfg = cfg
        self.sock = cfg.with_suffix(".sock")
        self.log = cfg.with_suffix(".log")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "cinecutd.cli", "run", "--config", str(self.cfg)],
                                     stdout=self.log.open("wb"), stderr=subprocess.STDOUT, env=env)
        while True:
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace")[-3000:]
                raise SystemExit(f"daemon exited early ({self.proc.returncode}):\n{tail}")
            try:
                with ControlClient(self.sock, timeout=1.0) as c:
                    if c.request("ping").get("pong"):
                        return time.perf_counter() - t0
            except (ClientError, OSError):
                pass
            if time.perf_counter() - t0 > 900:
                raise SystemExit("daemon not ready after 900 s")
            time.sleep(0.01)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)


def measure_latency_during_rescan(d: Daemon, root: Path, n: int, tries: int) -> dict[str, Any]:
    """Start a requested rescan, replace a film while it runs, time the invalidation."""
    lat, during = [], 0
    for k in range(tries):
        film = film_path(root, (k * 7919) % n, True)
        wd = WorkDir.for_film(film)
        ended = threading.Event()

        def rescan(ended: threading.Event = ended) -> None:
            with ControlClient(d.sock, timeout=600) as c:
                c.request("rescan")
            ended.set()

        t = threading.Thread(target=rescan)
        t.start()
        time.sleep(0.05)  # the rescan is under way
        tmp = film.with_name(f".{film.name}.new")
        tmp.write_bytes(os.urandom(FILM_BYTES + 1))
        t0 = time.perf_counter()
        os.rename(tmp, film)
        while os.path.exists(wd.cache_path):
            if time.perf_counter() - t0 > 60:
                raise SystemExit(f"{film} not invalidated within 60 s")
            time.sleep(0.0002)
        lat.append((time.perf_counter() - t0) * 1000)
        during += not ended.is_set()
        t.join()
    return {"latency_during_rescan_p50_ms": statistics.median(lat), "latency_during_rescan_max_ms": max(lat),
            "latency_tries": tries, "invalidated_before_rescan_ended": during}


def reconciled_duration(log: Path, reason: str) -> float | None:
    for line in reversed(log.read_text(errors="replace").splitlines()):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") == "reconciled" and rec.get("reason") == reason:
            return float(rec["duration_s"])
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2500, 5000, 10_000])
    ap.add_argument("--tries", type=int, default=5, help="replacements during a rescan (largest flat library)")
    ap.add_argument("--dir", type=Path, default=None, help="where to build the libraries (default: a temp dir)")
    args = ap.parse_args()
    configure_logging("console", "warning")
    base = Path(tempfile.mkdtemp(prefix="cinecut-flat-", dir=args.dir))
    rows: list[list[Any]] = []
    floor_rows: list[list[Any]] = []
    results: list[dict[str, Any]] = []
    latency: dict[str, Any] = {}
    try:
        for n in args.sizes:
            per: dict[str, Any] = {"films": n}
            for flat in (True, False):
                layout = "flat" if flat else "foldered"
                root = base / f"{layout}-{n}"
                build_library(root, n, flat)
                cfg = write_config(base, root, f"{layout}-{n}")
                d = Daemon(cfg)
                try:
                    d.start()  # first start: may record what the build did not
                    readies = []
                    for _ in range(2):  # best of two: a shared machine's noise only ever adds time
                        d.stop()
                        readies.append(d.start())
                    per[f"{layout}_ready_s"] = min(readies)
                    per[f"{layout}_startup_reconcile_s"] = reconciled_duration(d.log, "startup")
                    if flat and n == max(args.sizes):
                        latency = measure_latency_during_rescan(d, root, n, args.tries)
                finally:
                    d.stop()
                rescan = measure_rescan(cfg, root, flat)
                per.update({f"{layout}_{k}": v for k, v in rescan.items()})
                shutil.rmtree(root)
            per["ready_flat_vs_foldered"] = per["flat_ready_s"] / per["foldered_ready_s"]
            per["rescan_flat_vs_foldered"] = per["flat_rescan_s"] / per["foldered_rescan_s"]
            results.append(per)
            rows.append([f"{n:,}", f"{per['flat_ready_s']:.2f}", f"{per['foldered_ready_s']:.2f}",
                         f"{per['ready_flat_vs_foldered']:.2f}", f"{per['flat_rescan_s']:.2f}",
                         f"{per['foldered_rescan_s']:.2f}", f"{per['rescan_flat_vs_foldered']:.2f}",
                         f"{per['flat_floor_s']:.2f}", f"{per['foldered_floor_s']:.2f}"])
            floor_rows.append([f"{n:,}", f"{per['flat_rescan_s']:.3f}", f"{per['flat_floor_s']:.3f}",
                               f"{per['flat_rescan_vs_floor']:.2f}", f"{per['foldered_rescan_s']:.3f}",
                               f"{per['foldered_floor_s']:.3f}", f"{per['foldered_rescan_vs_floor']:.2f}"])
        print_table("flat vs foldered (s; ratio = flat / foldered, target <= 1.5; floor = lean per-film loop)",
                    ["films", "ready flat", "ready fold", "ratio", "rescan flat", "rescan fold", "ratio",
                     "floor flat", "floor fold"], rows)
        print_table("warm rescan vs the floor, side by side (s; ratio target <= 1.5)",
                    ["films", "flat", "floor", "ratio", "foldered", "floor", "ratio"], floor_rows)
        if latency:
            print_table(f"invalidation latency during a rescan of {max(args.sizes):,} films (flat; target: tens of ms)",
                        ["measure", "value"],
                        [["p50", f"{latency['latency_during_rescan_p50_ms']:.1f} ms"],
                         ["max", f"{latency['latency_during_rescan_max_ms']:.1f} ms"],
                         ["acted on before the rescan ended",
                          f"{latency['invalidated_before_rescan_ended']} of {latency['latency_tries']}"]])
        print(f"written {write_result('flat_library', {'sizes': results, **latency})}")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
