"""Sharing the GPU with the other programs of a media server: pause the pre-warm while they need it.

A Plex or Jellyfin transcode (NVENC/NVDEC), an Ollama model or a game may want the GPU during the
pre-warm window. The worker asks :class:`GpuShare` before its first frame and between frames whom it
should yield to; when the answer is someone, it stops after the current frame, releases the GPU lock
(and unloads the model once the pause has lasted ``unload_after_s``), and resumes once the GPU has been
free of other users for ``quiet_seconds``. Interactive ``cinecut analyze`` runs are handled by the GPU
lock itself (:class:`cinecut.locks.GpuLock`); this is the same pause, for programs that know nothing of it.

What counts as "another user" (``yield_to``):

* ``processes``: any process on the GPU other than ours (the names in ``ignore``, a desktop's display
  server, excepted);
* ``transcodes``: the video encoder or decoder busy at ``encoder_busy_percent`` or more;
* ``vram``: free VRAM, counting our model as loaded, below ``yield_vram_mb`` while another program
  holds GPU memory (our own model alone never triggers it, so unloading it cannot make us flap).

The GPU is read through one small interface, :class:`GpuProbe` (``snapshot() -> GpuSnapshot``): the real
one reads NVML (nvidia-ml-py), tests feed the policy a scripted sequence of snapshots. A probe that cannot
read the GPU (no NVML, no driver) reports an error, and an unreadable GPU is never a reason to pause:
the pre-warm would otherwise never run on a machine without NVML.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final, Protocol

YIELD_REASONS: Final = ("processes", "transcodes", "vram")
#: How often the GPU is looked at (between frames and while paused): NVML answers in about a millisecond,
#: a frame takes a second or more, so this costs nothing and a new user waits at most one frame.
CHECK_EVERY_S: Final = 1.0


@dataclass(frozen=True, slots=True)
class GpuProcess:
    """A process with a context on the GPU (compute or graphics)."""

    pid: int
    name: str
    used_mb: int | None = None  # None: the driver does not say (containers, some GPUs)


@dataclass(frozen=True, slots=True)
class GpuSnapshot:
    """What the GPU looks like now (the visible GPUs together)."""

    processes: tuple[GpuProcess, ...] = ()
    encoder_percent: int = 0
    decoder_percent: int = 0
    encoder_pids: tuple[int, ...] = ()  # processes with an NVENC session: the transcoder, by name
    free_mb: int | None = None
    error: str | None = None  # the GPU could not be read: nothing is known, nothing to yield to


class GpuProbe(Protocol):
    """Reads the GPU; the one seam between the policy and NVML."""

    def snapshot(self) -> GpuSnapshot: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ShareConfig:
    """``[prewarm] yield_to`` and its thresholds."""

    yield_to: frozenset[str] = frozenset(YIELD_REASONS)
    ignore: frozenset[str] = frozenset()
    yield_vram_mb: int = 1024
    encoder_busy_percent: int = 5
    quiet_seconds: float = 60.0
    unload_after_s: float = 120.0
    check_every_s: float = CHECK_EVERY_S


@dataclass(frozen=True, slots=True)
class Busy:
    """Someone the pre-warm yields to: why (a ``yield_to`` entry) and who, for ``yielding to <who>``."""

    reason: str
    who: str


def _describe(p: GpuProcess) -> str:
    return f"{p.name or 'a process'} (pid {p.pid})"


@dataclass
class GpuShare:
    """The policy: whom to yield to now, and whether the GPU has been free long enough to resume."""

    probe: GpuProbe
    config: ShareConfig = field(default_factory=ShareConfig)
    own_pids: frozenset[int] = field(default_factory=lambda: frozenset({os.getpid()}))
    clock: Callable[[], float] = time.monotonic
    last: Busy | None = None  # the latest blocker seen (shown while paused)
    _current: Busy | None = None
    _looked_at: float | None = None
    _busy_at: float | None = None  # when someone was last seen on the GPU
    _ours_peak_mb: int = 0

    @property
    def enabled(self) -> bool:
        return bool(self.config.yield_to)

    def judge(self, snap: GpuSnapshot) -> Busy | None:
        """Whom this snapshot says to yield to (None: nobody)."""
        cfg = self.config
        if snap.error is not None or not cfg.yield_to:
            return None
        ours = [p for p in snap.processes if p.pid in self.own_pids]
        others = [p for p in snap.processes
                  if p.pid not in self.own_pids and os.path.basename(p.name) not in cfg.ignore]
        ours_mb = sum(p.used_mb or 0 for p in ours)
        self._ours_peak_mb = max(self._ours_peak_mb, ours_mb)
        if "transcodes" in cfg.yield_to and max(snap.encoder_percent, snap.decoder_percent) >= cfg.encoder_busy_percent:
            by_pid = {p.pid: p for p in snap.processes}
            coders = [by_pid.get(pid, GpuProcess(pid, "")) for pid in snap.encoder_pids if pid not in self.own_pids]
            who = coders[0] if coders else (others[0] if others else None)
            return Busy("transcodes", f"a transcode by {_describe(who)}" if who else "a video transcode")
        if "vram" in cfg.yield_to and snap.free_mb is not None and others:
            # As if our model were loaded: after an unload the free memory is ours again, not theirs.
            free = snap.free_mb + ours_mb - self._ours_peak_mb
            if free < cfg.yield_vram_mb:
                holder = max(others, key=lambda p: p.used_mb or 0)
                return Busy("vram", f"{_describe(holder)}, {max(free, 0):,} MiB VRAM free")
        if "processes" in cfg.yield_to and others:
            return Busy("processes", _describe(others[0]))
        return None

    def busy(self) -> Busy | None:
        """Whom to yield to now; the GPU is read at most every ``check_every_s`` (the answer is kept)."""
        now = self.clock()
        if self._looked_at is not None and now - self._looked_at < self.config.check_every_s:
            return self._current
        self._looked_at = now
        self._current = self.judge(self.probe.snapshot())
        if self._current is not None:
            self._busy_at = now
            self.last = self._current
        return self._current

    def quiet(self) -> bool:
        """Nobody is on the GPU now, and nobody was for ``quiet_seconds`` (always, if nobody ever was)."""
        if self.busy() is not None:
            return False
        return self._busy_at is None or self.clock() - self._busy_at >= self.config.quiet_seconds

    def close(self) -> None:
        self.probe.close()


# ------------------------------------------------------------------------------------------ NVML


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class NvmlProbe:
    """The real probe: NVML through nvidia-ml-py (``pynvml``), on the GPUs ``CUDA_VISIBLE_DEVICES`` allows."""

    def __init__(self, visible: str | None = None) -> None:
        import pynvml  # ImportError: the caller falls back to UnavailableProbe

        self._nvml = pynvml
        pynvml.nvmlInit()
        items = [x.strip() for x in visible.split(",")] if visible is not None else None
        # Indices only; UUIDs (or anything else) and we watch every GPU rather than guess.
        allowed = {int(x) for x in items if x} if items is not None and all(x.isdigit() for x in items if x) else None
        self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())
                         if allowed is None or i in allowed]

    def _try(self, fn: Callable[[], object], default: object) -> object:
        try:
            return fn()
        except self._nvml.NVMLError:  # not supported on this GPU, or gone: one reading missing, not all
            return default

    def _name(self, pid: int) -> str:
        name = self._try(lambda: _text(self._nvml.nvmlSystemGetProcessName(pid)), "")
        if not name:
            try:
                with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
                    name = f.read().strip()
            except OSError:
                name = ""
        return os.path.basename(str(name))

    def snapshot(self) -> GpuSnapshot:
        nv = self._nvml
        procs: dict[int, GpuProcess] = {}
        enc = dec = 0
        encoder_pids: list[int] = []
        free = 0
        try:
            for h in self._handles:
                listed: Iterable[object] = [
                    *self._try(lambda h=h: nv.nvmlDeviceGetComputeRunningProcesses(h), []),  # type: ignore[misc]
                    *self._try(lambda h=h: nv.nvmlDeviceGetGraphicsRunningProcesses(h), []),  # type: ignore[misc]
                ]
                for p in listed:
                    pid = int(getattr(p, "pid", 0))
                    used = getattr(p, "usedGpuMemory", None)
                    mb = int(used) >> 20 if isinstance(used, int) else None
                    old = procs.get(pid)
                    if old is not None and old.used_mb is not None and mb is not None:
                        mb += old.used_mb
                    procs[pid] = GpuProcess(pid, self._name(pid), mb)
                enc = max(enc, int(self._try(lambda h=h: nv.nvmlDeviceGetEncoderUtilization(h)[0], 0)))  # type: ignore[arg-type]
                dec = max(dec, int(self._try(lambda h=h: nv.nvmlDeviceGetDecoderUtilization(h)[0], 0)))  # type: ignore[arg-type]
                sessions = self._try(lambda h=h: nv.nvmlDeviceGetEncoderSessions(h), [])
                encoder_pids += [int(s.pid) for s in sessions]  # type: ignore[attr-defined]
                free += int(nv.nvmlDeviceGetMemoryInfo(h).free) >> 20
        except nv.NVMLError as exc:
            return GpuSnapshot(error=f"NVML query failed: {exc}")
        return GpuSnapshot(tuple(procs.values()), enc, dec, tuple(encoder_pids), free)

    def close(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except self._nvml.NVMLError:
            pass


class UnavailableProbe:
    """No NVML here (not installed, no driver): the GPU cannot be read, so nothing is yielded to."""

    def __init__(self, why: str) -> None:
        self.why = why

    def snapshot(self) -> GpuSnapshot:
        return GpuSnapshot(error=self.why)

    def close(self) -> None:
        pass


def make_probe() -> GpuProbe:
    """The NVML probe where NVML works, else one that says why not (never raises)."""
    try:
        return NvmlProbe(os.environ.get("CUDA_VISIBLE_DEVICES"))
    except ImportError:
        return UnavailableProbe("nvidia-ml-py is not installed")
    except Exception as exc:  # NVMLError (no driver, no GPU), OSError: the library cannot be loaded
        return UnavailableProbe(f"NVML unavailable: {exc}")



def main() -> int:
    """``python -m cinecut.gpu_share``: what the real probe sees now and whom the default policy would yield
    to (run it on a machine with a GPU, e.g. during a Plex transcode)."""
    import dataclasses
    import json

    probe = make_probe()
    try:
        snap = probe.snapshot()
        busy = GpuShare(probe).judge(snap)
    finally:
        probe.close()
    print(json.dumps({"probe": type(probe).__name__, "snapshot": dataclasses.asdict(snap),
                      "yield_to": dataclasses.asdict(busy) if busy else None}, indent=2))
    return 0 if snap.error is None else 1


if __name__ == "__main__":
    raise SystemExit(main())

__all__ = [
    "YIELD_REASONS",
    "Busy",
    "GpuProbe",
    "GpuProcess",
    "GpuShare",
    "GpuSnapshot",
    "NvmlProbe",
    "ShareConfig",
    "UnavailableProbe",
    "make_probe",
]
