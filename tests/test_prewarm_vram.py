"""Where a pre-warm runs (GPU, CPU, or wait for VRAM), the real NVML lookup, the real llama.cpp build
probe, and the "still open for writing" check on real files and real processes."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from cinecutd.prewarm.probe import OffloadProbe
from cinecutd.prewarm.vram import MIB, Gpu, GpuInfo, _visible_filter, decide, query_gpus, required_vram
from cinecutd.prewarm.writers import open_for_writing

GIB = 1 << 30
ONE_GPU = GpuInfo((Gpu(0, "RTX 4090", free=10 * GIB, total=24 * GIB),))


def test_cpu_only_config_runs_on_the_cpu_without_looking_at_gpus() -> None:
    d = decide(n_gpu_layers=0, gpu=ONE_GPU, offload_supported=False, required=100 * GIB)
    assert (d.run, d.device, d.note) == (True, "cpu", None)


def test_enough_free_vram_runs_on_the_gpu() -> None:
    d = decide(n_gpu_layers=-1, gpu=ONE_GPU, offload_supported=True, required=10 * GIB)
    assert (d.run, d.state, d.device) == (True, "running", "gpu")
    assert d.details == {"required_mb": 10240, "free_mb": 10240}


def test_not_enough_free_vram_waits_and_says_how_much() -> None:
    d = decide(n_gpu_layers=-1, gpu=ONE_GPU, offload_supported=True, required=10 * GIB + MIB)
    assert (d.run, d.state) == (False, "waiting-vram")
    assert d.note == "waiting for VRAM: needs 10,241 MiB free, 10,240 MiB free now"


def test_free_vram_is_summed_over_gpus_because_llama_cpp_splits_layers() -> None:
    two = GpuInfo((Gpu(0, "A", 6 * GIB, 8 * GIB), Gpu(1, "B", 6 * GIB, 8 * GIB)))
    assert decide(n_gpu_layers=-1, gpu=two, offload_supported=True, required=11 * GIB).run
    assert not decide(n_gpu_layers=-1, gpu=two, offload_supported=True, required=13 * GIB).run


def test_a_gpu_with_a_cpu_only_build_does_not_run_and_says_how_to_fix() -> None:
    d = decide(n_gpu_layers=-1, gpu=ONE_GPU, offload_supported=False, required=GIB)
    assert (d.run, d.state) == (False, "gpu-build-missing")
    assert "RTX 4090" in d.note and "GGML_CUDA" in d.note and "n_gpu_layers = 0" in d.note


def test_no_gpu_still_runs_on_the_cpu_with_a_note() -> None:
    d = decide(n_gpu_layers=-1, gpu=GpuInfo(error="NVML unavailable: NVML Shared Library Not Found"),
               offload_supported=None, required=20 * GIB)
    assert (d.run, d.device) == (True, "cpu")
    assert "NVML Shared Library Not Found" in d.note and "n_gpu_layers = 0" in d.note


def test_no_nvidia_gpu_but_another_gpu_backend_runs_unchecked() -> None:
    d = decide(n_gpu_layers=20, gpu=GpuInfo(error="no NVIDIA GPU visible"), offload_supported=True, required=GIB)
    assert (d.run, d.device) == (True, "gpu (VRAM not checked)")


def test_required_vram_is_the_files_times_1_2_unless_configured(tmp_path: Path) -> None:
    model, mmproj = tmp_path / "m.gguf", tmp_path / "p.gguf"
    model.write_bytes(b"\0" * 1000)
    mmproj.write_bytes(b"\0" * 500)
    assert required_vram(model, mmproj, 0) == 1800
    assert required_vram(model, mmproj, 6000) == 6000 * MIB
    assert required_vram(model, tmp_path / "missing.gguf", 0) == 1200


def test_query_gpus_never_raises_and_explains_an_absent_gpu() -> None:
    """Real pynvml: on a machine without an NVIDIA driver the answer is 'none, because ...'."""
    info = query_gpus()
    if info.present:  # a machine with a GPU: real numbers
        assert all(g.total >= g.free >= 0 and g.name for g in info.gpus)
    else:
        assert info.error
    assert not query_gpus(visible="").present  # CUDA_VISIBLE_DEVICES="" hides every GPU


def test_cuda_visible_devices_is_parsed_like_cuda_does() -> None:
    assert _visible_filter(None) == (None, [])
    assert _visible_filter("0,2") == ({0, 2}, [])
    assert _visible_filter("GPU-1234,1") == ({1}, ["GPU-1234"])
    assert _visible_filter("1,bogus,2") == ({1}, [])  # CUDA stops at the first invalid entry
    assert _visible_filter("") == (set(), [])


def test_the_offload_probe_asks_the_workers_interpreter() -> None:
    """Real llama_cpp in a child process; this build's answer must match the in-process one."""
    from cinecut.inference.engine import gpu_offload_supported

    probe = OffloadProbe(sys.executable)
    result = None
    deadline = time.monotonic() + 60
    while result is None and time.monotonic() < deadline:
        result = probe.poll()
        time.sleep(0.02)
    assert result is not None and result.error is None
    assert result.offload is gpu_offload_supported() and result.version


def test_the_offload_probe_reports_a_broken_interpreter(tmp_path: Path) -> None:
    probe = OffloadProbe(str(tmp_path / "no-python"))
    result = probe.poll()
    assert result is not None and result.offload is None and "cannot run" in result.error


def test_open_for_writing_sees_writers_in_this_and_other_processes(tmp_path: Path) -> None:
    film = tmp_path / "film.mkv"
    film.write_bytes(b"x" * 4096)
    assert open_for_writing(film) is False
    with open(film, "ab"):
        assert open_for_writing(film) is True
    assert open_for_writing(film) is False
    writer = subprocess.Popen(["sh", "-c", f'exec 3>>"{film}"; echo open; read _'], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "open"
        assert open_for_writing(film) is True
    finally:
        writer.communicate("\n", timeout=10)
    assert open_for_writing(film) is False
    reader = open(film, "rb")  # noqa: SIM115 - held open on purpose: readers do not count
    try:
        assert open_for_writing(film) is False
    finally:
        reader.close()
    assert open_for_writing(tmp_path / "missing.mkv") is None
