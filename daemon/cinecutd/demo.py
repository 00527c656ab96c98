"""``cinecutd demo``: the whole story on a generated library, with real processes end to end.

A synthetic film made with ffmpeg arrives in a watched folder by a slow copy; the running daemon
pre-warms it with a tiny generated LLaVA model; ``cinecut analyze`` then gets a cache hit without loading
the model; the film is replaced the way Radarr upgrades a release (rename over) and the daemon
invalidates its cache and stages within milliseconds, then pre-warms it again.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from cinecutd.client import ClientError, ControlClient

FILM_NAME = "Demo Film (2024)"


class DemoError(Exception):
    """A step of the demo did not happen in time; the message says which and where the log is."""


def _bin(name: str) -> list[str]:
    exe = Path(sys.executable).with_name(name)
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "cinecutd.cli" if name == "cinecutd" else "cinecut.cli"]


def _wait(what: str, predicate: Callable[[], Any], timeout: float, log: Path, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise DemoError(f"timed out after {timeout:.0f} s waiting for {what}; daemon log: {log}")


def _slow_copy(src: Path, dest: Path, chunk: int = 256 << 10, pause: float = 0.02) -> None:
    """Copy the way a download or a network copy arrives: in chunks, with the file growing."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as fin, open(dest, "wb") as fout:
        while block := fin.read(chunk):
            fout.write(block)
            fout.flush()
            time.sleep(pause)


def _write_config(base: Path, library: Path, model: Any) -> Path:
    cfg = base / "cinecutd.toml"
    cfg.write_text(
        "\n".join(
            [
                "[daemon]",
                'log_format = "console"',
                "settle_seconds = 0.5",
                f'state_dir = "{base / "state"}"',
                "",
                "[[library]]",
                f'path = "{library}"',
                "",
                "[control]",
                f'socket = "{base / "cinecutd.sock"}"',
                "",
                "[prewarm]",
                "enabled = true",
                'window = "always"',
                f'model = "{model.model_path}"',
                f'mmproj = "{model.mmproj_path}"',
                "settle_seconds = 2",
                f'gpu_lock = "{base / "gpu.lock"}"',
                "",
            ]
        )
    )
    return cfg


