"""Stages 1 to 4 of CineCut's analysis, with upstream's Stage 4 cache guard.

One implementation serves ``cinecut analyze`` (interactive), the daemon's pre-warm worker and a remote
worker's job (non-interactive); each describes what it wants as an
:class:`~cinecut.analyze_options.AnalyzeOptions`. The work dir it leaves is exactly what upstream expects:
checkpoint stages ``proxy``, ``subtitles`` and ``keyframes`` complete with their fields,
``keyframe_timestamps.json``, ``keyframes/``, and the SceneDescription cache with
``inference_complete``/``cache_hit`` set.

Order of a run, and why:

1. Take the work dir's lock (the daemon then defers its edits) and revalidate through
   :func:`cinecut.revalidate.revalidate`: a replaced film or changed subtitles reset the stale stages
   through the stage graph, so the checkpoint can be trusted afterwards. The film's stamp taken here,
   before any stage reads the film, is the stamp the cache is saved under.
2. Each stage the checkpoint marks complete (and whose files are present) is skipped; the others run
   and are recorded one by one, so an interrupted run resumes at the first unfinished stage.
3. Stage 4: a valid cache is a hit and the model is never loaded. On a miss every keyframe not already
   in the partial results (:mod:`cinecut.inference.partial`) or the salvage store is described by the
   run's :class:`~cinecut.inference.session.InferenceSession`. The film's stamp is checked after every
   frame and again after the last one: results of a film that changed meanwhile are discarded, never
   saved under a stamp they do not match.
4. The stamps sidecar is rewritten last, as the commit mark.

The GPU (:class:`cinecut.locks.GpuLock`, waiting, yielding, the model) belongs to the inference session;
every wait for a lock polls through :func:`cinecut.polling.poll_acquire`, so a stop request or a deadline
is heard while waiting.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cinecut import faults, safefs
from cinecut.analyze_options import (
    DEFAULT_MAX_GAP_S,
    DEFAULT_MAX_TOKENS,
    DEFAULT_MIN_SPACING_S,
    DEFAULT_N_CTX,
    DEFAULT_VIBE,
    AnalyzeOptions,
)
from cinecut.checkpoint import PipelineCheckpoint, ensure_work_dir, save_checkpoint_at
from cinecut.gpu_lockpath import GPU_LOCK_NAME, SYSTEM_GPU_LOCK_DIR, default_gpu_lock_path, prepare_lock_dir
from cinecut.gpu_share import GpuShare
from cinecut.inference.cache import CacheState, Result, cache_state, load_cache, save_cache
from cinecut.inference.models import SceneDescription
from cinecut.inference.partial import (
    PlanEntry,
    SyncPolicy,
    open_partial,
    plan_of,
    read_partial_at,
    remove_partial_at,
)
from cinecut.inference.salvage import frame_key, read_salvage_at, remove_salvage_at
from cinecut.inference.session import Engine, EngineFactory, InferenceSession
from cinecut.ingest import DialogueEvent, MissingInputError, extract_keyframes, make_proxy, plan_film, probe
from cinecut.ingest.ffmpeg import require_file
from cinecut.keyframe_files import (
    MAX_TIMESTAMPS_BYTES,
    cap_plan,
    check_keyframes_dir_at,
    prune_keyframes_at,
    stored_timestamps_at,
)
from cinecut.locks import FileLock, describe_holder, work_dir_lock
from cinecut.models import KeyframeRecord
from cinecut.pipeline_errors import (
    AnalysisStopped,
    BusyError,
    FilmChangedError,
    ModelError,
    PipelineError,
    TwinError,
    WorkDirError,
)
from cinecut.polling import Polled, poll_acquire
from cinecut.progress import EventKind, ProgressCallback, ProgressEvent, ignore_progress
from cinecut.revalidate import Revalidation, revalidate
from cinecut.run_checkpoint import film_changed_at, reset_after_miss_at, start_checkpoint_at, take_over_at
from cinecut.stamp import SourceStamp, film_path
from cinecut.stamps import InputStamps, current_stamps, write_stamps_at
from cinecut.subtitle_choice import NO_SUBTITLES_WARNING, choose_subtitle, rank_subtitles, read_dialogue
from cinecut.twins import TwinConflict, twin_owner_at
from cinecut.workdir import CKPT_TMP_SUFFIX, TIMESTAMPS_NAME, WorkDir, keyframe_name, subtitle_sidecars

#: What callers have always imported from here; each lives in the module that owns its idea.
__all__ = [
    "DEFAULT_MAX_GAP_S",
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_MIN_SPACING_S",
    "DEFAULT_N_CTX",
    "DEFAULT_VIBE",
    "GPU_LOCK_NAME",
    "MAX_TIMESTAMPS_BYTES",
    "NO_SUBTITLES_WARNING",
    "SYSTEM_GPU_LOCK_DIR",
    "AnalysisResult",
    "AnalysisStopped",
    "AnalyzeOptions",
    "BusyError",
    "Engine",
    "EngineFactory",
    "FilmChangedError",
    "ModelError",
    "PipelineError",
    "TwinError",
    "WorkDirError",
    "analyze",
    "cap_plan",
    "choose_subtitle",
    "default_gpu_lock_path",
    "prepare_lock_dir",
    "rank_subtitles",
]


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


# ---------------------------------------------------------------------------------------- the run


def analyze(
    film: str | os.PathLike[str],
    options: AnalyzeOptions | None = None,
    *,
    progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    engine_factory: EngineFactory | None = None,
    sync_policy: SyncPolicy | None = None,
    gpu_share: GpuShare | None = None,
    **overrides: Any,
) -> AnalysisResult:
    """Run stages 1 to 4 for ``film`` as ``options`` say, and return its SceneDescriptions.

    ``overrides`` are :class:`AnalyzeOptions` fields replacing those of ``options`` (``analyze(film,
    model=m, mmproj=p, interactive=False)``); an unknown name is a TypeError, a bad value a ValueError.
    Without a subtitle option the best sidecar is used (:func:`choose_subtitle`); without one, keyframes
    come from scene changes and intervals only (a warning event says so). ``should_stop`` is polled
    between stages and frames and while waiting for a lock; when it returns True the run stops with
    AnalysisStopped after saving its progress. A work dir holding a same-stem twin's results raises
    TwinError unless ``take_over``, which resets it for this film. ``parallel`` frames are described at
    once in one batch (:mod:`cinecut.inference.parallel`; 0: as many as the free VRAM holds); results are
    still written, and resumable, in keyframe order. ``gpu_share`` (the pre-warm): other programs on the
    GPU it yields to as it yields to an interactive run (:mod:`cinecut.gpu_share`). ``engine_factory``
    builds the engine (default: llama.cpp's), ``sync_policy`` paces the partial results' fsyncs.

    The film is resolved with ``realpath``, as upstream resolves it: that spelling is what the checkpoint,
    cache and stamps record, and it places the work dir where upstream looks for it. Subtitle sidecars
    are paired by the name the film was given (beside a symlinked film, not beside its target).
    """
    opts = options if options is not None else AnalyzeOptions()
    if overrides:
        opts = replace(opts, **overrides)
    named = Path(os.path.abspath(film))
    f = film_path(film)
    require_file(f)
    sub: Path | None = None
    if opts.subtitle is not None:
        sub = film_path(opts.subtitle)
        require_file(sub)
    wd = WorkDir.for_film(f)
    if not os.path.lexists(wd.path):
        # A first run: say "not a film" (or "no ffmpeg") before a work dir is created beside it.
        probe(f)
    emit = progress or ignore_progress
    stop = should_stop or (lambda: False)
    session = InferenceSession(
        opts, f, emit=emit, should_stop=stop, engine_factory=engine_factory, gpu_share=gpu_share
    )
    run = _Run(
        film=f,
        named=named,
        wd=wd,
        options=opts,
        subtitle=sub,
        session=session,
        emit=emit,
        should_stop=stop,
        sync_policy=sync_policy,
    )
    return run.execute()


def _open_work_dir(wd: WorkDir) -> int:
    """The work dir, created if need be and opened without following a symlink."""
    try:
        ensure_work_dir(wd)
        return safefs.open_dir(wd.path)
    except safefs.SymlinkRefused as exc:
        raise WorkDirError(f"{wd.path} is a symlink; refusing to work through it") from exc
    except OSError as exc:
        raise WorkDirError(f"cannot create the work dir {wd.path}: {exc.strerror or exc}") from exc


@dataclass(slots=True)
class _Run:
    """One analysis of one film: the stages, in order, under the work dir's lock."""

    film: Path  # the realpath (upstream's spelling)
    named: Path  # the film as named by the caller: its sidecars are found beside this name
    wd: WorkDir
    options: AnalyzeOptions
    subtitle: Path | None  # the user's subtitle (resolved), else the sidecar the run settles on
    session: InferenceSession
    emit: ProgressCallback
    should_stop: Callable[[], bool]
    sync_policy: SyncPolicy | None
    sidecars: list[Path] = field(default_factory=list)
    stamp: SourceStamp | None = None
    inputs: InputStamps | None = None
    result: AnalysisResult | None = None
    _events: list[DialogueEvent] | None = None
    _cache: list[Result] | None = None
    _cache_checked: bool = False

    @property
    def explicit_subtitle(self) -> bool:
        return self.options.subtitle is not None

    def execute(self) -> AnalysisResult:
        self.sidecars = subtitle_sidecars(self.named)
        if not self.explicit_subtitle:
            ranked = rank_subtitles(self.named, self.sidecars)
            self.subtitle = ranked[0] if ranked else None
        self.result = AnalysisResult(
            self.film, self.wd.path, self.wd.cache_path, [], cache_hit=False, subtitle=self.subtitle
        )
        fd = _open_work_dir(self.wd)
        try:
            lock = work_dir_lock(self.wd, purpose=self.options.purpose, dir_fd=fd, announce=True)
            try:
                self._take_work_dir_lock(lock)
            except safefs.SymlinkRefused as exc:
                raise WorkDirError(f"{self.wd.lock_path} is a symlink; refusing to lock through it") from exc
            except PermissionError as exc:
                raise WorkDirError(f"cannot lock {self.wd.lock_path}: {exc.strerror or exc}") from exc
            try:
                return self._locked(fd)
            except FilmChangedError:
                raise film_changed_at(fd, self.wd, self.film, self.named, self.stamp) from None
            finally:
                lock.release()
        finally:
            os.close(fd)

    def _take_work_dir_lock(self, lock: FileLock) -> None:
        """Wait for a pipeline that holds the work dir (``lock_wait``), saying who it is."""
        if lock.try_acquire():
            return
        who = describe_holder(lock.holder())
        if self.options.lock_wait == 0:
            raise BusyError(f"{self.wd.path} is locked by {who}")
        self.emit(ProgressEvent(EventKind.WAITING_LOCK, message=who, path=str(self.wd.path)))
        polled = poll_acquire(lock.try_acquire, timeout=self.options.lock_wait, should_stop=self.should_stop)
        if polled is Polled.STOPPED:
            raise AnalysisStopped("stopped while waiting for the work dir")
        if polled is Polled.TIMED_OUT:
            raise BusyError(f"{self.wd.path} is still locked by {describe_holder(lock.holder())}")

    # -- the locked part --------------------------------------------------------------------------

    def _locked(self, fd: int) -> AnalysisResult:
        assert self.result is not None
        self._claim(fd)
        rv = revalidate(self.film, self.sidecars, locked_fd=fd)
        self._after_revalidation(rv)
        ckpt = start_checkpoint_at(fd, self.wd, self.film, self.options.vibe)
        if self._needs_model(fd):
            self.session.check_model()
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
        if not self.options.take_over:
            raise TwinError(str(TwinConflict(str(self.named), owner, str(self.wd.path))))
        report = take_over_at(fd, self.wd, self.film, self.options.vibe, owner)
        assert self.result is not None
        self.result.invalidated = list(report.stages_reset)
        self.emit(ProgressEvent(EventKind.INVALIDATED, message=report.reason))

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
        save_checkpoint_at(ckpt, fd)
        self._ran("proxy")

    def _ran(self, stage: str) -> None:
        assert self.result is not None
        faults.point(f"pipeline.after_{stage}")
        self.result.stages_run.append(stage)
        self.emit(ProgressEvent(EventKind.STAGE_DONE, stage=stage))

    # -- stage 2: subtitles -----------------------------------------------------------------------

    def _dialogue(self) -> list[DialogueEvent]:
        """Dialogue of the chosen subtitle; an unreadable sidecar we picked ourselves yields to the next."""
        if self._events is None:
            assert self.result is not None
            candidates = (
                [self.subtitle]
                if self.explicit_subtitle and self.subtitle
                else rank_subtitles(self.named, self.sidecars)
            )
            self.subtitle, self._events = read_dialogue(
                candidates, explicit=self.explicit_subtitle, warn=self._warn
            )
            self.result.subtitle = self.subtitle
        return self._events

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
        save_checkpoint_at(ckpt, fd)
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

    def _needs_model(self, fd: int) -> bool:
        """True unless a valid cache or complete partial results make inference unnecessary."""
        state, _ = cache_state(self.film, self.wd, stamp=self.stamp)
        if state is CacheState.VALID:
            return False
        partial = read_partial_at(fd, self.wd.partial_name)
        return not (
            partial is not None and partial.header.matches(self.stamp) and partial.done == partial.total
        )

    def _stage_keyframes(self, fd: int, ckpt: PipelineCheckpoint) -> list[KeyframeRecord]:
        assert ckpt.proxy_duration_s is not None
        check_keyframes_dir_at(fd, self.wd)
        known = self._known_plan(fd)
        if ckpt.is_complete("keyframes") and known is not None:
            stored = stored_timestamps_at(fd)
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
            self._dialogue()  # settles which subtitle is used (an unreadable sidecar we picked is skipped)
            fp = plan_film(
                self.wd.proxy_path,
                self.subtitle,
                duration_s=ckpt.proxy_duration_s,
                max_gap=self.options.max_gap,
                min_spacing=self.options.min_spacing,
            )
            for message in fp.warnings:
                self._warn(message)
            plan = cap_plan(fp.plan, self.options.max_keyframes)
        records = extract_keyframes(self.wd.proxy_path, plan, self.wd.keyframes_dir)
        prune_keyframes_at(fd, {keyframe_name(r.timestamp_s) for r in records})
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
        save_checkpoint_at(ckpt, fd)
        self._ran("keyframes")
        return records

    def _stamp(self) -> SourceStamp:
        assert self.stamp is not None
        return self.stamp

    # -- stage 4: inference -----------------------------------------------------------------------

    def _stage_inference(self, fd: int, ckpt: PipelineCheckpoint, records: list[KeyframeRecord]) -> None:
        assert self.result is not None
        self.emit(ProgressEvent(EventKind.STAGE, stage="inference"))
        self._check_film()
        cached = self._valid_cache()
        if cached is not None:
            if (ckpt.inference_complete, ckpt.cache_hit) != (True, True):
                ckpt.inference_complete, ckpt.cache_hit = True, True
                save_checkpoint_at(ckpt, fd)
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
        reset_after_miss_at(fd, self.wd, ckpt)
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
                self.session.check_model()
            if len(results) < len(records):
                self.session.describe_frames(writer, records, results, salvaged, self._after_frame)
        finally:
            writer.close()
        faults.point("prewarm.before_cache_save")
        self._check_film()  # after the last frame: results of a film that changed are never saved
        save_cache(results, self.film, self.wd, stamp=self._stamp())
        ckpt.inference_complete, ckpt.cache_hit = True, False
        save_checkpoint_at(ckpt, fd)
        remove_partial_at(fd, self.wd.partial_name)
        remove_salvage_at(fd)  # everything it held for this plan is in the cache now
        self.result.results = results
        self.emit(
            ProgressEvent(
                EventKind.CACHE_SAVED, done=len(results), total=len(records), path=str(self.wd.cache_path)
            )
        )
        self._ran("inference")

    def _after_frame(self) -> None:
        assert self.result is not None
        self.result.frames_computed = self.session.meter.frames
        self._check_film()  # a film that changes mid-run is noticed at the next frame boundary

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

    # -- commit -----------------------------------------------------------------------------------

    def _commit_stamps(self, fd: int) -> None:
        """Rewrite the stamps sidecar last, if the inputs are still those the stages were computed from."""
        assert self.inputs is not None
        now = current_stamps(self.film, self.sidecars)
        if now.video == self.inputs.video and now.subtitles == self.inputs.subtitles:
            write_stamps_at(fd, self.inputs, durable=True)
