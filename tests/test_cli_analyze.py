"""``cinecut analyze`` and ``cinecut status`` as a user runs them: real processes, messages, exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import upstream_reader as up
from sigint import default_sigint
from test_pipeline import analyzed_film, clone_film_dir, copy_film, partial_count, ready_for_inference_film

from cinecut import __version__
from cinecut.locks import work_dir_lock
from cinecut.workdir import WorkDir

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 120


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CINECUT_MODEL", "CINECUT_MMPROJ")}
    env.update(extra)
    return env


def cinecut(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cinecut.cli", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env or _env(),
        check=False,
    )


def popen(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "cinecut.cli", *map(str, args)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env or _env(),
        preexec_fn=default_sigint,  # Ctrl-C reaches it even when the suite runs in the background
    )


def read_until(proc: subprocess.Popen[str], prefix: str) -> str:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(prefix):
            return line
    raise AssertionError(
        f"no line starting with {prefix!r}; stderr: {proc.stderr.read() if proc.stderr else ''}"
    )


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory, synthetic_film_template, tiny_llava) -> Path:
    return analyzed_film(tmp_path_factory, synthetic_film_template, tiny_llava)[0]


@pytest.fixture
def cached(analyzed: Path, tmp_path: Path) -> Path:
    return clone_film_dir(analyzed, tmp_path / "lib" / "Demo Film (2024)")


@pytest.fixture
def ready(analyzed: Path, tmp_path: Path) -> Path:
    return clone_film_dir(analyzed, tmp_path / "ready" / "Demo Film (2024)", keep_cache=False)


@pytest.fixture
def model_env(tiny_llava) -> dict[str, str]:
    return _env(CINECUT_MODEL=str(tiny_llava.model_path), CINECUT_MMPROJ=str(tiny_llava.mmproj_path))


def test_cache_hit_prints_the_exact_line_and_never_loads_the_model(cached: Path, tmp_path: Path) -> None:
    wd = WorkDir.for_film(cached)
    n = len(up.load_cache(cached, wd.path) or [])
    absent = tmp_path / "absent.gguf"
    p = cinecut("analyze", cached, "--model", absent, "--mmproj", absent, "--gpu-lock", tmp_path / "gpu.lock")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    hit = f"Cache hit: loaded {n} SceneDescriptions from {wd.cache_path} — LLaVA inference skipped"
    assert hit in lines
    assert "Loading model" not in p.stdout and p.stderr == ""
    assert lines[:3] == [
        "✓ proxy (already complete)",
        "✓ subtitles (already complete)",
        "✓ keyframes (already complete)",
    ]


def test_a_miss_runs_inference_with_progress_and_writes_json(ready: Path, model_env, tmp_path: Path) -> None:
    wd = WorkDir.for_film(ready)
    total = len(json.loads(wd.timestamps_path.read_text()))
    out = tmp_path / "descriptions.json"
    p = cinecut(
        "analyze",
        ready,
        "--gpu-lock",
        tmp_path / "gpu.lock",
        "--n-gpu-layers",
        "0",
        "--json",
        out,
        env=model_env,
    )
    assert p.returncode == 0, p.stderr
    assert f"inference: {total}/{total} frames" in p.stdout
    assert f"Saved {total} SceneDescriptions to {wd.cache_path}" in p.stdout
    data = json.loads(out.read_text())
    assert (data["cache_hit"], data["frames_computed"], data["cache"]) == (False, total, str(wd.cache_path))
    cache = up.load_cache(ready, wd.path)
    assert cache is not None
    assert [(item["record"]["timestamp_s"], item["description"]) for item in data["results"]] == [
        (r.timestamp_s, d.__dict__ if d else None) for r, d in cache
    ]
    # --json - on a cache hit: stdout is the JSON document alone, human output goes to stderr.
    p = cinecut("analyze", ready, "--gpu-lock", tmp_path / "gpu.lock", "--json", "-")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["cache_hit"] is True and "Cache hit: loaded" in p.stderr


def test_errors_exit_with_distinct_codes_and_clear_messages(
    synthetic_film_template, tiny_llava, ready: Path, tmp_path: Path
) -> None:
    lock = tmp_path / "gpu.lock"
    p = cinecut("analyze", tmp_path / "nope.mkv", "--gpu-lock", lock)
    assert (p.returncode, p.stderr.strip()) == (66, f"error: {tmp_path / 'nope.mkv'}: no such file")

    junk = tmp_path / "junk" / "notes.mkv"
    junk.parent.mkdir()
    junk.write_text("not a film\n")
    p = cinecut("analyze", junk, "--gpu-lock", lock)
    assert p.returncode == 65 and "not a media file ffmpeg can read" in p.stderr
    assert os.listdir(junk.parent) == ["notes.mkv"]  # no work dir beside a file that is not a film

    fresh = copy_film(synthetic_film_template, tmp_path / "fresh")
    no_tools = tmp_path / "empty-bin"
    no_tools.mkdir()
    p = cinecut("analyze", fresh, "--gpu-lock", lock, env=_env(PATH=str(no_tools)))
    assert p.returncode == 69 and "not found on PATH" in p.stderr and "apt install ffmpeg" in p.stderr

    p = cinecut("analyze", fresh, "--gpu-lock", lock)
    assert p.returncode == 78 and "--model and --mmproj" in p.stderr and "CINECUT_MODEL" in p.stderr
    assert not WorkDir.for_film(fresh).proxy_path.exists()  # refused before a long proxy encode

    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    p = cinecut("analyze", ready, "--gpu-lock", lock, "--model", broken, "--mmproj", tiny_llava.mmproj_path)
    assert p.returncode == 78 and str(broken) in p.stderr

    p = cinecut("analyze", fresh, "--gpu-lock", lock, "--subtitle", tmp_path / "absent.srt")
    assert p.returncode == 66 and "absent.srt: no such file" in p.stderr

    p = cinecut("analyze", fresh, "--max-keyframes", "0")
    assert p.returncode == 2 and "must be at least 1" in p.stderr


def test_a_held_work_dir_is_waited_for_or_refused_with_no_wait(cached: Path, tmp_path: Path) -> None:
    lock = work_dir_lock(WorkDir.for_film(cached), purpose="prewarm", announce=True)
    assert lock.try_acquire()
    try:
        p = cinecut("analyze", cached, "--gpu-lock", tmp_path / "gpu.lock", "--no-wait")
        assert p.returncode == 75 and "is locked by prewarm (pid" in p.stderr
        proc = popen("analyze", cached, "--gpu-lock", tmp_path / "gpu.lock")
        assert "locked by prewarm" in read_until(proc, "Waiting for the work dir")
        lock.release()
        out, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0, err
        assert "Cache hit: loaded" in out
    finally:
        lock.release()


@pytest.fixture
def dense(tmp_path_factory, synthetic_film_template, tiny_llava, tmp_path: Path) -> Path:
    src = ready_for_inference_film(tmp_path_factory, synthetic_film_template, tiny_llava)
    return clone_film_dir(src, tmp_path / "lib" / "Dense Film")


@pytest.fixture
def slow_env(model_env: dict[str, str]) -> dict[str, str]:
    """The tiny model describes a frame in milliseconds: each frame is held open 0.1 s (a fault point),
    so what a test does at the first progress line lands mid-inference however fast the machine."""
    return model_env | {"CINECUTD_FAULTS": "slow:prewarm.after_frame"}


def test_film_changed_during_analysis_exits_4(dense: Path, slow_env, tmp_path: Path) -> None:
    proc = popen("analyze", dense, "--gpu-lock", tmp_path / "gpu.lock", "--n-gpu-layers", "0", env=slow_env)
    read_until(proc, "inference: 1/")
    with open(dense, "ab") as f:
        f.write(b"\0" * 1024)
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 4, err
    assert "changed during analysis" in err and "results discarded" in err
    assert not WorkDir.for_film(dense).cache_path.exists()


def test_ctrl_c_keeps_described_frames_for_the_next_run(
    dense: Path, model_env, slow_env, tmp_path: Path
) -> None:
    """Ctrl-C mid-inference exits 130 with the frames so far kept, also when the KeyboardInterrupt lands
    in llama.cpp's log callback (ctypes drops an exception raised there): the stop request stands."""
    wd = WorkDir.for_film(dense)
    total = len(json.loads(wd.timestamps_path.read_text()))
    proc = popen("analyze", dense, "--gpu-lock", tmp_path / "gpu.lock", "--n-gpu-layers", "0", env=slow_env)
    read_until(proc, "inference: 1/")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 130 and "Interrupted" in err
    k = partial_count(dense)
    assert 1 <= k < total
    out = tmp_path / "r.json"
    p = cinecut(
        "analyze",
        dense,
        "--gpu-lock",
        tmp_path / "gpu.lock",
        "--n-gpu-layers",
        "0",
        "--json",
        out,
        env=model_env,
    )
    assert p.returncode == 0, p.stderr
    data = json.loads(out.read_text())
    assert (data["frames_resumed"], data["frames_computed"]) == (k, total - k)