def run_demo(base: Path, *, timeout: float = 300.0) -> int:
    """Run the demo in ``base`` (created; an earlier demo there is replaced). Returns an exit code."""
    from cinecut.demo.film import make_synthetic_film
    from cinecut.demo.tinymodel import build_tiny_llava

    console = Console(highlight=False)
    base = base.resolve()
    if base.exists():
        shutil.rmtree(base)
    library, incoming = base / "library", base / "incoming"
    incoming.mkdir(parents=True)
    library.mkdir()
    (base / "state").mkdir()

    console.rule("[bold]cinecut-cache demo")
    console.print("1. Building a tiny random-weight LLaVA model (text GGUF + mmproj) ...")
    model = build_tiny_llava(base / "model")
    console.print(f"   {model.model_path.name}, {model.mmproj_path.name}")
    console.print("2. Making a synthetic film with ffmpeg (real scene cuts, an SRT) ...")
    film_v1 = make_synthetic_film(incoming / "v1" / f"{FILM_NAME}.mkv", duration_s=24.0)
    film_v2 = make_synthetic_film(incoming / "v2" / f"{FILM_NAME}.mkv", duration_s=30.0)
    cfg = _write_config(base, library, model)
    sock = base / "cinecutd.sock"
    log_path = base / "cinecutd.log"
    console.print(f"3. Starting [bold]cinecutd run --config {cfg}[/] (log: {log_path})")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with log_path.open("wb") as log_file:
        daemon = subprocess.Popen([*_bin("cinecutd"), "run", "--config", str(cfg)], stdout=log_file,
                                  stderr=subprocess.STDOUT, env=env)
    try:
        def status(film: str | None = None) -> dict[str, Any] | None:
            try:
                with ControlClient(sock, timeout=5.0) as c:
                    return c.request("status", **({"film": film} if film else {}))
            except ClientError:
                return None

        _wait("the daemon to be ready", lambda: daemon.poll() is not None or status(), 30, log_path)
        if daemon.poll() is not None:
            raise DemoError(f"cinecutd exited with {daemon.returncode}; see {log_path}")
        console.print(f"   ready, pid {daemon.pid}, watching {library}")

        film = library / FILM_NAME / f"{FILM_NAME}.mkv"
        console.print("4. The film arrives by a slow copy into the watched folder ...")
        film.parent.mkdir(parents=True)
        if film_v1.subtitle is not None:
            shutil.copy2(film_v1.subtitle, film.with_suffix(".srt"))
        _slow_copy(film_v1.video, film)
        console.print("5. cinecutd waits for it to settle, then pre-warms it (LLaVA on every keyframe) ...")
        t0 = time.monotonic()
        last = ""

        def warm() -> bool:
            nonlocal last
            s = status(str(film))
            if s is None:
                return False
            cur = ((status() or {}).get("prewarm") or {}).get("current") or {}
            line = f"   frames {cur.get('done')}/{cur.get('total')}" if cur.get("total") else ""
            if line and line != last:
                console.print(line)
                last = line
            return s.get("cache", {}).get("state") == "valid"

        _wait("the pre-warm to finish", warm, timeout, log_path, interval=0.2)
        console.print(f"   [green]warm[/] after {time.monotonic() - t0:.1f} s: {film.stem}.scenedesc.msgpack is valid")

        console.print("6. [bold]cinecut analyze[/] now finds a valid cache and never loads the model:")
        out = subprocess.run([*_bin("cinecut"), "analyze", str(film), "--model", "/nonexistent/model.gguf",
                              "--mmproj", "/nonexistent/mmproj.gguf", "--gpu-lock", str(base / "gpu.lock")],
                             capture_output=True, text=True, env=env, timeout=120)
        for line in out.stdout.splitlines():
            if "Cache hit" in line:
                console.print(f"   {line.strip()}")
        if out.returncode != 0 or "Cache hit" not in out.stdout:
            raise DemoError(f"cinecut analyze did not report a cache hit (exit {out.returncode}): {out.stderr[-500:]}")

        console.print("7. A better release arrives and is renamed over the film (the Radarr upgrade pattern) ...")
        staged = film.with_name(f".{film.name}.partial")
        shutil.copyfile(film_v2.video, staged)
        cache = film.parent / f"{FILM_NAME}_cinecut_work" / f"{FILM_NAME}.scenedesc.msgpack"
        t_rename = time.perf_counter()
        os.rename(staged, film)
        _wait("the stale cache to be deleted", lambda: not cache.exists(), 10, log_path, interval=0.0005)
        seen_ms = (time.perf_counter() - t_rename) * 1000
        inv = _wait("the invalidation record", lambda: (status() or {}).get("recent_invalidations"), 10, log_path)
        rec = inv[0]
        console.print(f"   [red]stale cache deleted[/] {seen_ms:.1f} ms after the rename "
                      f"(daemon latency {rec['latency_ms']:.2f} ms); stages reset: {', '.join(rec['stages'])}; "
                      f"{rec['files_removed']} files, {rec['bytes_reclaimed']:,} bytes reclaimed")
        ckpt = json.loads((cache.parent / "pipeline_checkpoint.json").read_text())
        console.print(f"   checkpoint stages_complete now {ckpt['stages_complete']}")

        console.print("8. ... and pre-warms the new release:")
        t0 = time.monotonic()
        _wait("the second pre-warm", warm, timeout, log_path, interval=0.2)
        console.print(f"   [green]warm again[/] after {time.monotonic() - t0:.1f} s")

        console.print("9. [bold]cinecutd status[/]:")
        subprocess.run([*_bin("cinecutd"), "status", "--socket", str(sock)], env=env, check=False)
    except DemoError as exc:
        console.print(f"[red]demo failed:[/] {exc}")
        return 1
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=10)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
    console.print(f"10. cinecutd stopped (exit {daemon.returncode}). Everything is in {base}")
    return 0 if daemon.returncode == 0 else 1
