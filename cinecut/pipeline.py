"""Stages 1 to 4 of CineCut's analysis, with upstream's Stage 4 cache guard.

One implementation serves ``cinecut analyze`` (interactive) and the daemon's pre-warm worker
(non-interactive). The work dir it leaves is exactly what upstream expects: checkpoint stages ``proxy``,
``subtitles`` and ``keyframes`` complete with their fields, ``keyframe_timestamps.json``, ``keyframes/``,
and the SceneDescription cache with ``inference_complete``/``cache_hit`` set.

Order of a run, and why:

1. Take the work dir's lock (the daemon then defers its edits) and revalidate through
   :func:`cinecut.revalidate.revalidate`: a replaced film or changed subtitles reset the stale stages
   through the stage graph, so the checkpoint can be trusted afterwards. The film's stamp taken here,
   before any stage reads the film, is the stamp the cache is saved under.
2. Each stage the checkpoint marks complete (and whose files are present) is skipped; the others run
   and are recorded one by one, so an interrupted run resumes at the first unfinished stage.
3. Stage 4: a valid cache is a hit and the model is never loaded. On a miss the model is loaded once
   and every keyframe not already in the partial results (:mod:`cinecut.inference.partial`) is
   described. The film's stamp is checked after every frame and again after the last one: results of
   a film that changed meanwhile are discarded, never saved under a stamp they do not match.
4. The stamps sidecar is rewritten last, as the commit mark.

The GPU is shared through :class:`cinecut.locks.GpuLock`: an interactive run announces itself and
waits; a pre-warm checks between frames whether it must yield, and if so saves its progress, hands
the GPU over, waits, and resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import os
import stat
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

from cinecut import faults, safefs
from cinecut.checkpoint import (
    CHECKPOINT_KEYS,
    PipelineCheckpoint,
    ensure_work_dir,
    read_checkpoint_at,
    save_checkpoint_at,
)
from cinecut.gpu_share import Busy, GpuShare
from cinecut.inference.cache import CacheState, Result, cache_state, load_cache, save_cache
from cinecut.inference.models import SceneDescription
from cinecut.inference.partial import (
    PartialWriter,
    PlanEntry,
    SyncPolicy,
    open_partial,
    plan_of,
    read_partial_at,
    remove_partial_at,
)
from cinecut.inference.salvage import frame_key, read_salvage_at, remove_salvage_at
from cinecut.ingest import (
    DialogueEvent,
    MissingInputError,
    SubtitleError,
    extract_keyframes,
    make_proxy,
    parse_subtitles,
    plan_film,
    probe,
)
from cinecut.ingest.ffmpeg import require_file
from cinecut.locks import FileLock, GpuLock, LockBusy, work_dir_lock
from cinecut.models import KeyframeRecord
from cinecut.paths import same_film_path
from cinecut.progress import EventKind, ProgressCallback, ProgressEvent, RateMeter, ignore_progress
from cinecut.revalidate import Revalidation, revalidate
from cinecut.stages import STAGE_BY_NAME, InvalidationReport, downstream, invalidate_at
from cinecut.stamp import SourceStamp, film_path
from cinecut.stamps import InputStamps, current_stamps, write_stamps_at
from cinecut.twins import TwinConflict, twin_owner_at
from cinecut.workdir import (
    CKPT_TMP_SUFFIX,
    KEYFRAME_RE,
    KEYFRAMES_DIR_NAME,
    TIMESTAMPS_NAME,
    WorkDir,
    keyframe_name,
    subtitle_sidecars,
)

DEFAULT_VIBE: Final = ""
DEFAULT_N_CTX: Final = 4096
DEFAULT_MAX_TOKENS: Final = 256
DEFAULT_MAX_GAP_S: Final = 30.0
DEFAULT_MIN_SPACING_S: Final = 0.5
GPU_LOCK_NAME: Final = "gpu.lock"
SYSTEM_GPU_LOCK_DIR: Final = Path("/run/cinecut")
MAX_TIMESTAMPS_BYTES: Final = 16 << 20
_POLL_S: Final = 0.1
#: Worded as :func:`cinecut.ingest.plan_film` words it, so the two are one warning.
NO_SUBTITLES_WARNING: Final = "no subtitles: keyframes come from scene changes and intervals only"

# --------------------------------------------------------------------------------------------- errors


class PipelineError(Exception):
    """An analysis that cannot go on; ``exit_code`` is what the CLI exits with."""

    exit_code: int = 1


class ModelError(PipelineError):
    """No model given (on a cache miss), or the model pair cannot be loaded."""

    exit_code = 78  # EX_CONFIG


class FilmChangedError(PipelineError):
    """The film changed while it was analysed: the results were discarded."""

    exit_code = 4


class BusyError(PipelineError):
    """Another pipeline holds the work dir (or the GPU) and the caller chose not to wait."""

    exit_code = 75  # EX_TEMPFAIL


class WorkDirError(PipelineError):
    """The work dir cannot be created or used (permissions, a symlinked work dir)."""

    exit_code = 73  # EX_CANTCREAT


class TwinError(PipelineError):
    """The work dir holds the results of a same-stem twin that still exists (see :mod:`cinecut.twins`)."""

    exit_code = 77  # EX_NOPERM: not this film's to take without --take-over


class AnalysisStopped(PipelineError):
    """``should_stop`` asked to stop: progress is saved in the partial results."""

    exit_code = 3

    def __init__(self, message: str, done: int = 0, total: int = 0) -> None:
        super().__init__(message)
        self.done = done
        self.total = total


# ------------------------------------------------------------------------------------- GPU lock path


def default_gpu_lock_path(
    *,
    system_dir: Path = SYSTEM_GPU_LOCK_DIR,
    environ: dict[str, str] | None = None,
    tmp_root: Path = Path("/tmp"),
) -> Path:
    """Where the GPU lock lives when none is configured; the daemon and the CLI must agree on it.

    ``/run/cinecut/gpu.lock`` when that directory exists and is writable (the packaged service creates
    it for the ``cinecut`` group), else ``$XDG_RUNTIME_DIR/cinecut/gpu.lock``, else
    ``/tmp/cinecut-$UID/gpu.lock``.
    """
    system_lock = system_dir / GPU_LOCK_NAME
    if system_lock.is_file() or (system_dir.is_dir() and os.access(system_dir, os.W_OK | os.X_OK)):
        # A group member may lock the daemon's existing lock file without write access to the dir.
        return system_lock
    env = os.environ if environ is None else environ
    xdg = env.get("XDG_RUNTIME_DIR", "")
    if xdg and os.path.isabs(xdg) and os.path.isdir(xdg) and os.access(xdg, os.W_OK | os.X_OK):
        return Path(xdg) / "cinecut" / GPU_LOCK_NAME
    return tmp_root / f"cinecut-{os.getuid()}" / GPU_LOCK_NAME


def prepare_lock_dir(lock_path: Path) -> None:
    """Create the GPU lock's directory; refuse one another user controls inside a shared sticky dir.

    In ``/tmp`` anyone can create ``cinecut-$UID`` first; a lock there would let them block or fake
    our GPU lock, so such a directory must be a real directory owned by us.
    """
    d = lock_path.parent
    parent = d.parent
    try:
        pst = os.stat(parent)
    except OSError as exc:
        raise WorkDirError(f"GPU lock directory {parent}: {exc.strerror or exc}") from exc
    shared = bool(pst.st_mode & stat.S_ISVTX) and bool(pst.st_mode & stat.S_IWOTH)
    try:
        os.mkdir(d, 0o700 if shared else 0o755)
    except FileExistsError:
        pass
    except OSError as exc:
        raise WorkDirError(f"cannot create the GPU lock directory {d}: {exc.strerror or exc}") from exc
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode) or (shared and st.st_uid != os.getuid()):
        raise WorkDirError(
            f"GPU lock directory {d} is not a directory owned by uid {os.getuid()}; "
            "remove it or pass --gpu-lock"
        )


# ---------------------------------------------------------------------------------------- subtitles

_LANGUAGE_FREE_TAGS: Final = frozenset({"forced", "sdh", "hi", "cc", "default", "full"})
_ENGLISH: Final = frozenset({"en", "eng", "english", "en-us", "en-gb", "en_us", "en_gb"})
_EXT_RANK: Final = {".srt": 0, ".ass": 1, ".ssa": 2}


def _subtitle_rank(sub: Path, stem: str) -> tuple[int, int, int, int, str]:
    base, ext = os.path.splitext(sub.name)
    tags = [t.lower() for t in base[len(stem) :].split(".") if t]
    langs = [t for t in tags if t not in _LANGUAGE_FREE_TAGS]
    lang = 0 if not langs else 1 if any(t in _ENGLISH for t in langs) else 2
    forced = int("forced" in tags)  # forced subtitles hold only the foreign-language lines
    hearing = int(any(t in ("sdh", "hi", "cc") for t in tags))
    return (lang, forced, hearing, _EXT_RANK.get(ext.lower(), 3), sub.name)


def rank_subtitles(film: Path, sidecars: Sequence[Path]) -> list[Path]:
    """Sidecars, best first: untagged, then English, then others; full before forced; SRT before ASS."""
    stem = film.stem
    return sorted(sidecars, key=lambda s: _subtitle_rank(s, stem))


def choose_subtitle(film: str | os.PathLike[str]) -> Path | None:
    """The subtitle sidecar a run uses when none is given (``<stem>.srt``, ``<stem>.en.srt``, ...)."""
    f = Path(os.path.abspath(film))  # paired by the name given, as the daemon pairs them
    ranked = rank_subtitles(f, subtitle_sidecars(f))
    return ranked[0] if ranked else None


# ------------------------------------------------------------------------------------------- result


@dataclass(slots=True)
class AnalysisResult:
    """What a finished analysis produced and how."""

    film: Path
    work_dir: Path
    cache_path: Path
    results: list[Result]
    cache_hit: bool
    frames_computed: int = 0
    frames_resumed: int = 0
    frames_salvaged: int = 0  # frames of the plan whose description came from the salvage store
    subtitle: Path | None = None
    dialogue_event_count: int = 0
    stages_run: list[str] = field(default_factory=list)
    invalidated: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def records(self) -> int:
        return len(self.results)

    def to_json(self) -> dict[str, Any]:
        """The results in the cache's own item shape, plus how they were obtained."""
        return {
            "film": str(self.film),
            "work_dir": str(self.work_dir),
            "cache": str(self.cache_path),
            "cache_hit": self.cache_hit,
            "frames_computed": self.frames_computed,
            "frames_resumed": self.frames_resumed,
            "frames_salvaged": self.frames_salvaged,
            "subtitle": str(self.subtitle) if self.subtitle else None,
            "results": [
                {"record": rec.to_dict(), "description": desc.to_dict() if desc is not None else None}
                for rec, desc in self.results
            ],
        }


