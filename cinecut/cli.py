"""The ``cinecut`` command: ``analyze`` runs stages 1 to 4 of a film, ``status`` shows its work dir.

Exit codes are distinct, so scripts and the daemon's users can react to each failure (see EXIT_CODES_HELP).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any, Final

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from cinecut import __version__
from cinecut.analyze_options import AnalyzeOptions
from cinecut.inference.parallel import MAX_PARALLEL
from cinecut.ingest import IngestError
from cinecut.pipeline import (
    DEFAULT_MAX_GAP_S,
    DEFAULT_MAX_TOKENS,
    DEFAULT_N_CTX,
    DEFAULT_VIBE,
    AnalysisResult,
    AnalysisStopped,
    PipelineError,
    analyze,
    default_gpu_lock_path,
)
from cinecut.progress import EventKind, ProgressEvent, Throttle, format_duration

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130
#: With --no-wait, how long the GPU may stay busy: a pre-warm hands it over after its current frame.
NO_WAIT_GPU_GRACE_S: Final = 30.0
_PLAIN_PROGRESS_INTERVAL_S: Final = 5.0

EXIT_CODES_HELP: Final = """exit codes:
  0    success
  1    unexpected failure
  2    usage error
  4    the film changed during analysis (results discarded; run again)
  65   unsupported file (not a film ffmpeg can read, or an unreadable subtitle)
  66   film or subtitle not found
  69   ffmpeg/ffprobe not installed
  73   the work dir cannot be created or is unsafe (symlinked)
  75   work dir or GPU held by another pipeline and --no-wait given
  77   the work dir holds the results of a same-stem twin (Heat.mkv beside Heat.mp4); --take-over resets it
  78   model missing or unloadable (needed on a cache miss only)
  130  interrupted (Ctrl-C or SIGTERM); described frames are kept and the next run resumes"""


def _console(stderr: bool = False) -> Console:
    # soft_wrap: paths are never broken across lines; highlight off: output is plain text, not markup.
    return Console(stderr=stderr, highlight=False, soft_wrap=True)


class _Display:
    """Renders pipeline progress: stage lines, and a progress bar on a terminal (plain lines otherwise)."""

    def __init__(self, out: Console, err: Console) -> None:
        self.out = out
        self.err = err
        self.started = time.monotonic()
        self.stage_started: dict[str, float] = {}
        self.bar: Progress | None = None
        self.task: Any = None
        self.plain = Throttle(_PLAIN_PROGRESS_INTERVAL_S)

    def line(self, text: str) -> None:
        self.out.print(text, markup=False)

    def __call__(self, ev: ProgressEvent) -> None:
        kind = ev.kind
        if kind is EventKind.STAGE and ev.stage:
            self.stage_started[ev.stage] = time.monotonic()
            if ev.stage != "inference":
                self.line(f"• {ev.stage} …")
        elif kind is EventKind.STAGE_DONE and ev.stage:
            self.close_bar()
            if ev.skipped:
                if ev.stage != "inference":
                    self.line(f"✓ {ev.stage} (already complete)")
            else:
                took = time.monotonic() - self.stage_started.get(ev.stage, self.started)
                self.line(f"✓ {ev.stage} ({took:.1f} s)")
        elif kind is EventKind.WARNING:
            self.err.print(f"warning: {ev.message}", markup=False, style="yellow")
        elif kind is EventKind.INVALIDATED:
            self.line(f"Inputs changed ({ev.message}): stale stages reset")
        elif kind is EventKind.WAITING_LOCK:
            self.line(f"Waiting for the work dir {ev.path}: locked by {ev.message} (Ctrl-C to give up)")
        elif kind is EventKind.WAITING_GPU:
            self.line(f"Waiting for the GPU: held by {ev.message}")
        elif kind is EventKind.MODEL_LOADING:
            self.line(f"Loading model {ev.path} …")
        elif kind is EventKind.CACHE_HIT:
            self.line(
                f"Cache hit: loaded {ev.done} SceneDescriptions from {ev.path} — LLaVA inference skipped"
            )
        elif kind is EventKind.SALVAGED:
            self.line(f"Subtitles changed, video unchanged: {ev.message}; describing the other {ev.total - ev.done}")
        elif kind is EventKind.FRAME:
            self.frame(ev)
        elif kind is EventKind.CACHE_SAVED:
            self.close_bar()
            self.line(f"Saved {ev.done} SceneDescriptions to {ev.path}")

    def frame(self, ev: ProgressEvent) -> None:
        eta = format_duration(ev.eta_s)
        if self.out.is_terminal:
            if self.bar is None:
                self.bar = Progress(
                    TextColumn("inference"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TextColumn("frames · {task.fields[fps]:.1f}/s · ETA {task.fields[eta]}"),
                    console=self.out,
                    transient=False,
                )
                self.bar.start()
                self.task = self.bar.add_task(
                    "inference", total=ev.total, completed=ev.done - 1, fps=0.0, eta="?"
                )
            self.bar.update(self.task, completed=ev.done, fps=ev.fps, eta=eta)
        elif self.plain.ready() or ev.done == ev.total:
            self.line(f"inference: {ev.done}/{ev.total} frames, {ev.fps:.1f} frames/s, ETA {eta}")

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def _write_json(dest: str, data: dict[str, Any]) -> None:
    """``--json OUT``: atomically (temp file beside it, then rename); ``-`` is stdout."""
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    if dest == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    target = Path(dest)
    fd, tmp = tempfile.mkstemp(dir=target.parent or Path("."), prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _log_to(err: Console) -> None:
    """Library warnings (a frame the model failed on, ...) go to stderr; the pipeline reports the rest."""
    from rich.logging import RichHandler

    handler = RichHandler(console=err, show_time=False, show_path=False, markup=False, rich_tracebacks=False)
    logging.basicConfig(level=logging.WARNING, handlers=[handler], format="%(message)s", force=True)
    logging.getLogger("cinecut.ingest.planning").setLevel(logging.ERROR)  # reported as warning events


#: Set by Ctrl-C or SIGTERM during ``cinecut analyze``; the pipeline's ``should_stop`` too.
_interrupted = threading.Event()


def _interrupt(_sig: int, _frame: FrameType | None) -> None:
    """Stop now: raise KeyboardInterrupt where the main thread is, and leave the request standing.

    Python raises it wherever the main thread happens to be, and that may be inside a ctypes callback
    (llama.cpp's log lines come back through one), where ctypes reports the exception and drops it. The
    standing request then stops the run after the frame in flight, its progress saved, like the raise.
    """
    _interrupted.set()
    raise KeyboardInterrupt


def _install_interrupts() -> None:
    _interrupted.clear()
    signal.signal(signal.SIGTERM, _interrupt)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # started with Ctrl-C ignored (nohup): keep it so
        signal.signal(signal.SIGINT, _interrupt)


def analyze_options(args: argparse.Namespace) -> AnalyzeOptions:
    """What ``cinecut analyze`` asks for: an interactive run (a pre-warm yields the GPU to it) that waits for
    the work dir and the GPU as long as it takes, or with ``--no-wait`` fails fast instead."""
    return AnalyzeOptions.from_args(
        args,
        interactive=True,
        lock_wait=0 if args.no_wait else None,
        gpu_wait=NO_WAIT_GPU_GRACE_S if args.no_wait else None,
        take_over=args.take_over,
    )


def cmd_analyze(args: argparse.Namespace) -> int:
    json_to_stdout = args.json == "-"
    out = _console(stderr=json_to_stdout)
    err = _console(stderr=True)
    if args.json and not json_to_stdout and not Path(args.json).parent.is_dir():
        err.print(f"error: --json {args.json}: no such directory", markup=False)
        return EXIT_USAGE
    display = _Display(out, err)
    _log_to(err)
    _install_interrupts()
    try:
        result: AnalysisResult = analyze(
            args.film, analyze_options(args), progress=display, should_stop=_interrupted.is_set
        )
    except (KeyboardInterrupt, AnalysisStopped):
        display.close_bar()
        err.print(
            "Interrupted: frames described so far are kept and the next run resumes from them.", markup=False
        )
        return EXIT_INTERRUPTED
    except (IngestError, PipelineError) as exc:
        display.close_bar()
        err.print(f"error: {exc}", markup=False)
        return exc.exit_code
    except ValueError as exc:  # bad plan options
        display.close_bar()
        err.print(f"error: {exc}", markup=False)
        return EXIT_USAGE
    except OSError as exc:
        display.close_bar()
        err.print(f"error: {exc}", markup=False)
        return EXIT_FAILURE
    display.close_bar()
    if args.json:
        try:
            _write_json(args.json, result.to_json())
        except OSError as exc:
            err.print(f"error: cannot write {args.json}: {exc.strerror or exc}", markup=False)
            return EXIT_FAILURE
    failed = sum(1 for _, desc in result.results if desc is None)
    note = f" ({failed} frames could not be described)" if failed else ""
    display.line(f"Done: {result.records} SceneDescriptions for {result.film.name}{note}")
    return EXIT_OK


# ------------------------------------------------------------------------------------------- status


def status_report(film: str | os.PathLike[str]) -> dict[str, Any]:
    """Everything known about a film's work dir, read without locking or writing anything."""
    from cinecut.checkpoint import read_checkpoint
    from cinecut.inference.cache import cache_state, read_cache_file
    from cinecut.inference.partial import read_partial
    from cinecut.locks import is_work_dir_locked, work_dir_lock
    from cinecut.pipeline import choose_subtitle
    from cinecut.revalidate import probe
    from cinecut.stamp import SourceStamp, film_path
    from cinecut.stamps import read_stamps
    from cinecut.workdir import WorkDir, subtitle_sidecars

    f = film_path(film)  # upstream's spelling (realpath)
    wd = WorkDir.for_film(f)
    stamp = SourceStamp.maybe(f)
    subs = subtitle_sidecars(os.path.abspath(film))  # beside the name given, as analyze pairs them
    report: dict[str, Any] = {
        "film": str(f),
        "film_present": stamp is not None,
        "film_stamp": stamp.to_dict() if stamp else None,
        "subtitles": [str(s) for s in subs],
        "subtitle_used": str(chosen) if (chosen := choose_subtitle(film)) else None,
        "work_dir": str(wd.path),
        "work_dir_exists": os.path.isdir(wd.path) and not os.path.islink(wd.path),
    }
    if not report["work_dir_exists"]:
        return report
    locked = is_work_dir_locked(wd)
    report["locked_by"] = work_dir_lock(wd, purpose="status").holder() if locked else None
    report["twin_owner"] = _twin_owner(wd)
    pr = probe(f, subs)
    report["needs_revalidation"] = pr.needs_revalidation
    recorded = read_stamps(wd.path)
    report["recorded_stamps"] = (
        {
            "video": recorded.video.to_dict() if recorded.video else None,
            "subtitles": {name: s.to_dict() for name, s in recorded.subtitles},
            "video_matches": recorded.video == stamp,
        }
        if recorded
        else None
    )
    ck = read_checkpoint(wd)
    report["checkpoint"] = {"status": ck.status.value, "reason": ck.reason}
    if ck.checkpoint is not None:
        report["checkpoint"].update(ck.checkpoint.to_dict())
    state, meta = cache_state(f, wd)
    cache: dict[str, Any] = {"path": str(wd.cache_path), "state": state.value}
    if meta is not None:
        cache["stamp"] = meta.stamp.to_dict()
        try:
            cache["records"] = len(read_cache_file(wd.cache_path)[1])
        except (OSError, ValueError) as exc:
            cache["state"], cache["reason"] = "corrupt", str(exc)
    report["cache"] = cache
    partial = read_partial(wd.partial_cache_path)
    report["partial"] = (
        {
            "path": str(wd.partial_cache_path),
            "done": partial.done,
            "total": partial.total,
            "resumable": partial.header.matches(stamp),
            "damage": partial.damage,
        }
        if partial
        else None
    )
    return report


def _twin_owner(wd: Any) -> str | None:
    """The same-stem twin whose results the work dir holds (None: this film's, or nobody's)."""
    from cinecut import safefs
    from cinecut.twins import twin_owner_at

    try:
        with safefs.work_dir_fd(wd.path) as fd:
            return twin_owner_at(fd, wd)
    except OSError:
        return None


def _render_status(rep: dict[str, Any], out: Console) -> None:
    def line(label: str, text: str) -> None:
        out.print(f"{label:<12}{text}", markup=False)

    stamp = rep["film_stamp"]
    line(
        "Film:",
        f"{rep['film']}" + (f" ({stamp['size']} bytes, mtime {stamp['mtime']})" if stamp else " (missing)"),
    )
    line(
        "Subtitles:", ", ".join(Path(s).name for s in rep["subtitles"]) or "none (keyframes without dialogue)"
    )
    line("Work dir:", rep["work_dir"] + ("" if rep["work_dir_exists"] else " (not created yet)"))
    if not rep["work_dir_exists"]:
        return
    if rep.get("twin_owner"):
        line("Owner:", f"{rep['twin_owner']} (a same-stem twin; `cinecut analyze --take-over` resets it for this film)")
    if rep["locked_by"] is not None:
        holder = rep["locked_by"] or {}
        line("Lock:", f"held by {holder.get('purpose', 'a pipeline')} (pid {holder.get('pid', '?')})")
    st = rep["recorded_stamps"]
    if st is None:
        line("Stamps:", "none recorded yet")
    else:
        line(
            "Stamps:",
            "film matches" if st["video_matches"] else "FILM CHANGED since its stages were computed",
        )
    line("Revalidate:", "needed" if rep["needs_revalidation"] else "not needed")
    ck = rep["checkpoint"]
    if ck["status"] != "ok":
        line("Checkpoint:", ck["status"] + (f" ({ck['reason']})" if ck.get("reason") else ""))
    else:
        stages = ", ".join(ck["stages_complete"]) or "none"
        inf = "complete" if ck.get("inference_complete") else "not done"
        if ck.get("inference_complete"):
            inf += " (cache hit)" if ck.get("cache_hit") else " (computed)"
        line("Stages:", stages)
        line("Inference:", inf)
    cache = rep["cache"]
    records = f", {cache['records']} SceneDescriptions" if "records" in cache else ""
    line("Cache:", f"{cache['state']}{records}")
    p = rep["partial"]
    if p is not None:
        line(
            "Partial:", f"{p['done']}/{p['total']} frames " + ("(resumable)" if p["resumable"] else "(stale)")
        )


def cmd_status(args: argparse.Namespace) -> int:
    rep = status_report(args.film)
    if args.json:
        print(json.dumps(rep, indent=2, ensure_ascii=False))
    else:
        _render_status(rep, _console())
    if not rep["film_present"] and not rep["work_dir_exists"]:
        _console(stderr=True).print(f"error: {rep['film']}: no such file and no work dir", markup=False)
        return 66
    return EXIT_OK


# ------------------------------------------------------------------------------------------- parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _parallel_count(text: str) -> int:
    value = int(text)
    if not 0 <= value <= MAX_PARALLEL:
        raise argparse.ArgumentTypeError(f"must be 0 (auto) to {MAX_PARALLEL}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cinecut",
        description="Analyse films for CineCut: proxy, subtitles, keyframes and cached LLaVA descriptions.",
    )
    parser.add_argument("--version", action="version", version=f"cinecut {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    an = sub.add_parser(
        "analyze",
        help="run stages 1 to 4 (skips LLaVA when the cache is valid)",
        description="Run CineCut's stages 1 to 4 for FILM. A valid SceneDescription cache is used as is "
        "(the model is not even loaded); otherwise every keyframe is described and the cache written.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    an.add_argument("film", help="the film to analyse")
    an.add_argument("--subtitle", help="subtitle file (default: the film's .srt/.ass sidecar, English first)")
    an.add_argument(
        "--model",
        default=os.environ.get("CINECUT_MODEL", ""),
        help="GGUF LLaVA text model (default: $CINECUT_MODEL); needed only on a cache miss",
    )
    an.add_argument(
        "--mmproj",
        default=os.environ.get("CINECUT_MMPROJ", ""),
        help="GGUF mmproj of the model (default: $CINECUT_MMPROJ)",
    )
    an.add_argument("--n-gpu-layers", type=int, default=-1, help="layers on the GPU: -1 all (default), 0 CPU")
    an.add_argument(
        "--n-ctx",
        type=int,
        default=DEFAULT_N_CTX,
        help="accepted for compatibility: each frame gets the context its prompt and --max-tokens need",
    )
    an.add_argument(
        "--max-tokens",
        type=_positive_int,
        default=DEFAULT_MAX_TOKENS,
        help=f"token budget per frame (default {DEFAULT_MAX_TOKENS})",
    )
    an.add_argument(
        "--parallel",
        type=_parallel_count,
        default=1,
        metavar="N",
        help="frames described at once in one batch (default 1, one at a time; 0: as many as the free "
        f"VRAM holds, at most {MAX_PARALLEL})",
    )
    an.add_argument(
        "--gpu-lock",
        type=Path,
        default=None,
        help="GPU lock file shared with the pre-warm daemon (default: /run/cinecut/gpu.lock, "
        "else $XDG_RUNTIME_DIR/cinecut/gpu.lock, else /tmp/cinecut-$UID/gpu.lock)",
    )
    an.add_argument("--vibe", default=DEFAULT_VIBE, help="vibe recorded in a new checkpoint")
    an.add_argument("--json", metavar="OUT", help="write the SceneDescriptions as JSON to OUT (- for stdout)")
    an.add_argument(
        "--no-wait",
        action="store_true",
        help="fail (exit 75) instead of waiting when another pipeline holds the work dir or GPU",
    )
    an.add_argument(
        "--max-gap",
        type=float,
        default=DEFAULT_MAX_GAP_S,
        help=f"longest stretch without a keyframe in a new plan, seconds (default {DEFAULT_MAX_GAP_S:g})",
    )
    an.add_argument(
        "--max-keyframes",
        type=_positive_int,
        default=None,
        help="cap a new keyframe plan at this many frames, spread evenly (default: no cap)",
    )
    an.add_argument(
        "--take-over",
        action="store_true",
        help="the work dir holds the results of a same-stem twin (Heat.mkv beside Heat.mp4, which share "
        "Heat_cinecut_work): discard them and analyse FILM there (without it: refuse, exit 77)",
    )
    an.set_defaults(func=cmd_analyze)

    st = sub.add_parser("status", help="show a film's work dir: stamps, stages, cache, partial results")
    st.add_argument("film")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(func=cmd_status)

    wk = sub.add_parser("worker", help="take pre-warm jobs from a coordinator's Redis queue (RQ) on this GPU")
    from cinecut.remote.worker import add_arguments

    add_arguments(wk)
    wk.set_defaults(func=cmd_worker)
    return parser


def cmd_worker(args: argparse.Namespace) -> int:
    """``cinecut worker``: see :mod:`cinecut.remote.worker` (rq and redis are imported only here)."""
    from cinecut.remote.worker import main as worker_main

    return worker_main(args=args)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "gpu_lock", None) is None and args.command == "analyze":
        args.gpu_lock = default_gpu_lock_path()
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
