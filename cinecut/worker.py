"""The pre-warm worker: one film's analysis in a child process the daemon supervises.

``python -m cinecut.worker --film PATH --model M --mmproj P ...`` runs :func:`cinecut.pipeline.analyze`
non-interactively (it yields the GPU to interactive runs) and reports on stdout in JSON lines, one
object per line, flushed at once::

    {"event": "started", "film": ..., "pid": ...}
    {"event": "stage", "stage": "proxy" | "subtitles" | "keyframes" | "inference"}
    {"event": "cache_hit"}
    {"event": "salvaged", "salvaged": n, "total": m}            n of the plan's m frames kept from before a
                                                                subtitle change (not described again)
    {"event": "progress", "done": n, "total": m, "fps": x, "computed": k}
                                                                at most every 0.5 s, and at the end; k: frames
                                                                the model described in this run
    {"event": "yielded", "reason": r, "to": who} / {"event": "resumed"}
                                                                the GPU went to someone and back (or was
                                                                busy before the first frame); r: interactive,
                                                                gpu_lock, processes, transcodes, vram or
                                                                work_dir; who: "Plex Transcoder (pid 42)"
    {"event": "done", "cache": path, "records": n, "frames_computed": k, "frames_salvaged": s}
    {"event": "error", "reason": "..."}

Nothing else reaches stdout: the real stdout is kept for these lines and file descriptor 1 is pointed
at stderr, so a stray print (ours, a library's, native code's) cannot corrupt the stream.

SIGTERM or SIGINT means "stop after the current frame": the partial results are synced and the worker
exits 3. During ingestion (ffmpeg stages) it stops at once, killing its ffmpeg child.

Exit codes: 0 done, 1 failure (reason in the error event), 2 the film changed during analysis
(results discarded), 3 stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any, Final, TextIO

from cinecut.analyze_options import AnalyzeOptions
from cinecut.gpu_share import YIELD_REASONS, GpuShare, ShareConfig, make_probe
from cinecut.ingest import IngestError
from cinecut.pipeline import (
    DEFAULT_MAX_GAP_S,
    DEFAULT_MAX_TOKENS,
    DEFAULT_N_CTX,
    DEFAULT_VIBE,
    AnalysisStopped,
    FilmChangedError,
    PipelineError,
    analyze,
)
from cinecut.progress import EventKind, ProgressEvent, Throttle

EXIT_DONE: Final = 0
EXIT_FAILED: Final = 1
EXIT_FILM_CHANGED: Final = 2
EXIT_STOPPED: Final = 3
PROGRESS_INTERVAL_S: Final = 0.5
_INGEST_STAGES: Final = frozenset({"proxy", "subtitles", "keyframes"})

log = logging.getLogger("cinecut.worker")


class _StopNow(BaseException):
    """Raised by the signal handler during ingestion, where no frame boundary is near."""


class EventStream:
    """JSON lines on a private duplicate of the original stdout; fd 1 then points at stderr."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    @classmethod
    def take_stdout(cls) -> EventStream:
        sys.stdout.flush()
        private = os.dup(1)
        os.set_inheritable(private, False)
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        return cls(os.fdopen(private, "w", encoding="utf-8", buffering=1))

    def emit(self, event: str, **fields: Any) -> None:
        line = json.dumps({"event": event, **fields}, ensure_ascii=False)
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()


class _Reporter:
    """Turns pipeline progress events into the worker's JSON lines (throttling frame progress)."""

    def __init__(self, out: EventStream) -> None:
        self.out = out
        self.throttle = Throttle(PROGRESS_INTERVAL_S)
        self.stage: str | None = None
        self.last: ProgressEvent | None = None
        self.last_sent: ProgressEvent | None = None

    def __call__(self, ev: ProgressEvent) -> None:
        if ev.kind is EventKind.STAGE and ev.stage:
            self.stage = ev.stage
            self.out.emit("stage", stage=ev.stage)
        elif ev.kind is EventKind.CACHE_HIT:
            self.out.emit("cache_hit")
        elif ev.kind is EventKind.SALVAGED:
            log.info("%s", ev.message)
            self.out.emit("salvaged", salvaged=ev.done, total=ev.total)
        elif ev.kind is EventKind.FRAME:
            self.last = ev
            if self.throttle.ready() or ev.done == ev.total:
                self.send_progress(ev)
        elif ev.kind is EventKind.YIELDED:
            self.flush_progress()
            if ev.message:
                log.info("yielding the GPU to %s (%s)", ev.message, ev.reason)
            self.out.emit("yielded", reason=ev.reason or "interactive", to=ev.message or None)
        elif ev.kind is EventKind.WAITING_GPU:
            # Another run has the GPU before our first frame: to the daemon that is the same state.
            log.info("waiting for the GPU, held by %s", ev.message)
            self.out.emit("yielded", reason=ev.reason or "gpu_lock", to=ev.message or None)
        elif ev.kind is EventKind.RESUMED:
            self.out.emit("resumed")
        elif ev.kind is EventKind.WAITING_LOCK:
            # A pipeline holds the work dir: waiting, not hung (the daemon's hang timer must not fire).
            log.info("waiting for the work dir, held by %s", ev.message)
            self.out.emit("yielded", reason="work_dir", to=ev.message or None)
        elif ev.kind in (EventKind.WARNING, EventKind.INVALIDATED):
            log.info("%s: %s", ev.kind.value, ev.message)

    def send_progress(self, ev: ProgressEvent) -> None:
        self.last_sent = ev
        self.out.emit("progress", done=ev.done, total=ev.total, fps=round(ev.fps, 3), computed=ev.computed)

    def flush_progress(self) -> None:
        """The latest progress, if the throttle held it back (before yielding, stopping, exiting)."""
        if self.last is not None and self.last is not self.last_sent:
            self.send_progress(self.last)

    @property
    def ingesting(self) -> bool:
        return self.stage is None or self.stage in _INGEST_STAGES