class Engine(Protocol):
    """What the pipeline needs of a loaded vision model (:class:`cinecut.inference.engine.LlavaEngine`)."""

    def describe(self, image_path: Path) -> SceneDescription | None: ...

    def close(self) -> None: ...


EngineFactory = Callable[..., Engine]


def _offloads_to_gpu() -> bool:
    """Whether a loaded model can hold GPU memory (a CPU-only llama.cpp build never does)."""
    from cinecut.inference.engine import gpu_offload_supported

    return gpu_offload_supported()


def _llava_factory(model: Path, mmproj: Path, *, parallel: int = 1, **kwargs: Any) -> Engine:
    if parallel != 1:
        from cinecut.inference.parallel import ParallelLlavaEngine

        return ParallelLlavaEngine(model, mmproj, parallel=parallel, **kwargs)
    from cinecut.inference.engine import LlavaEngine

    return LlavaEngine(model, mmproj, **kwargs)


def _prefetch(
    engine: Engine, records: Sequence[KeyframeRecord], salvaged: Mapping[int, SceneDescription]
) -> None:
    """Tell an engine that batches frames which ones it will be asked for next, in order (salvaged
    frames never reach it); a one-at-a-time engine has no use for it."""
    prefetch = getattr(engine, "prefetch", None)
    if prefetch is not None:
        prefetch([Path(r.frame_path) for r in records if frame_key(r.timestamp_s) not in salvaged])