def test_status_shows_stamps_stages_cache_and_partial(cached: Path, ready: Path, tmp_path: Path) -> None:
    p = cinecut("status", cached)
    assert p.returncode == 0, p.stderr
    n = len(up.load_cache(cached, WorkDir.for_film(cached).path) or [])
    assert "Stamps:     film matches" in p.stdout
    assert "Stages:     proxy, subtitles, keyframes" in p.stdout
    assert f"Cache:      valid, {n} SceneDescriptions" in p.stdout
    st = cached.stat()
    os.utime(cached, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    rep = json.loads(cinecut("status", cached, "--json").stdout)
    assert rep["cache"]["state"] == "stale" and rep["needs_revalidation"] is True
    assert rep["recorded_stamps"]["video_matches"] is False
    assert set(rep["checkpoint"]) >= up.UPSTREAM_CHECKPOINT_KEYS
    p = cinecut("status", ready)
    total = len(json.loads(WorkDir.for_film(ready).timestamps_path.read_text()))
    assert f"Partial:    0/{total} frames (resumable)" in p.stdout and "Cache:      missing" in p.stdout
    p = cinecut("status", tmp_path / "nothing.mkv")
    assert p.returncode == 66 and "no such file and no work dir" in p.stderr


def test_version() -> None:
    p = cinecut("--version")
    assert (p.returncode, p.stdout.strip()) == (0, f"cinecut {__version__}")