class _Parser(argparse.ArgumentParser):
    """Usage errors become an error event and exit 1: exit 2 means "film changed" here, not "usage"."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        print(json.dumps({"event": "error", "reason": f"usage: {message}"}), flush=True)
        self.exit(EXIT_FAILED)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m cinecut.worker", description="CineCut pre-warm worker.")
    p.add_argument("--film", required=True, type=Path)
    p.add_argument("--subtitle", type=Path, default=None)
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--mmproj", required=True, type=Path)
    p.add_argument("--n-gpu-layers", type=int, default=-1)
    p.add_argument("--n-ctx", type=int, default=DEFAULT_N_CTX)
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    p.add_argument("--parallel", type=int, default=1, help="frames in flight (0: chosen from free VRAM)")
    p.add_argument("--gpu-lock", type=Path, required=True)
    p.add_argument("--vibe", default=DEFAULT_VIBE)
    p.add_argument("--max-gap", type=float, default=DEFAULT_MAX_GAP_S, help="keyframe plan: longest gap (s)")
    p.add_argument("--max-keyframes", type=int, default=None, help="keyframe plan: at most this many frames")
    # Other programs on the GPU (cinecut.gpu_share): whom to yield to, and the thresholds.
    p.add_argument("--yield-to", default="", help="comma-separated: processes, transcodes, vram ('' = never)")
    p.add_argument("--yield-ignore", action="append", default=[], help="a process name that never counts")
    p.add_argument("--yield-vram-mb", type=int, default=1024)
    p.add_argument("--encoder-busy-percent", type=int, default=5)
    p.add_argument("--quiet-seconds", type=float, default=60.0)
    p.add_argument("--unload-after", type=float, default=120.0)
    return p


def analyze_options(args: argparse.Namespace) -> AnalyzeOptions:
    """What a pre-warm asks for: the options ``cinecut analyze`` reads from the same arguments, run
    non-interactively (it yields the GPU between frames) and waiting as long as the locks are held."""
    return AnalyzeOptions.from_args(args, interactive=False)


def gpu_share_from_args(args: argparse.Namespace) -> GpuShare | None:
    """The sharing policy the daemon configured, on the real NVML probe (None: yield to nobody, or no GPU
    is used at all)."""
    reasons = frozenset(r for r in args.yield_to.split(",") if r in YIELD_REASONS)
    if not reasons or args.n_gpu_layers == 0:
        return None
    probe = make_probe()
    why = getattr(probe, "why", None)
    if why:
        log.info("GPU sharing off: %s", why)
    return GpuShare(probe, ShareConfig(reasons, frozenset(args.yield_ignore), args.yield_vram_mb,
                                       args.encoder_busy_percent, args.quiet_seconds, args.unload_after))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = EventStream.take_stdout()
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("cinecut.inference.llama").setLevel(logging.WARNING)
    reporter = _Reporter(out)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: stopping after the current frame", signum)
        stop.set()
        if reporter.ingesting:
            raise _StopNow

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    out.emit("started", film=str(args.film.absolute()), pid=os.getpid())
    share = gpu_share_from_args(args)
    try:
        result = analyze(
            args.film, analyze_options(args), progress=reporter, should_stop=stop.is_set, gpu_share=share
        )
    except (AnalysisStopped, _StopNow):
        reporter.flush_progress()
        log.info("stopped; progress kept in the partial results")
        return EXIT_STOPPED
    except FilmChangedError as exc:
        out.emit("error", reason=str(exc))
        return EXIT_FILM_CHANGED
    except (PipelineError, IngestError, OSError, ValueError) as exc:
        out.emit("error", reason=str(exc))
        return EXIT_FAILED
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        out.emit("error", reason=f"{type(exc).__name__}: {exc}")
        return EXIT_FAILED
    finally:
        if share is not None:
            share.close()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    reporter.flush_progress()
    out.emit(
        "done",
        cache=str(result.cache_path),
        records=result.records,
        frames_computed=result.frames_computed,
        frames_salvaged=result.frames_salvaged,
    )
    return EXIT_DONE


if __name__ == "__main__":
    raise SystemExit(main())