# ---------------------------------------------------------------------------------------- the run


def analyze(
    film: str | os.PathLike[str],
    *,
    subtitle: str | os.PathLike[str] | None = None,
    model: str | os.PathLike[str] | None = None,
    mmproj: str | os.PathLike[str] | None = None,
    n_gpu_layers: int = -1,
    n_ctx: int = DEFAULT_N_CTX,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    parallel: int = 1,
    vibe: str = DEFAULT_VIBE,
    gpu_lock_path: str | os.PathLike[str] | None = None,
    interactive: bool = True,
    progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    lock_wait: float | None = None,
    gpu_wait: float | None = None,
    max_gap: float = DEFAULT_MAX_GAP_S,
    min_spacing: float = DEFAULT_MIN_SPACING_S,
    max_keyframes: int | None = None,
    engine_factory: EngineFactory | None = None,
    sync_policy: SyncPolicy | None = None,
    take_over: bool = False,
    gpu_share: GpuShare | None = None,
) -> AnalysisResult:
    """Run stages 1 to 4 for ``film`` and return its SceneDescriptions.

    ``subtitle`` defaults to the best sidecar (:func:`choose_subtitle`); without one, keyframes come
    from scene changes and intervals only (a warning event says so). ``model``/``mmproj`` are needed
    only on a cache miss. ``lock_wait``/``gpu_wait``: seconds to wait for the work dir / the GPU (None:
    forever, 0: fail at once with BusyError). ``interactive=False`` is the pre-warm: it yields the GPU
    to interactive runs between frames. ``should_stop`` is polled between stages and frames; when it
    returns True the run stops with AnalysisStopped after saving its progress. ``max_gap``,
    ``min_spacing`` and ``max_keyframes`` shape a new keyframe plan (see
    :func:`cinecut.ingest.plan_keyframes`). A work dir holding a same-stem twin's results raises
    TwinError unless ``take_over``, which resets it for this film. ``parallel`` frames are described at
    once in one batch (:mod:`cinecut.inference.parallel`; 0: as many as the free VRAM holds); results
    are still written, and resumable, in keyframe order. ``gpu_share`` (the pre-warm): other programs on the
    GPU it yields to as it yields to an interactive run (:mod:`cinecut.gpu_share`).

    The film is resolved with ``realpath``, as upstream resolves it: that spelling is what the checkpoint,
    cache and stamps record, and it places the work dir where upstream looks for it. Subtitle sidecars
    are paired by the name the film was given (beside a symlinked film, not beside its target).
    """
    if max_keyframes is not None and max_keyframes < 1:
        raise ValueError("max_keyframes must be at least 1")
    if not 0 <= parallel <= 64:
        raise ValueError("parallel must be 0 (chosen from the free memory) to 64")
    named = Path(os.path.abspath(film))
    f = film_path(film)
    require_file(f)
    sub: Path | None = None
    explicit = subtitle is not None
    if subtitle is not None:
        sub = film_path(subtitle)
        require_file(sub)
    wd = WorkDir.for_film(f)
    if not os.path.lexists(wd.path):
        # A first run: say "not a film" (or "no ffmpeg") before a work dir is created beside it.
        probe(f)
    run = _Run(
        film=f,
        named=named,
        take_over=take_over,
        wd=wd,
        subtitle=sub,
        explicit_subtitle=explicit,
        model=Path(model) if model else None,
        mmproj=Path(mmproj) if mmproj else None,
        engine_kwargs={"n_ctx": n_ctx, "n_gpu_layers": n_gpu_layers, "max_tokens": max_tokens}
        | ({"parallel": parallel} if parallel != 1 else {}),
        keep_model_on_yield=n_gpu_layers == 0,
        vibe=vibe,
        gpu_lock_path=Path(gpu_lock_path) if gpu_lock_path else default_gpu_lock_path(),
        interactive=interactive,
        emit=progress or ignore_progress,
        should_stop=should_stop or (lambda: False),
        lock_wait=lock_wait,
        gpu_wait=gpu_wait,
        plan_options=(max_gap, min_spacing, max_keyframes),
        engine_factory=engine_factory or _llava_factory,
        sync_policy=sync_policy,
        gpu_share=gpu_share if gpu_share is not None and gpu_share.enabled else None,
    )
    return run.execute()


