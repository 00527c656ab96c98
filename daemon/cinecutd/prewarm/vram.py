"""Where a pre-warm job may run: enough free VRAM, a GPU-capable llama.cpp build, or the CPU.

The NVML query (nvidia-ml-py) is separate from the decision, which takes plain numbers so every branch
can be tested on a machine without a GPU. Choices, in order:

* ``n_gpu_layers = 0``: the CPU, nothing is queried.
* no NVIDIA GPU visible (NVML missing, no driver, no device, ``CUDA_VISIBLE_DEVICES`` empty): the job
  still runs, on the CPU, with a note in status. CI machines and small servers have no GPU, and llama.cpp
  itself falls back to the CPU; refusing to run would leave the feature dead there.
* a GPU is present but llama.cpp was built without GPU offload: the job does NOT run
  (``gpu-build-missing``). The user has a GPU and asked for it; a 7B model on the CPU is ~50x slower and
  would quietly load the server every night. Status says how to fix it, or to set ``n_gpu_layers = 0``.
* a GPU and a GPU build: the job starts only when the free VRAM (summed over the visible GPUs, since
  llama.cpp splits layers across them) covers the estimate; otherwise ``waiting-vram`` and a retry later.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

MIB: Final = 1 << 20
#: Weights plus KV cache, CLIP activations and CUDA context: the files' size is not the whole footprint.
VRAM_HEADROOM: Final = 1.2


@dataclass(frozen=True, slots=True)
class Gpu:
    index: int
    name: str
    free: int
    total: int


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """What NVML reports: the visible NVIDIA GPUs, or why none could be seen."""

    gpus: tuple[Gpu, ...] = ()
    error: str | None = None

    @property
    def present(self) -> bool:
        return bool(self.gpus)

    @property
    def free(self) -> int:
        return sum(g.free for g in self.gpus)

    def to_dict(self) -> dict[str, object]:
        return {
            "gpus": [{"index": g.index, "name": g.name, "free_mb": g.free // MIB, "total_mb": g.total // MIB}
                     for g in self.gpus],
            "error": self.error,
        }


@dataclass(frozen=True, slots=True)
class Decision:
    """Run now (on ``device``) or wait in ``state``; ``note`` is the line status shows."""

    run: bool
    state: str  # "running" when run, else "waiting-vram" | "gpu-build-missing"
    device: str  # "cpu" | "gpu" | "gpu (VRAM not checked)"
    note: str | None = None
    details: dict[str, object] = field(default_factory=dict)


GPU_BUILD_HINT: Final = (
    "reinstall it with GPU support (CMAKE_ARGS=\"-DGGML_CUDA=on\" pip install --force-reinstall "
    "--no-cache-dir llama-cpp-python) or set prewarm.n_gpu_layers = 0 to run on the CPU"
)


def required_vram(model: Path | None, mmproj: Path | None, min_free_vram_mb: int) -> int:
    """Bytes of free VRAM a job needs: the configured minimum, else the model files' size x 1.2."""
    if min_free_vram_mb > 0:
        return min_free_vram_mb * MIB
    total = 0
    for path in (model, mmproj):
        if path is None:
            continue
        try:
            total += os.stat(path).st_size
        except OSError:
            pass  # a missing file is reported by the pre-flight check, not here
    return int(total * VRAM_HEADROOM)


def decide(*, n_gpu_layers: int, gpu: GpuInfo, offload_supported: bool | None, required: int) -> Decision:
    """The placement decision from numbers alone (see the module docstring for the why of each branch).

    ``offload_supported`` is None when it was not probed (it only matters when a GPU is present).
    """
    if n_gpu_layers == 0:
        return Decision(True, "running", "cpu")
    if not gpu.present:
        why = gpu.error or "no NVIDIA GPU found"
        if offload_supported:
            return Decision(True, "running", "gpu (VRAM not checked)",
                            f"NVML sees no GPU ({why}); llama.cpp's own GPU backend decides where layers go")
        return Decision(True, "running", "cpu",
                        f"no NVIDIA GPU ({why}): inference runs on the CPU; set prewarm.n_gpu_layers = 0 "
                        "to make that the configured choice")
    if offload_supported is False:
        names = ", ".join(g.name for g in gpu.gpus)
        return Decision(False, "gpu-build-missing", "none",
                        f"a GPU is present ({names}) but llama-cpp-python was built without GPU offload; "
                        + GPU_BUILD_HINT)
    free = gpu.free
    details: dict[str, object] = {"required_mb": required // MIB, "free_mb": free // MIB}
    if free < required:
        return Decision(False, "waiting-vram", "gpu",
                        f"waiting for VRAM: needs {required // MIB:,} MiB free, {free // MIB:,} MiB free now",
                        details)
    return Decision(True, "running", "gpu", None, details)


def _visible_filter(env: str | None) -> tuple[set[int] | None, list[str]]:
    """Indices and UUID prefixes that CUDA_VISIBLE_DEVICES allows (None: all devices)."""
    if env is None:
        return None, []
    indices: set[int] = set()
    uuids: list[str] = []
    for item in (s.strip() for s in env.split(",")):
        if not item:
            continue
        if item.isdigit():
            indices.add(int(item))
        elif item.startswith(("GPU-", "MIG-")):
            uuids.append(item)
        else:
            break  # CUDA stops at the first invalid entry
    return indices, uuids


def query_gpus(visible: str | None = None) -> GpuInfo:
    """Free and total memory of the NVIDIA GPUs this process may use; never raises.

    ``visible`` defaults to ``$CUDA_VISIBLE_DEVICES``, which llama.cpp honours too.
    """
    if visible is None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    indices, uuids = _visible_filter(visible)
    try:
        import pynvml
    except ImportError:
        return GpuInfo(error="nvidia-ml-py is not installed")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return GpuInfo(error=f"NVML unavailable: {exc}")
    except OSError as exc:
        return GpuInfo(error=f"NVML unavailable: {exc}")
    try:
        gpus: list[Gpu] = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            if indices is not None:
                uuid = _text(pynvml.nvmlDeviceGetUUID(handle)) if uuids else ""
                if i not in indices and not any(uuid.startswith(u) for u in uuids):
                    continue
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(Gpu(i, _text(pynvml.nvmlDeviceGetName(handle)), int(mem.free), int(mem.total)))
        if not gpus:
            return GpuInfo(error="no NVIDIA GPU visible" + (" (CUDA_VISIBLE_DEVICES)" if indices is not None else ""))
        return GpuInfo(tuple(gpus))
    except pynvml.NVMLError as exc:
        return GpuInfo(error=f"NVML query failed: {exc}")
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
