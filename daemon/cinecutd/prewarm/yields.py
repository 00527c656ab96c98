"""How a pre-warm job's pauses read: which count as handing the GPU over, and what status says it waits for.

The worker decides when to yield (:mod:`cinecut.gpu_share` policy, between frames); the daemon only reports
it: a wait for a pipeline's work-dir lock is not a GPU yield, so it is neither counted in the metrics nor
described as one.
"""

from __future__ import annotations

from typing import Final

from cinecutd.prewarm.supervisor import WorkerProcess

#: Why a worker paused, as counted in the metrics (a wait for a pipeline's work-dir lock is not a GPU yield).
GPU_YIELD_REASONS: Final = frozenset({"interactive", "gpu_lock", "processes", "transcodes", "vram"})


def yield_reason(proc: WorkerProcess) -> str:
    """Why the worker last paused (an interactive run's request when it did not say)."""
    return proc.yield_reason or "interactive"


def counts_as_gpu_yield(reason: str) -> bool:
    return reason in GPU_YIELD_REASONS


def yield_note(proc: WorkerProcess, default: str) -> str:
    """What a paused job waits for, as status shows it: ``yielding to <process name>``."""
    if proc.yield_reason == "work_dir":
        return f"waiting for the work dir, held by {proc.yielded_to or 'a pipeline'}"
    if proc.yielded_to:
        return f"yielding to {proc.yielded_to}"
    return default
