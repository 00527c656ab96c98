"""Where the next pre-warm job runs: GPU, CPU, or not yet.

Three questions, asked before a worker is started for nothing: is the setup whole (model files, the
worker's interpreter), can that interpreter's llama.cpp offload to a GPU (asked once, by a polled child
process, so the engine thread never waits on an import), and is there VRAM for the model now.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Final

import structlog

from cinecutd.config import PrewarmConfig
from cinecutd.prewarm.probe import OffloadProbe
from cinecutd.prewarm.vram import Decision, GpuInfo, decide, required_vram

log = structlog.get_logger("cinecutd")

#: What status shows while the probe runs.
PROBING_NOTE: Final = "checking whether llama.cpp was built with GPU support"


class Placement:
    """The setup check, the one-time offload probe and the VRAM decision for the next job."""

    def __init__(self, pw: Callable[[], PrewarmConfig], gpu_query: Callable[[], GpuInfo]) -> None:
        self._pw = pw
        self._gpu_query = gpu_query
        self._offload: bool | None = None  # the probe's answer, once known
        self._probe: OffloadProbe | None = None

    def python(self) -> str:
        """The worker's interpreter (``prewarm.python``, else the daemon's own)."""
        pw = self._pw()
        return str(pw.python) if pw.python is not None else sys.executable

    def preflight(self) -> str | None:
        """Problems of the setup, found before a worker is started for nothing."""
        pw = self._pw()
        for name, path in (("model", pw.model), ("mmproj", pw.mmproj)):
            if path is None:
                return f"prewarm.{name} is not set"
            try:
                st = os.stat(path)
            except OSError as exc:
                return f"prewarm.{name} {path}: {exc.strerror or exc}"
            if not os.path.isfile(path) or st.st_size == 0:
                return f"prewarm.{name} {path}: not a model file"
        python = self.python()
        if not os.access(python, os.X_OK):
            return f"prewarm.python {python}: not an executable"
        return None

    def decide(self) -> Decision | None:
        """Where the next job runs (None while the llama.cpp build is being probed)."""
        pw = self._pw()
        if pw.n_gpu_layers == 0:
            return decide(n_gpu_layers=0, gpu=GpuInfo(), offload_supported=None, required=0)
        gpu = self._gpu_query()
        if gpu.present and self._offload is None:
            if self._probe is None:
                self._probe = OffloadProbe(self.python())
            result = self._probe.poll()
            if result is None:
                return None
            self._probe = None
            if result.offload is None:
                return Decision(False, "setup-error", "none",
                                f"the worker's interpreter {self.python()} cannot load llama.cpp: {result.error}")
            self._offload = result.offload
            log.info("prewarm_gpu_probe", offload=result.offload, llama_cpp=result.version)
        required = required_vram(pw.model, pw.mmproj, pw.min_free_vram_mb)
        return decide(n_gpu_layers=pw.n_gpu_layers, gpu=gpu, offload_supported=self._offload, required=required)

    def probe_again(self) -> None:
        """The answer may be out of date (a reinstall, another interpreter): ask again before the next job."""
        self._offload = None
        self.cancel()

    def cancel(self) -> None:
        """Stop a probe in flight (pre-warm disabled, daemon stopping)."""
        if self._probe is not None:
            self._probe.cancel()
            self._probe = None
