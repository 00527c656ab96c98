"""One analysis's use of the model: the GPU, the engine, and the frames it describes.

The pipeline's Stage 4 decides *which* frames need describing (a valid cache needs none, resumed and
salvaged frames need none); this session does the describing. It owns everything about the GPU and the
model so the stage logic does not:

- waiting for the GPU: an interactive run announces itself through :class:`cinecut.locks.GpuLock`'s want
  file and waits (``gpu_wait``); a pre-warm waits, polling, until the lock is free and, with a
  :class:`cinecut.gpu_share.GpuShare` policy, until other programs have left the GPU alone;
- loading the model at the first frame that needs it (a plan the salvage store covers never loads it),
  with the sequential or the parallel engine (``parallel``);
- yielding between frames: a pre-warm saves its progress, hands the GPU to an interactive run or another
  program, unloads the model when its memory is what they need, and takes the GPU back when it may.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from cinecut import faults
from cinecut.analyze_options import AnalyzeOptions
from cinecut.gpu_lockpath import default_gpu_lock_path, prepare_lock_dir
from cinecut.gpu_share import Busy, GpuShare
from cinecut.inference.cache import Result
from cinecut.inference.models import SceneDescription
from cinecut.inference.partial import PartialWriter
from cinecut.inference.salvage import frame_key
from cinecut.locks import FileLock, GpuLock, LockBusy, describe_holder
from cinecut.models import KeyframeRecord
from cinecut.pipeline_errors import AnalysisStopped, BusyError, ModelError
from cinecut.polling import Polled, poll_acquire
from cinecut.progress import EventKind, ProgressCallback, ProgressEvent, RateMeter


class Engine(Protocol):
    """What the session needs of a loaded vision model (:class:`cinecut.inference.engine.LlavaEngine`)."""

    def describe(self, image_path: Path) -> SceneDescription | None: ...

    def close(self) -> None: ...


EngineFactory = Callable[..., Engine]


def offloads_to_gpu() -> bool:
    """Whether a loaded model can hold GPU memory (a CPU-only llama.cpp build never does)."""
    from cinecut.inference.engine import gpu_offload_supported

    return gpu_offload_supported()


def llava_factory(model: Path, mmproj: Path, *, parallel: int = 1, **kwargs: Any) -> Engine:
    """The real engine: ``parallel`` frames in one batch, or one at a time with ``parallel = 1``.

    One frame at a time goes through the same engine with one sequence: the answers
    :class:`cinecut.inference.engine.LlavaEngine` (llama-cpp-python's chat completion, the reference
    the tests compare against) gives, at upstream's speed instead of about half of it, since it reuses
    the prompt's prefix and checks the grammar after the sampler as llama-server does, with every core
    (``bench/bench_prewarm_throughput.py``: sides ``engine`` and ``parallel-1``)."""
    from cinecut.inference.parallel import ParallelLlavaEngine

    return ParallelLlavaEngine(model, mmproj, parallel=parallel, **kwargs)


def _prefetch(
    engine: Engine, records: Sequence[KeyframeRecord], salvaged: Mapping[int, SceneDescription]
) -> None:
    """Tell an engine that batches frames which ones it will be asked for next, in order (salvaged
    frames never reach it); a one-at-a-time engine has no use for it."""
    prefetch = getattr(engine, "prefetch", None)
    if prefetch is not None:
        prefetch([Path(r.frame_path) for r in records if frame_key(r.timestamp_s) not in salvaged])


class InferenceSession:
    """The GPU and the model for one film's run; :meth:`describe_frames` is Stage 4's inner loop."""

    def __init__(
        self,
        options: AnalyzeOptions,
        film: Path,
        *,
        emit: ProgressCallback,
        should_stop: Callable[[], bool],
        engine_factory: EngineFactory | None = None,
        gpu_share: GpuShare | None = None,
    ) -> None:
        self.model = options.model
        self.mmproj = options.mmproj
        self.gpu_lock_path = options.gpu_lock_path or default_gpu_lock_path()
        self.interactive = options.interactive
        self.gpu_wait = options.gpu_wait
        self.engine_kwargs = options.engine_kwargs
        self.keep_model_on_yield = options.keep_model_on_yield
        self.purpose = f"{options.purpose} {film.name}"
        self.emit = emit
        self.should_stop = should_stop
        self.engine_factory = engine_factory or llava_factory
        self.gpu_share = gpu_share if gpu_share is not None and gpu_share.enabled else None
        self.meter = RateMeter()

    # -- the model --------------------------------------------------------------------------------

    def check_model(self) -> None:
        """ModelError unless a model pair is given and present: checked before any stage runs."""
        if self.model is None or self.mmproj is None:
            raise ModelError(
                "no valid SceneDescription cache, so LLaVA inference must run: give --model and --mmproj "
                "(or set CINECUT_MODEL and CINECUT_MMPROJ)"
            )
        for role, path in (("model", self.model), ("mmproj", self.mmproj)):
            if not path.is_file():
                raise ModelError(f"{role} {path}: no such file")

    def _load(self) -> Engine:
        from cinecut.inference.engine import EngineLoadError

        assert self.model is not None and self.mmproj is not None
        self.emit(ProgressEvent(EventKind.MODEL_LOADING, path=str(self.model)))
        try:
            engine = self.engine_factory(self.model, self.mmproj, **self.engine_kwargs)
        except EngineLoadError as exc:
            raise ModelError(str(exc)) from exc
        self.emit(ProgressEvent(EventKind.MODEL_LOADED, path=str(self.model)))
        return engine

    # -- the frames -------------------------------------------------------------------------------

    def describe_frames(
        self,
        writer: PartialWriter,
        records: list[KeyframeRecord],
        results: list[Result],
        salvaged: Mapping[int, SceneDescription],
        after_frame: Callable[[], None],
    ) -> None:
        """Describe the frames after ``results``, in plan order, appending each to ``writer`` and ``results``;
        salvaged frames never reach the model. ``after_frame`` runs after every frame (the film's stamp
        check). The GPU is taken and the model loaded at the first frame that needs them.
        """
        gpu = GpuLock(self.gpu_lock_path, purpose=self.purpose, interactive=self.interactive)
        meter = self.meter
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
                        engine = self._load()
                        _prefetch(engine, records[len(results) :], salvaged)
                        meter.start()
                    other = self.gpu_share.busy() if self.gpu_share is not None else None
                    if other is not None or gpu.should_yield():
                        engine = self._yield_gpu(gpu, writer, engine, len(results), total, other)
                        _prefetch(engine, records[len(results) :], salvaged)
                    desc = engine.describe(Path(rec.frame_path))
                    meter.tick()
                    to_compute -= 1
                writer.append(rec, desc)
                results.append((rec, desc))
                faults.point("prewarm.after_frame")
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
                after_frame()
        finally:
            if engine is not None:
                engine.close()
            gpu.release()

    # -- the GPU ----------------------------------------------------------------------------------

    def _acquire_gpu(self, gpu: GpuLock) -> None:
        """Take the GPU before the first frame: an interactive run asks and waits up to ``gpu_wait``; a
        pre-warm waits out the lock's holder and, with a share policy, other programs on the GPU."""
        prepare_lock_dir(self.gpu_lock_path)
        if self.interactive:
            probe = FileLock(self.gpu_lock_path, purpose="probe")
            if probe.try_acquire():
                probe.release()
            else:
                self.emit(ProgressEvent(EventKind.WAITING_GPU, message=describe_holder(gpu.holder())))
            try:
                gpu.acquire(self.gpu_wait)
            except LockBusy as exc:
                raise BusyError(
                    f"the GPU ({self.gpu_lock_path}) is held by {describe_holder(exc.holder)}"
                ) from exc
            return
        share = self.gpu_share
        waited = False

        def announce(failed: int, _waited_s: float) -> None:
            nonlocal waited
            if failed == 0:
                waited = True
                other = share.last if share is not None and not share.quiet() else None
                self.emit(
                    ProgressEvent(
                        EventKind.WAITING_GPU,
                        message=other.who if other else describe_holder(gpu.holder()),
                        reason=other.reason if other else None,
                    )
                )

        if self._poll_gpu(gpu, announce) is Polled.STOPPED:
            raise AnalysisStopped("stopped while waiting for the GPU")
        if waited:
            self.emit(ProgressEvent(EventKind.RESUMED))

    def _poll_gpu(self, gpu: GpuLock, on_wait: Callable[[int, float], None]) -> Polled:
        """Wait, as a pre-warm, until the GPU lock is ours and the share policy finds the GPU quiet."""
        share = self.gpu_share
        return poll_acquire(
            lambda: (share is None or share.quiet()) and gpu.try_acquire(),
            should_stop=self.should_stop,
            on_wait=on_wait,
        )

    def _yield_gpu(
        self,
        gpu: GpuLock,
        writer: PartialWriter,
        engine: Engine | None,
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
        self.meter.pause()
        share = self.gpu_share
        unloads = engine is not None and not self.keep_model_on_yield and offloads_to_gpu()
        if engine is not None and unloads and other is None:
            engine.close()  # its VRAM is what the interactive run needs
            engine = None
        gpu.release()
        self.emit(
            ProgressEvent(
                EventKind.YIELDED,
                done=done,
                total=total,
                message=other.who if other else "",
                reason=other.reason if other else "interactive",
            )
        )

        def maybe_unload(_failed: int, waited_s: float) -> None:
            nonlocal engine
            if (
                engine is not None
                and unloads
                and share is not None
                and (waited_s >= share.config.unload_after_s or gpu.someone_waiting())
            ):
                engine.close()  # a long pause, or an interactive run wants the GPU: free the VRAM
                engine = None

        if self._poll_gpu(gpu, maybe_unload) is Polled.STOPPED:
            raise AnalysisStopped(f"stopped after {done} of {total} frames (GPU yielded)", done, total)
        self.emit(ProgressEvent(EventKind.RESUMED, done=done, total=total))
        self.meter.start()
        return engine if engine is not None else self._load()
