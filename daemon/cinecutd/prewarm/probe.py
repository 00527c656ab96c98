"""Can the worker's llama.cpp offload to a GPU? Asked of the worker's interpreter, in a child process.

The daemon never imports llama_cpp itself: a CUDA build would initialise the driver inside the daemon
(hundreds of MB, and a broken driver could crash it), and the worker may run another interpreter
(``prewarm.python``). The probe runs only when a GPU is present, once per configuration, and is polled
from the main loop like the worker, so the daemon never waits on it.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from dataclasses import dataclass
from typing import Final

PROBE_TIMEOUT_S: Final = 120.0

_CODE: Final = (
    "import json\n"
    "try:\n"
    "    import cinecut, llama_cpp\n"
    "    out = {'offload': bool(llama_cpp.llama_supports_gpu_offload()),\n"
    "           'version': getattr(llama_cpp, '__version__', '?')}\n"
    "except Exception as exc:\n"
    "    out = {'error': f'{type(exc).__name__}: {exc}'}\n"
    "print(json.dumps(out), flush=True)\n"
)


@dataclass(frozen=True, slots=True)
class ProbeResult:
    offload: bool | None  # None: the probe failed (see error)
    version: str | None = None
    error: str | None = None


class OffloadProbe:
    """``llama_supports_gpu_offload()`` in ``python``; ``poll()`` returns the result once it is known."""

    def __init__(self, python: str) -> None:
        self.python = python
        self._started = time.monotonic()
        self._result: ProbeResult | None = None
        try:
            self._proc: subprocess.Popen[bytes] | None = subprocess.Popen(
                [python, "-c", _CODE], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL, cwd="/", start_new_session=True, close_fds=True,
            )
        except OSError as exc:
            self._proc = None
            self._result = ProbeResult(None, error=f"cannot run {python}: {exc.strerror or exc}")

    def poll(self) -> ProbeResult | None:
        if self._result is not None or self._proc is None:
            return self._result
        rc = self._proc.poll()
        if rc is None:
            if time.monotonic() - self._started > PROBE_TIMEOUT_S:
                self.cancel()
                self._result = ProbeResult(None, error=f"importing llama_cpp took over {PROBE_TIMEOUT_S:g} s")
            return self._result
        assert self._proc.stdout is not None
        out = self._proc.stdout.read(65536)
        self._proc.stdout.close()
        try:
            data = json.loads(out.decode("utf-8", "replace").strip().splitlines()[-1])
        except (ValueError, IndexError):
            data = {"error": f"the probe exited with status {rc} and no answer"}
        if not isinstance(data, dict):
            data = {"error": "the probe's answer is not an object"}
        if "error" in data:
            self._result = ProbeResult(None, error=str(data["error"])[:500])
        else:
            self._result = ProbeResult(bool(data.get("offload")), str(data.get("version", "?")))
        return self._result

    def cancel(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, 9)
            self._proc.wait()
        if self._proc is not None and self._proc.stdout is not None:
            self._proc.stdout.close()
