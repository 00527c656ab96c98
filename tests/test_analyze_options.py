"""AnalyzeOptions: ``cinecut analyze``, the pre-warm worker and a remote job ask for the same analysis alike."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from cinecut import cli, worker
from cinecut.analyze_options import AnalyzeOptions
from cinecut.remote.job import WorkerSettings
from cinecut.remote.pathmap import PathMap


def both(argv: list[str]) -> tuple[AnalyzeOptions, AnalyzeOptions]:
    """The options each program builds from the same arguments (the film given its own way)."""
    cli_args = cli.build_parser().parse_args(["analyze", "/films/Heat (1995)/Heat.mkv", *argv])
    worker_args = worker.build_parser().parse_args(["--film", "/films/Heat (1995)/Heat.mkv", *argv])
    return cli.analyze_options(cli_args), worker.analyze_options(worker_args)


def test_the_cli_and_the_worker_build_the_same_options_from_the_same_inputs(tmp_path: Path) -> None:
    given = [
        "--subtitle", str(tmp_path / "Heat.en.srt"), "--model", str(tmp_path / "m.gguf"),
        "--mmproj", str(tmp_path / "p.gguf"), "--n-gpu-layers", "12", "--n-ctx", "2048", "--max-tokens", "100",
        "--parallel", "4", "--gpu-lock", str(tmp_path / "gpu.lock"), "--vibe", "noir", "--max-gap", "12.5",
        "--max-keyframes", "7",
    ]  # fmt: skip
    from_cli, from_worker = both(given)
    assert from_cli.interactive and not from_worker.interactive  # the pre-warm yields the GPU; the CLI asks
    assert replace(from_cli, interactive=False) == from_worker
    assert from_worker == AnalyzeOptions(
        subtitle=tmp_path / "Heat.en.srt", model=tmp_path / "m.gguf", mmproj=tmp_path / "p.gguf",
        n_gpu_layers=12, n_ctx=2048, max_tokens=100, parallel=4, gpu_lock_path=tmp_path / "gpu.lock",
        vibe="noir", max_gap=12.5, max_keyframes=7, interactive=False,
    )  # fmt: skip
    assert from_worker.engine_kwargs == {"n_ctx": 2048, "n_gpu_layers": 12, "max_tokens": 100, "parallel": 4}


def test_the_defaults_are_the_same_too(tmp_path: Path) -> None:
    needed = ["--model", "m.gguf", "--mmproj", "p.gguf", "--gpu-lock", str(tmp_path / "gpu.lock")]
    from_cli, from_worker = both(needed)
    assert replace(from_cli, interactive=False) == from_worker
    assert from_worker.subtitle is None and from_worker.parallel == 1 and from_worker.max_keyframes is None
    assert "parallel" not in from_worker.engine_kwargs  # the sequential engine, as before parallel existed


def test_waiting_and_taking_over_are_the_cli_s_own(tmp_path: Path) -> None:
    args = cli.build_parser().parse_args(["analyze", "Heat.mkv", "--no-wait", "--take-over"])
    opts = cli.analyze_options(args)
    assert (opts.lock_wait, opts.gpu_wait, opts.take_over) == (0, cli.NO_WAIT_GPU_GRACE_S, True)
    assert opts.model is None and opts.mmproj is None  # an unset $CINECUT_MODEL is "no model", not ""
    waits = cli.analyze_options(cli.build_parser().parse_args(["analyze", "Heat.mkv"]))
    assert (waits.lock_wait, waits.gpu_wait, waits.take_over) == (None, None, False)  # wait as long as it takes


def test_a_remote_job_asks_what_the_local_worker_asks(tmp_path: Path) -> None:
    settings = WorkerSettings(
        paths=PathMap.parse([]), model=tmp_path / "m.gguf", mmproj=tmp_path / "p.gguf", gpu_lock=tmp_path / "gpu.lock",
        n_gpu_layers=0, n_ctx=2048, max_tokens=100, parallel=2, max_keyframes=9,
    )  # fmt: skip
    argv = ["--model", str(tmp_path / "m.gguf"), "--mmproj", str(tmp_path / "p.gguf"), "--n-gpu-layers", "0",
            "--n-ctx", "2048", "--max-tokens", "100", "--parallel", "2", "--gpu-lock", str(tmp_path / "gpu.lock"),
            "--max-keyframes", "9"]
    _, local = both([*argv, "--vibe", "action"])
    assert settings.analyze_options(None) == local  # no vibe in the job or the settings: upstream's default
    assert settings.analyze_options("noir") == replace(local, vibe="noir")
    assert settings.analyze_options(None).keep_model_on_yield  # a CPU model never leaves memory on a yield


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("parallel", 65, "parallel must be"), ("parallel", -1, "parallel must be"), ("max_keyframes", 0, "at least 1")],
)
def test_values_no_run_could_use_are_refused_when_the_options_are_made(field: str, value: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AnalyzeOptions(**{field: value})
    with pytest.raises(ValueError, match=message):
        replace(AnalyzeOptions(), **{field: value})  # analyze(film, options, **overrides) checks alike