def cap_plan(plan: Sequence[PlanEntry], limit: int | None) -> list[PlanEntry]:
    """At most ``limit`` entries, spread evenly over the plan (first and last kept)."""
    if limit is None or len(plan) <= limit:
        return list(plan)
    if limit == 1:
        return [plan[len(plan) // 2]]
    picks = sorted({round(i * (len(plan) - 1) / (limit - 1)) for i in range(limit)})
    return [plan[i] for i in picks]


def _describe_holder(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another process"
    purpose = holder.get("purpose") or "a process"
    pid = holder.get("pid")
    return f"{purpose} (pid {pid})" if pid else str(purpose)


@dataclass(slots=True)
class _Run:
    film: Path  # the realpath (upstream's spelling)
    named: Path  # the film as named by the caller: its sidecars are found beside this name
    take_over: bool
    wd: WorkDir
    subtitle: Path | None
    explicit_subtitle: bool
    model: Path | None
    mmproj: Path | None
    engine_kwargs: dict[str, int]
    keep_model_on_yield: bool
    vibe: str
    gpu_lock_path: Path
    interactive: bool
    emit: ProgressCallback
    should_stop: Callable[[], bool]
    lock_wait: float | None
    gpu_wait: float | None
    plan_options: tuple[float, float, int | None]
    engine_factory: EngineFactory
    sync_policy: SyncPolicy | None
    gpu_share: GpuShare | None = None
    sidecars: list[Path] = field(default_factory=list)
    stamp: SourceStamp | None = None
    inputs: InputStamps | None = None
    result: AnalysisResult | None = None
    _events: list[DialogueEvent] | None = None
    _cache: list[Result] | None = None
    _cache_checked: bool = False

    @property
    def purpose(self) -> str:
        return "cinecut analyze" if self.interactive else "prewarm"

    def execute(self) -> AnalysisResult:
        self.sidecars = subtitle_sidecars(self.named)
        if not self.explicit_subtitle:
            ranked = rank_subtitles(self.named, self.sidecars)
            self.subtitle = ranked[0] if ranked else None
        self.result = AnalysisResult(
            self.film, self.wd.path, self.wd.cache_path, [], cache_hit=False, subtitle=self.subtitle
        )
        try:
            ensure_work_dir(self.wd)
            fd = safefs.open_dir(self.wd.path)
        except safefs.SymlinkRefused as exc:
            raise WorkDirError(f"{self.wd.path} is a symlink; refusing to work through it") from exc
        except OSError as exc:
            raise WorkDirError(f"cannot create the work dir {self.wd.path}: {exc.strerror or exc}") from exc
        try:
            lock = work_dir_lock(self.wd, purpose=self.purpose, dir_fd=fd, announce=True)
            try:
                self._take_work_dir_lock(lock)
            except safefs.SymlinkRefused as exc:
                raise WorkDirError(f"{self.wd.lock_path} is a symlink; refusing to lock through it") from exc
            except PermissionError as exc:
                raise WorkDirError(f"cannot lock {self.wd.lock_path}: {exc.strerror or exc}") from exc
            try:
                return self._locked(fd)
            except FilmChangedError:
                raise self._discard(fd) from None
            finally:
                lock.release()
        finally:
            os.close(fd)

    # -- locks ------------------------------------------------------------------------------------

    def _take_work_dir_lock(self, lock: FileLock) -> None:
        if lock.try_acquire():
            return
        who = _describe_holder(lock.holder())
        if self.lock_wait == 0:
            raise BusyError(f"{self.wd.path} is locked by {who}")
        self.emit(ProgressEvent(EventKind.WAITING_LOCK, message=who, path=str(self.wd.path)))
        deadline = None if self.lock_wait is None else time.monotonic() + self.lock_wait
        while not lock.try_acquire():
            if self.should_stop():
                raise AnalysisStopped("stopped while waiting for the work dir")
            if deadline is not None and time.monotonic() >= deadline:
                raise BusyError(f"{self.wd.path} is still locked by {_describe_holder(lock.holder())}")
            time.sleep(_POLL_S)

    def _acquire_gpu(self, gpu: GpuLock) -> None:
        prepare_lock_dir(self.gpu_lock_path)
        if self.interactive:
            probe = FileLock(self.gpu_lock_path, purpose="probe")
            if probe.try_acquire():
                probe.release()
            else:
                self.emit(ProgressEvent(EventKind.WAITING_GPU, message=_describe_holder(gpu.holder())))
            try:
                gpu.acquire(self.gpu_wait)
            except LockBusy as exc:
                raise BusyError(
                    f"the GPU ({self.gpu_lock_path}) is held by {_describe_holder(exc.holder)}"
                ) from exc
            return
        waiting = False
        share = self.gpu_share
        # Before the first frame, too: other programs on the GPU (a transcode) are waited out, as a holder is.
        while not ((share is None or share.quiet()) and gpu.try_acquire()):
            if self.should_stop():
                raise AnalysisStopped("stopped while waiting for the GPU")
            if not waiting:
                waiting = True
                other = share.last if share is not None and not share.quiet() else None
                self.emit(ProgressEvent(EventKind.WAITING_GPU, message=other.who if other else
                                        _describe_holder(gpu.holder()), reason=other.reason if other else None))
            time.sleep(_POLL_S)
        if waiting:
            self.emit(ProgressEvent(EventKind.RESUMED))

    # -- the locked part --------------------------------------------------------------------------

    def _locked(self, fd: int) -> AnalysisResult:
        assert self.result is not None
        self._claim(fd)
        rv = revalidate(self.film, self.sidecars, locked_fd=fd)
        self._after_revalidation(rv)
        ckpt = self._checkpoint(fd)
        if self._needs_model(fd):
            self._check_model_args()
        self._stage_proxy(fd, ckpt)
        self._stage_subtitles(fd, ckpt)
        records = self._stage_keyframes(fd, ckpt)
        self._stage_inference(fd, ckpt, records)
        self._commit_stamps(fd)
        return self.result

    def _after_revalidation(self, rv: Revalidation) -> None:
        assert self.result is not None
        if rv.refused:
            raise WorkDirError(f"{self.wd.path}: {rv.refused}")
        if not rv.film_present or rv.stamps is None or rv.stamps.video is None:
            raise MissingInputError(f"{self.film}: no such file")
        self.inputs = rv.stamps
        self.stamp = rv.stamps.video
        if rv.report is not None and rv.report.changed_anything:
            self.result.invalidated = list(rv.report.stages_reset)
            self.emit(ProgressEvent(EventKind.INVALIDATED, message="; ".join(rv.reasons)))

    def _claim(self, fd: int) -> None:
        """Before anything is revalidated or written: a work dir holding a same-stem twin's results is
        refused (TwinError), or with ``take_over`` reset for this film, never taken silently."""
        owner = twin_owner_at(fd, self.wd)
        if owner is None:
            return
        if not self.take_over:
            raise TwinError(str(TwinConflict(str(self.named), owner, str(self.wd.path))))
        why = f"work dir taken over from {owner}"
        report = InvalidationReport(str(self.wd.path), ["video"], why)
        invalidate_at(fd, self.wd, downstream(["video"]), report)
        remove_partial_at(fd, self.wd.partial_name)
        save_checkpoint_at(PipelineCheckpoint(source_file=str(self.film), vibe=self.vibe), fd)
        assert self.result is not None
        self.result.invalidated = list(report.stages_reset)
        self.emit(ProgressEvent(EventKind.INVALIDATED, message=why))

    def _checkpoint(self, fd: int) -> PipelineCheckpoint:
        """The film's checkpoint; a missing, unreadable or foreign one starts fresh, as upstream does.

        Starting fresh also removes the proxy and keyframes left beside it: their origin is unknown
        (another film with the same stem, a crashed writer), and extraction keeps JPEGs it finds. A
        checkpoint naming this film in another spelling (a symlinked folder, an older abspath record) is
        this film's: it is kept, and its paths are rewritten in upstream's spelling so upstream keeps it.
        """
        read = read_checkpoint_at(fd)
        old = read.checkpoint
        if old is not None and same_film_path(old.source_file, self.film):
            if old.source_file != str(self.film):
                if same_film_path(old.proxy_path, self.wd.proxy_path):
                    old.proxy_path = str(self.wd.proxy_path)
                old.source_file = str(self.film)
                save_checkpoint_at(old, fd)
            return old
        report = InvalidationReport(str(self.wd.path), ["video"], "fresh checkpoint")
        invalidate_at(fd, self.wd, [STAGE_BY_NAME["proxy"], STAGE_BY_NAME["keyframes"]], report)
        ckpt = PipelineCheckpoint(source_file=str(self.film), vibe=self.vibe)
        save_checkpoint_at(ckpt, fd)
        return ckpt

    def _save(self, ckpt: PipelineCheckpoint, fd: int) -> None:
        save_checkpoint_at(ckpt, fd)

    def _stop_point(self) -> None:
        if self.should_stop():
            raise AnalysisStopped("stopped before the next stage")

    def _check_film(self) -> None:
        """FilmChangedError if the film's stamp is no longer the one taken before reading it."""
        if SourceStamp.maybe(self.film) != self.stamp:
            raise FilmChangedError(f"{self.film} changed during analysis")

    # -- stage 1: proxy ---------------------------------------------------------------------------

    def _stage_proxy(self, fd: int, ckpt: PipelineCheckpoint) -> None:
        st = safefs.lstat_in(fd, self.wd.proxy_name)
        present = st is not None and stat.S_ISREG(st.st_mode) and st.st_size > 0
        if ckpt.is_complete("proxy") and ckpt.proxy_duration_s is not None and present:
            self.emit(ProgressEvent(EventKind.STAGE_DONE, stage="proxy", skipped=True))
            return
        self._stop_point()
        self.emit(ProgressEvent(EventKind.STAGE, stage="proxy"))
        duration = make_proxy(self.film, self.wd.proxy_path)
        self._check_film()
        ckpt.proxy_path = str(self.wd.proxy_path)
        ckpt.proxy_duration_s = duration
        ckpt.mark_complete("proxy")
        self._save(ckpt, fd)
        self._ran("proxy")

    def _ran(self, stage: str) -> None:
        assert self.result is not None
        faults.point(f"pipeline.after_{stage}")
        self.result.stages_run.append(stage)
        self.emit(ProgressEvent(EventKind.STAGE_DONE, stage=stage))

    # -- stage 2: subtitles -----------------------------------------------------------------------

    def _dialogue(self) -> list[DialogueEvent]:
        """Dialogue of the chosen subtitle; an unreadable sidecar we picked ourselves yields to the next."""
        if self._events is not None:
            return self._events
        assert self.result is not None
        candidates = (
            [self.subtitle]
            if self.explicit_subtitle and self.subtitle
            else rank_subtitles(self.named, self.sidecars)
        )
        events: list[DialogueEvent] = []
        self.subtitle = None
        for cand in candidates:
            try:
                events = parse_subtitles(cand)
            except SubtitleError as exc:
                if self.explicit_subtitle:
                    raise
                self._warn(f"skipping subtitle {cand.name}: {exc}")
                continue
            self.subtitle = cand
            break
        if self.subtitle is None:
            self._warn(NO_SUBTITLES_WARNING)
        self.result.subtitle = self.subtitle
        self._events = events
        return events

    def _warn(self, message: str) -> None:
        assert self.result is not None
        if message in self.result.warnings:
            return
        self.result.warnings.append(message)
        self.emit(ProgressEvent(EventKind.WARNING, message=message))

    def _stage_subtitles(self, fd: int, ckpt: PipelineCheckpoint) -> None:
        assert self.result is not None
        if ckpt.is_complete("subtitles") and ckpt.dialogue_event_count is not None:
            self.result.dialogue_event_count = ckpt.dialogue_event_count
            self.emit(ProgressEvent(EventKind.STAGE_DONE, stage="subtitles", skipped=True))
            return
        self._stop_point()
        self.emit(ProgressEvent(EventKind.STAGE, stage="subtitles"))
        events = self._dialogue()
        ckpt.dialogue_event_count = len(events)
        ckpt.mark_complete("subtitles")
        self._save(ckpt, fd)
        self.result.dialogue_event_count = len(events)
        self._ran("subtitles")

    # -- stage 3: keyframes -----------------------------------------------------------------------

    def _valid_cache(self) -> list[Result] | None:
        """The cache's results if it is valid for the film's stamp (decoded once per run)."""
        if not self._cache_checked:
            self._cache_checked = True
            results = load_cache(self.film, self.wd)
            self._cache = (
                results if results is not None and SourceStamp.maybe(self.film) == self.stamp else None
            )
        return self._cache

    def _known_plan(self, fd: int) -> list[PlanEntry] | None:
        """The plan behind the existing keyframes: the valid cache's records, else the partial's header.

        ``keyframe_timestamps.json`` holds no sources, so without either the stage must plan again.
        """
        cached = self._valid_cache()
        if cached is not None:
            return list(plan_of([rec for rec, _ in cached]))
        partial = read_partial_at(fd, self.wd.partial_name)
        if partial is not None and partial.header.matches(self.stamp):
            return list(partial.header.plan)
        return None

    def _stored_timestamps(self, fd: int) -> list[float] | None:
        try:
            data = json.loads(safefs.read_bounded(fd, TIMESTAMPS_NAME, MAX_TIMESTAMPS_BYTES))
        except (OSError, ValueError, RecursionError):
            return None
        if not isinstance(data, list) or not all(
            isinstance(t, int | float) and not isinstance(t, bool) and math.isfinite(t) for t in data
        ):
            return None
        return [float(t) for t in data]

    def _needs_model(self, fd: int) -> bool:
        """True unless a valid cache or complete partial results make inference unnecessary."""
        state, _ = cache_state(self.film, self.wd, stamp=self.stamp)
        if state is CacheState.VALID:
            return False
        partial = read_partial_at(fd, self.wd.partial_name)
        return not (
            partial is not None and partial.header.matches(self.stamp) and partial.done == partial.total
        )

    def _check_keyframes_dir(self, fd: int) -> None:
        st = safefs.lstat_in(fd, KEYFRAMES_DIR_NAME)
        if st is not None and not stat.S_ISDIR(st.st_mode):
            raise WorkDirError(f"{self.wd.keyframes_dir} is not a directory (a symlink?); refusing to use it")

    def _stage_keyframes(self, fd: int, ckpt: PipelineCheckpoint) -> list[KeyframeRecord]:
        assert ckpt.proxy_duration_s is not None
        self._check_keyframes_dir(fd)
        known = self._known_plan(fd)
        if ckpt.is_complete("keyframes") and known is not None:
            stored = self._stored_timestamps(fd)
            if stored == [t for t, _ in known] and ckpt.keyframe_count == len(known):
                # Extraction only fills in JPEGs that are missing or cut short: normally no ffmpeg at all.
                records = extract_keyframes(self.wd.proxy_path, known, self.wd.keyframes_dir)
                self.emit(ProgressEvent(EventKind.STAGE_DONE, stage="keyframes", skipped=True))
                return records
        self._stop_point()
        self.emit(ProgressEvent(EventKind.STAGE, stage="keyframes"))
        if known is not None:
            plan = known
        else:
            max_gap, min_spacing, limit = self.plan_options
            self._dialogue()  # settles which subtitle is used (an unreadable sidecar we picked is skipped)
            fp = plan_film(
                self.wd.proxy_path,
                self.subtitle,
                duration_s=ckpt.proxy_duration_s,
                max_gap=max_gap,
                min_spacing=min_spacing,
            )
            for message in fp.warnings:
                self._warn(message)
            plan = cap_plan(fp.plan, limit)
        records = extract_keyframes(self.wd.proxy_path, plan, self.wd.keyframes_dir)
        self._prune_keyframes(fd, {keyframe_name(r.timestamp_s) for r in records})
        data = json.dumps([r.timestamp_s for r in records]).encode()
        safefs.atomic_write(fd, TIMESTAMPS_NAME, data, tmp_suffix=CKPT_TMP_SUFFIX)
        if self._valid_cache() is None:
            # The partial's header records the plan (with each keyframe's source) before the stage is
            # marked complete, so a resumed run never has to plan again.
            writer, _ = open_partial(
                fd,
                self.wd.partial_name,
                source_file=str(self.film),
                stamp=self._stamp(),
                plan=plan_of(records),
            )
            writer.close()
        self._check_film()
        ckpt.keyframe_count = len(records)
        ckpt.mark_complete("keyframes")
        self._save(ckpt, fd)
        self._ran("keyframes")
        return records

    def _stamp(self) -> SourceStamp:
        assert self.stamp is not None
        return self.stamp

    def _prune_keyframes(self, fd: int, keep: set[str]) -> None:
        """Remove JPEGs of an older plan, so ``keyframes/`` holds exactly the plan's frames."""
        kfd = safefs.open_subdir(fd, KEYFRAMES_DIR_NAME)
        try:
            for entry in os.scandir(kfd):
                if KEYFRAME_RE.match(entry.name) and entry.name not in keep:
                    try:
                        safefs.unlink_regular(kfd, entry.name)
                    except OSError:
                        pass  # a symlink or a race: not ours to touch, and harmless
        finally:
            os.close(kfd)

    # -- stage 4: inference -----------------------------------------------------------------------

    def _check_model_args(self) -> None:
        if self.model is None or self.mmproj is None:
            raise ModelError(
                "no valid SceneDescription cache, so LLaVA inference must run: give --model and --mmproj "
                "(or set CINECUT_MODEL and CINECUT_MMPROJ)"
            )
        for role, path in (("model", self.model), ("mmproj", self.mmproj)):
            if not path.is_file():
                raise ModelError(f"{role} {path}: no such file")

    def _load_engine(self) -> Engine:
        from cinecut.inference.engine import EngineLoadError

        assert self.model is not None and self.mmproj is not None
        self.emit(ProgressEvent(EventKind.MODEL_LOADING, path=str(self.model)))
        try:
            engine = self.engine_factory(self.model, self.mmproj, **self.engine_kwargs)
        except EngineLoadError as exc:
            raise ModelError(str(exc)) from exc
        self.emit(ProgressEvent(EventKind.MODEL_LOADED, path=str(self.model)))
        return engine

    def _stage_inference(self, fd: int, ckpt: PipelineCheckpoint, records: list[KeyframeRecord]) -> None:
        assert self.result is not None
        self.emit(ProgressEvent(EventKind.STAGE, stage="inference"))
        self._check_film()
        cached = self._valid_cache()
        if cached is not None:
            if (ckpt.inference_complete, ckpt.cache_hit) != (True, True):
                ckpt.inference_complete, ckpt.cache_hit = True, True
                self._save(ckpt, fd)
            remove_partial_at(fd, self.wd.partial_name)
            remove_salvage_at(fd)
            self.result.results, self.result.cache_hit = cached, True
            self.emit(
                ProgressEvent(
                    EventKind.CACHE_HIT, done=len(cached), total=len(cached), path=str(self.wd.cache_path)
                )
            )
            self.emit(ProgressEvent(EventKind.STAGE_DONE, stage="inference", skipped=True))
            return
        self._reset_after_inference(fd, ckpt)
        writer, done = open_partial(
            fd,
            self.wd.partial_name,
            source_file=str(self.film),
            stamp=self._stamp(),
            plan=plan_of(records),
            policy=self.sync_policy,
        )
        # Rebuilt from the current records, so frame paths follow a work dir that was moved.
        results: list[Result] = [(records[i], desc) for i, (_, desc) in enumerate(done)]
        self.result.frames_resumed = len(results)
        salvaged = self._salvaged(fd, records)
        try:
            if any(frame_key(r.timestamp_s) not in salvaged for r in records[len(results) :]):
                self._check_model_args()
            if len(results) < len(records):
                self._infer(writer, records, results, salvaged)
        finally:
            writer.close()
        faults.point("prewarm.before_cache_save")
        self._check_film()  # after the last frame: results of a film that changed are never saved
        save_cache(results, self.film, self.wd, stamp=self._stamp())
        ckpt.inference_complete, ckpt.cache_hit = True, False
        self._save(ckpt, fd)
        remove_partial_at(fd, self.wd.partial_name)
        remove_salvage_at(fd)  # everything it held for this plan is in the cache now
        self.result.results = results
        self.emit(
            ProgressEvent(
                EventKind.CACHE_SAVED, done=len(results), total=len(records), path=str(self.wd.cache_path)
            )
        )
        self._ran("inference")

    def _salvaged(self, fd: int, records: list[KeyframeRecord]) -> dict[int, SceneDescription]:
        """Descriptions kept from before a subtitle change, for the frames of this plan, by frame key.

        Only a store of this very video state counts (its stamp is the one taken before reading the
        film); the frames it covers are appended to the partial results without the model.
        """
        store = read_salvage_at(fd)
        if store is None or not store.usable_for(self.stamp):
            return {}
        salvaged = store.for_plan(records)
        assert self.result is not None
        self.result.frames_salvaged = len(salvaged)
        self.emit(
            ProgressEvent(
                EventKind.SALVAGED,
                stage="inference",
                done=len(salvaged),
                total=len(records),
                message=f"salvaged {len(salvaged)} of {len(records)} frames",
            )
        )
        return salvaged

    def _reset_after_inference(self, fd: int, ckpt: PipelineCheckpoint) -> None:
        """A miss: whatever was built on earlier descriptions is stale, so reset it through the stage graph.

        Upstream's own miss path resets only ``narrative`` and ``assembly``; ``music`` depends on them too.
        """
        stale = downstream(["inference"])
        if (
            ckpt.inference_complete is None
            and ckpt.cache_hit is None
            and not any(
                ckpt.is_complete(st.name) or any(getattr(ckpt, f) is not None for f in st.fields)
                for st in stale
            )
        ):
            return
        report = InvalidationReport(str(self.wd.path), ["inference"], "no valid SceneDescription cache")
        invalidate_at(fd, self.wd, stale, report)
        fresh = read_checkpoint_at(fd).checkpoint
        if fresh is not None:
            for name in CHECKPOINT_KEYS:
                setattr(ckpt, name, getattr(fresh, name))
        ckpt.inference_complete = ckpt.cache_hit = None
        self._save(ckpt, fd)

    def _discard(self, fd: int) -> FilmChangedError:
        """The film changed under us: reset its stages through the stage graph and say so."""
        now = SourceStamp.maybe(self.film)
        rv = revalidate(self.film, subtitle_sidecars(self.named), locked_fd=fd)
        if now is None:
            remove_partial_at(fd, self.wd.partial_name)
            why = "was removed"
        else:
            was = self._stamp()
            why = f"is now {now.size} bytes, mtime {now.mtime} (was {was.size} bytes, mtime {was.mtime})"
        reset = (
            f" (reset: {', '.join(rv.report.stages_reset)})" if rv.report and rv.report.stages_reset else ""
        )
        return FilmChangedError(f"{self.film} changed during analysis and {why}: results discarded{reset}")

    def _infer(
        self,
        writer: PartialWriter,
        records: list[KeyframeRecord],
        results: list[Result],
        salvaged: Mapping[int, SceneDescription] | None = None,
    ) -> None:
        """Describe the frames after ``results``, in plan order; salvaged frames never reach the model.

        The GPU is taken and the model loaded at the first frame that needs them, so a plan that the
        salvage store covers entirely never loads the model.
        """
        salvaged = salvaged or {}
        gpu = GpuLock(
            self.gpu_lock_path, purpose=f"{self.purpose} {self.film.name}", interactive=self.interactive
        )
        meter = RateMeter()
        total = len(records)
        to_compute = sum(1 for r in records[len(results) :] if frame_key(r.timestamp_s) not in salvaged)
        engine: Engine | None = None
        try:
            for rec in records[len(results) :]:
                if self.should_stop():
                    writer.sync()
                    raise AnalysisStopped(
                        f"stopped after {len(results)} of {total} frames", len(results), total
                    )
                desc = salvaged.get(frame_key(rec.timestamp_s))
                if desc is None:
                    if engine is None:
                        self._acquire_gpu(gpu)
                        engine = self._load_engine()
                        _prefetch(engine, records[len(results) :], salvaged)
                        meter.start()
                    other = self.gpu_share.busy() if self.gpu_share is not None else None
                    if other is not None or gpu.should_yield():
                        engine = self._yield_gpu(gpu, writer, engine, meter, len(results), total, other)
                        _prefetch(engine, records[len(results) :], salvaged)
                    desc = engine.describe(Path(rec.frame_path))
                    meter.tick()
                    to_compute -= 1
                writer.append(rec, desc)
                results.append((rec, desc))
                faults.point("prewarm.after_frame")
                assert self.result is not None
                self.result.frames_computed = meter.frames
                self.emit(
                    ProgressEvent(
                        EventKind.FRAME,
                        stage="inference",
                        done=len(results),
                        total=total,
                        computed=meter.frames,
                        fps=meter.fps,
                        eta_s=meter.eta(to_compute),
                    )
                )
                self._check_film()
        finally:
            if engine is not None:
                engine.close()
            gpu.release()

    def _yield_gpu(
        self,
        gpu: GpuLock,
        writer: PartialWriter,
        engine: Engine | None,
        meter: RateMeter,
        done: int,
        total: int,
        other: Busy | None = None,
    ) -> Engine:
        """Hand the GPU to an interactive run (or to ``other``, a program on the GPU) and take it back when
        it is done; returns a usable engine.

        An interactive run needs the model's VRAM at once; another program may only need the video engine
        or a moment, so the model stays loaded until the pause has lasted ``unload_after_s`` (or an
        interactive run asks meanwhile). Resuming waits for the GPU lock and, with a share policy, for the
        GPU to have been free of other users for its quiet period.
        """
        writer.sync()
        meter.pause()
        share = self.gpu_share
        unloads = engine is not None and not self.keep_model_on_yield and _offloads_to_gpu()
        if engine is not None and unloads and other is None:
            engine.close()  # its VRAM is what the interactive run needs
            engine = None
        gpu.release()
        self.emit(ProgressEvent(EventKind.YIELDED, done=done, total=total, message=other.who if other else "",
                                reason=other.reason if other else "interactive"))
        since = time.monotonic()
        while not ((share is None or share.quiet()) and gpu.try_acquire()):
            if self.should_stop():
                raise AnalysisStopped(f"stopped after {done} of {total} frames (GPU yielded)", done, total)
            if engine is not None and unloads and share is not None and (
                time.monotonic() - since >= share.config.unload_after_s or gpu.someone_waiting()
            ):
                engine.close()  # a long pause, or an interactive run wants the GPU: free the VRAM
                engine = None
            time.sleep(_POLL_S)
        self.emit(ProgressEvent(EventKind.RESUMED, done=done, total=total))
        meter.start()
        return engine if engine is not None else self._load_engine()

    # -- commit -----------------------------------------------------------------------------------

    def _commit_stamps(self, fd: int) -> None:
        """Rewrite the stamps sidecar last, if the inputs are still those the stages were computed from."""
        assert self.inputs is not None
        now = current_stamps(self.film, self.sidecars)
        if now.video == self.inputs.video and now.subtitles == self.inputs.subtitles:
            write_stamps_at(fd, self.inputs, durable=True)
