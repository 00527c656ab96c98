"""What one analysis is asked to do, as one value: the same fields for every caller.

``cinecut analyze``, the pre-warm worker (``python -m cinecut.worker``) and a remote worker's job all build
an :class:`AnalyzeOptions` and hand it to :func:`cinecut.pipeline.analyze`; the CLI and the worker read it
from arguments of the same names with :meth:`AnalyzeOptions.from_args`, so a film is analysed alike
whoever asks. Callbacks and collaborators (progress, stop flag, engine factory, GPU share policy) are not
options: they stay arguments of ``analyze``.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

DEFAULT_VIBE: Final = ""
DEFAULT_N_CTX: Final = 4096
DEFAULT_MAX_TOKENS: Final = 256
DEFAULT_MAX_GAP_S: Final = 30.0
DEFAULT_MIN_SPACING_S: Final = 0.5
#: ``cinecut.inference.parallel.MAX_PARALLEL``, not imported: that module loads llama.cpp.
_MAX_PARALLEL: Final = 64
#: Paths where an empty string means "not given" (an unset environment default); a subtitle is always
#: what was given.
_OPTIONAL_PATHS: Final = ("model", "mmproj", "gpu_lock_path")


def _as_path(value: str | os.PathLike[str] | None) -> Path | None:
    """A path, or None for "not given" (an empty string is how an unset environment default arrives)."""
    return Path(value) if value else None


@dataclass(frozen=True, slots=True)
class AnalyzeOptions:
    """How to analyse a film. Paths given as strings become :class:`Path`; an empty one is "not given".

    ``subtitle``: None picks the best sidecar. ``model``/``mmproj`` are needed only on a cache miss.
    ``gpu_lock_path``: None is :func:`cinecut.pipeline.default_gpu_lock_path`. ``interactive=False`` is the
    pre-warm, which yields the GPU between frames. ``lock_wait``/``gpu_wait``: seconds to wait for the work
    dir / the GPU (None: forever, 0: fail at once). ``max_gap``, ``min_spacing`` and ``max_keyframes``
    shape a new keyframe plan. ``take_over`` resets a work dir holding a same-stem twin's results.
    """

    subtitle: Path | None = None
    model: Path | None = None
    mmproj: Path | None = None
    n_gpu_layers: int = -1
    n_ctx: int = DEFAULT_N_CTX
    max_tokens: int = DEFAULT_MAX_TOKENS
    parallel: int = 1
    vibe: str = DEFAULT_VIBE
    gpu_lock_path: Path | None = None
    interactive: bool = True
    lock_wait: float | None = None
    gpu_wait: float | None = None
    max_gap: float = DEFAULT_MAX_GAP_S
    min_spacing: float = DEFAULT_MIN_SPACING_S
    max_keyframes: int | None = None
    take_over: bool = False

    def __post_init__(self) -> None:
        for name in _OPTIONAL_PATHS:
            object.__setattr__(self, name, _as_path(getattr(self, name)))
        if self.subtitle is not None:
            object.__setattr__(self, "subtitle", Path(self.subtitle))
        if self.max_keyframes is not None and self.max_keyframes < 1:
            raise ValueError("max_keyframes must be at least 1")
        if not 0 <= self.parallel <= _MAX_PARALLEL:
            raise ValueError(f"parallel must be 0 (chosen from the free memory) to {_MAX_PARALLEL}")

    @classmethod
    def from_args(cls, args: argparse.Namespace, **mode: Any) -> AnalyzeOptions:
        """The options named alike by ``cinecut analyze`` and the worker's command line (``--model``,
        ``--n-ctx``, ``--gpu-lock``, ``--max-gap``, ...); ``mode`` adds what only one of them decides
        (``interactive``, ``lock_wait``, ``gpu_wait``, ``take_over``)."""
        return cls(
            subtitle=args.subtitle,
            model=args.model,
            mmproj=args.mmproj,
            n_gpu_layers=args.n_gpu_layers,
            n_ctx=args.n_ctx,
            max_tokens=args.max_tokens,
            parallel=args.parallel,
            vibe=args.vibe,
            gpu_lock_path=args.gpu_lock,
            max_gap=args.max_gap,
            max_keyframes=args.max_keyframes,
            **mode,
        )

    @property
    def purpose(self) -> str:
        """How a run names itself to whoever finds its locks held."""
        return "cinecut analyze" if self.interactive else "prewarm"

    @property
    def engine_kwargs(self) -> dict[str, int]:
        """What the engine factory is built with (``parallel`` only when it is not the sequential 1)."""
        kwargs = {"n_ctx": self.n_ctx, "n_gpu_layers": self.n_gpu_layers, "max_tokens": self.max_tokens}
        return kwargs | ({"parallel": self.parallel} if self.parallel != 1 else {})

    @property
    def keep_model_on_yield(self) -> bool:
        """A model on the CPU holds no GPU memory, so yielding the GPU need not unload it."""
        return self.n_gpu_layers == 0
