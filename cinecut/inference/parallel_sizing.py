"""How many frames the parallel engine keeps in flight, and the KV cache that takes.

Kept apart from the engine so the CLI and the configuration can reason about it without loading
llama.cpp, and so the one rule (as many KV caches as the free VRAM holds) lives in one place.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

#: The most frames one engine keeps in flight.
MAX_PARALLEL: Final = 64
#: ``parallel = 0`` picks the number of sequences: on a GPU from the free VRAM, at most this many...
MAX_AUTO_PARALLEL: Final = 8
#: ...and on the CPU as many KV caches as a quarter of the available memory holds, at most this many
#: (two cores, 0.5 B model: 16 in flight 15 % faster than 8; a 7B model's KV cache is ~0.5 GiB per
#: sequence, in RAM there)...
CPU_MAX_AUTO_PARALLEL: Final = 16
#: ...or this many when the available memory cannot be read.
CPU_AUTO_PARALLEL: Final = 8
#: The share of the available memory the KV caches may take on the CPU (1/4): the model, the other
#: services of a media server and the page cache that streams its films keep the rest.
CPU_KV_SHARE: Final = 4
#: VRAM kept free beside the KV cache: CUDA context, compute buffers, CLIP activations.
VRAM_RESERVE: Final = 1 << 30


def choose_parallel(
    *, on_gpu: bool, free_vram: int | None, kv_per_sequence: int, available_ram: int | None = None
) -> tuple[int, str]:
    """How many frames to keep in flight when the configuration says 0 (auto), and why (for the log).

    On a GPU: as many KV caches as fit in the free VRAM left after the model is loaded, less a reserve,
    between 1 and MAX_AUTO_PARALLEL. Without a VRAM figure on a GPU: 2, a safe gain. On the CPU: as many
    as a quarter of the available memory holds, between 1 and CPU_MAX_AUTO_PARALLEL (CPU_AUTO_PARALLEL
    when the available memory is unknown).
    """
    kv = max(kv_per_sequence, 1)
    if not on_gpu:
        if available_ram is None:
            return CPU_AUTO_PARALLEL, "CPU inference, available memory unknown"
        n = max(1, min(CPU_MAX_AUTO_PARALLEL, int(available_ram // CPU_KV_SHARE // kv)))
        return (
            n,
            f"CPU inference: {available_ram / 2**20:,.0f} MiB of memory available, "
            f"{kv_per_sequence / 2**20:,.0f} MiB KV per sequence in a quarter of it",
        )
    if free_vram is None:
        return 2, "free VRAM unknown (nvidia-ml-py missing or no NVIDIA GPU)"
    fits = (free_vram - VRAM_RESERVE) // kv
    n = max(1, min(MAX_AUTO_PARALLEL, int(fits)))
    return (
        n,
        f"{free_vram / 2**20:,.0f} MiB VRAM free after loading, {kv_per_sequence / 2**20:,.0f} MiB KV per sequence",
    )


def available_ram_bytes(
    meminfo: Path = Path("/proc/meminfo"), cgroup_root: Path = Path("/sys/fs/cgroup")
) -> int | None:
    """Memory this process may still take without swapping: the kernel's MemAvailable, lowered to what
    its cgroup's ``memory.max`` leaves (a systemd ``MemoryMax=``); None when it cannot be read."""
    try:
        text = meminfo.read_text()
        avail = next(int(line.split()[1]) * 1024 for line in text.splitlines() if line.startswith("MemAvailable:"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    try:
        own = Path("/proc/self/cgroup").read_text().strip().splitlines()
        rel = next(line.split(":", 2)[2] for line in own if line.startswith("0::"))
        group = cgroup_root / rel.lstrip("/")
        limit = (group / "memory.max").read_text().strip()
        if limit != "max":
            avail = min(avail, max(0, int(limit) - int((group / "memory.current").read_text())))
    except (OSError, ValueError, IndexError, StopIteration):
        pass  # cgroup v1 or no limit readable: the machine's figure stands
    return avail


def free_vram_bytes() -> int | None:
    """Free memory summed over the visible NVIDIA GPUs (NVML), None when it cannot be known."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        allowed = {int(x) for x in visible.split(",") if x.strip().isdigit()} if visible is not None else None
        total = 0
        for i in range(pynvml.nvmlDeviceGetCount()):
            if allowed is not None and i not in allowed:
                continue
            total += int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).free)
        return total or None
    except Exception:
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def kv_cache_bytes(n_layer: int, n_embd_kv: int, cells: int, bytes_per_value: int = 2) -> int:
    """Bytes of an f16 K+V cache holding ``cells`` tokens for a model of these dimensions."""
    return 2 * n_layer * n_embd_kv * cells * bytes_per_value
