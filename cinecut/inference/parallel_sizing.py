"""How many frames the parallel engine keeps in flight, and the KV cache that takes.

Kept apart from the engine so the CLI and the configuration can reason about it without loading
llama.cpp, and so the one rule (as many KV caches as the free VRAM holds) lives in one place.
"""

from __future__ import annotations

import os
from typing import Final

#: The most frames one engine keeps in flight.
MAX_PARALLEL: Final = 64
#: ``parallel = 0`` picks the number of sequences: on a GPU from the free VRAM, at most this many...
MAX_AUTO_PARALLEL: Final = 8
#: ...and on the CPU this many (two cores, 0.5 B model: 8 and 16 in flight measured within noise of
#: each other, compute-bound; a 7B model's KV cache is ~0.5 GiB per sequence, in RAM there).
CPU_AUTO_PARALLEL: Final = 8
#: VRAM kept free beside the KV cache: CUDA context, compute buffers, CLIP activations.
VRAM_RESERVE: Final = 1 << 30


def choose_parallel(*, on_gpu: bool, free_vram: int | None, kv_per_sequence: int) -> tuple[int, str]:
    """How many frames to keep in flight when the configuration says 0 (auto), and why (for the log).

    On a GPU: as many KV caches as fit in the free VRAM left after the model is loaded, less a reserve,
    between 1 and MAX_AUTO_PARALLEL. Without a VRAM figure on a GPU: 2, a safe gain. On the CPU: a small
    fixed number, since RAM is rarely the limit there and two cores cap the gain.
    """
    if not on_gpu:
        return CPU_AUTO_PARALLEL, "CPU inference"
    if free_vram is None:
        return 2, "free VRAM unknown (nvidia-ml-py missing or no NVIDIA GPU)"
    fits = (free_vram - VRAM_RESERVE) // max(kv_per_sequence, 1)
    n = max(1, min(MAX_AUTO_PARALLEL, int(fits)))
    return (
        n,
        f"{free_vram / 2**20:,.0f} MiB VRAM free after loading, {kv_per_sequence / 2**20:,.0f} MiB KV per sequence",
    )


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
