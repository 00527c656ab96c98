"""Describe several keyframes at once: one llama.cpp context, one sequence per frame in flight.

Decoding one token costs about as much as decoding one token for each of N sequences in the same
batch when memory bandwidth is the limit (how ``llama-server -np N`` gets its throughput). This engine
keeps up to ``parallel`` frames in flight in one context (``n_seq_max = parallel + 1``, a KV stream per
sequence, one more for the prompt's shared prefix): every step decodes the next token of every active
frame in one ``llama_batch`` with per-token sequence ids, and each sequence samples through its own
sampler chain and SceneDescription grammar (:mod:`cinecut.inference.seq_sampling`). Free slots take
the next queued frames at once (continuous batching); frames admitted together have their prompts
evaluated together (:mod:`cinecut.inference.prefill`). A helper thread reads, decodes and tokenizes
the next JPEGs while the main thread decodes text, and CLIP-encodes them too where the model is
offloaded (:mod:`cinecut.inference.frame_feed`). A batch llama.cpp refuses is retried frame by frame.

The interface is :class:`cinecut.inference.engine.LlavaEngine`'s: ``describe(path)`` returns that
frame's SceneDescription or None, frames are asked for in keyframe order, and ``prefetch(paths)``
announces the frames that follow so they can be in flight meanwhile. Results therefore come back in
keyframe order and the caller writes them exactly as before (partial file, stamp checks, GPU yields:
``close()`` drops what is in flight; those frames are simply computed again after a reload).

Prompt and sampling are the current engine's (Llava15ChatHandler's template, penalties 1.1 over the
last 64 tokens, grammar, top-k 40, top-p 0.95, min-p 0.05, temperature, seeded dist per frame), so a
frame's answer does not depend on which other frames share its batch. A frame whose decode fails inside
a shared batch is retried alone; an unreadable image or an invalid answer is None, as before.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Final

from cinecut.inference.engine import (
    DEFAULT_PROMPT,
    EngineLoadError,
    _check_model_file,
    _native_tail,
    _route_native_logs,
)
from cinecut.inference.frame_feed import SYSTEM_MESSAGE, FrameFeeder, Prepared
from cinecut.inference.models import SceneDescription, parse_scene_description
from cinecut.inference.parallel_sizing import (
    CPU_AUTO_PARALLEL,
    CPU_MAX_AUTO_PARALLEL,
    MAX_AUTO_PARALLEL,
    MAX_PARALLEL,
    VRAM_RESERVE,
    available_ram_bytes,
    choose_parallel,
    free_vram_bytes,
    kv_cache_bytes,
)
from cinecut.inference.prefill import Prefiller
from cinecut.inference.seq_sampling import DEFAULT_TEMPERATURE, SamplingParams, SequenceSampler, Vocabulary
from cinecut.inference.seqcontext import DecodeFailed, SequenceContext

__all__ = [
    "CPU_AUTO_PARALLEL", "CPU_MAX_AUTO_PARALLEL", "MAX_AUTO_PARALLEL", "MAX_PARALLEL", "SYSTEM_MESSAGE",
    "VRAM_RESERVE", "ParallelLlavaEngine", "available_ram_bytes", "choose_parallel", "free_vram_bytes",
    "kv_cache_bytes",
]  # fmt: skip

log = logging.getLogger(__name__)

#: Per-sequence context is what a frame needs (prompt + image + answer) rounded up to this.
_CTX_ROUND: Final = 256


@dataclass(slots=True)
class _Job:
    path: Path
    prepared: concurrent.futures.Future[Prepared] | None = None


@dataclass(slots=True)
class _Slot:
    """One sequence of the context and the frame in it, if any."""

    seq: int
    job: _Job | None = None
    sampler: SequenceSampler | None = None
    n_past: int = 0
    tokens: list[int] = field(default_factory=list)
    started: float = 0.0


class ParallelLlavaEngine:
    """A loaded LLaVA-1.5 model that keeps up to ``parallel`` keyframes in flight; see the module doc.

    Not reentrant (one caller thread); close() from another thread waits for the step in flight.
    """

    def __init__(
        self,
        model_path: Path,
        mmproj_path: Path,
        *,
        parallel: int = 4,
        n_ctx: int = 2048,
        n_gpu_layers: int = -1,
        max_tokens: int = 256,
        seed: int = 0,
        prompt: str = DEFAULT_PROMPT,
        temperature: float = DEFAULT_TEMPERATURE,
        n_threads: int | None = None,
        on_answer: Callable[[Path, str, str], None] | None = None,
    ) -> None:
        if parallel < 0:
            raise ValueError("parallel must be at least 1 (or 0: chosen from the free memory)")
        self.model_path = Path(model_path)
        self.mmproj_path = Path(mmproj_path)
        self.parallel = parallel
        self.max_tokens = max_tokens
        self.seed = seed
        self.prompt = prompt
        self.temperature = temperature
        #: Called with (frame, raw answer, "stop" | "length") for every answer the model gives.
        self.on_answer = on_answer
        self._lock = threading.RLock()
        self._closed = False
        self._pending: collections.deque[_Job] = collections.deque()
        self._results: dict[Path, collections.deque[SceneDescription | None]] = {}
        self._sampling = SamplingParams(temperature=temperature, seed=seed)
        self.stats = {"frames": 0, "tokens": 0, "decode_steps": 0, "retried_alone": 0, "grammar_resamples": 0}
        self._step_s = 0.0
        self._slots: list[_Slot] = []
        self._feed: FrameFeeder | None = None

        _check_model_file(self.model_path, "model", want_clip=False)
        _check_model_file(self.mmproj_path, "mmproj", want_clip=True)
        try:
            import llama_cpp
        except ImportError as exc:
            raise EngineLoadError(
                f"cannot load {self.model_path}: llama_cpp is not importable ({exc})"
            ) from exc
        _route_native_logs()
        _native_tail.clear()
        llama_cpp.llama_backend_init()
        threads = n_threads or os.cpu_count() or 1
        self._sc = SequenceContext(
            self.model_path, self.mmproj_path, n_gpu_layers=n_gpu_layers, threads=threads
        )
        try:
            self._voc = Vocabulary(llama_cpp, self._sc.model)
            offloaded = n_gpu_layers != 0 and bool(llama_cpp.llama_supports_gpu_offload())
            self._feed = FrameFeeder(self._sc, prompt, encode_on_helper=offloaded)
            self._create(n_gpu_layers)
        except BaseException:
            if self._feed is not None:
                self._feed.shutdown()
            self._sc.free()
            raise
        self._slots = [_Slot(seq=i) for i in range(self.parallel)]

    def _create(self, n_gpu_layers: int) -> None:
        """Size the per-frame context and the number of sequences, create the context, share the prefix."""
        assert self._feed is not None
        lc = self._sc.lc
        self.prompt_tokens = self._feed.prompt_tokens
        need = self.prompt_tokens + self.max_tokens + 1
        self.n_ctx_seq = -(-need // _CTX_ROUND) * _CTX_ROUND
        kv_per_seq = self._sc.kv_bytes_per_cell() * self.n_ctx_seq
        if self.parallel == 0:
            on_gpu = n_gpu_layers != 0 and bool(lc.llama_supports_gpu_offload())
            self.parallel, why = choose_parallel(
                on_gpu=on_gpu,
                free_vram=free_vram_bytes() if on_gpu else None,
                kv_per_sequence=kv_per_seq,
                available_ram=None if on_gpu else available_ram_bytes(),
            )
            log.info("parallel = auto: %d sequences (%s)", self.parallel, why)
        # One more stream holds the prompt's text before the image (system message, "USER: "), the same
        # for every frame: each frame's sequence starts as a copy of it instead of evaluating it again.
        self.kv_bytes = kv_per_seq * (self.parallel + 1)
        log.info(
            "parallel engine: %d sequences (+1 for the shared prompt prefix) x %d tokens of context "
            "(prompt %d incl. image, answer %d): KV cache %.0f MiB",
            self.parallel, self.n_ctx_seq, self.prompt_tokens, self.max_tokens, self.kv_bytes / 2**20,
        )  # fmt: skip
        self._sc.create(self.parallel + 1, self.n_ctx_seq, self.kv_bytes)
        self._prefill = Prefiller(self._sc, self._feed.prefix_tokens, prefix_seq=self.parallel)

    @property
    def timings(self) -> dict[str, float]:
        """Seconds spent per part of the work (the image part runs on the helper thread, overlapped)."""
        return {
            "image_s": self._feed.image_s if self._feed is not None else 0.0,
            "prefill_s": self._prefill.prefill_s if hasattr(self, "_prefill") else 0.0,
            "step_s": self._step_s,
        }

    # -- public interface ------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def prefetch(self, paths: list[Path] | tuple[Path, ...]) -> None:
        """Queue the frames that will be asked for next, in order, so they can be in flight meanwhile."""
        with self._lock:
            self._require_open()
            queued = {j.path for j in self._pending} | {s.job.path for s in self._slots if s.job}
            for p in paths:
                p = Path(p)
                if p not in queued and p not in self._results:
                    self._pending.append(_Job(p))
                    queued.add(p)
            self._start_prep()

    def describe(self, image_path: Path) -> SceneDescription | None:
        """This frame's SceneDescription, or None when it cannot be described; never an exception."""
        image_path = Path(image_path)
        with self._lock:
            self._require_open()
            if not self._known(image_path):
                self._pending.appendleft(_Job(image_path))
            while image_path not in self._results:
                self._step()
            got = self._results[image_path]
            desc = got.popleft()
            if not got:
                del self._results[image_path]
            return desc

    def describe_all(self, paths: list[Path]) -> list[SceneDescription | None]:
        """Every frame, in order (what the benchmark and tests use)."""
        self.prefetch(paths)
        return [self.describe(p) for p in paths]

    def _known(self, path: Path) -> bool:
        return (
            path in self._results
            or any(j.path == path for j in self._pending)
            or any(s.job is not None and s.job.path == path for s in self._slots)
        )

    def _require_open(self) -> None:
        if self._closed:
            raise RuntimeError("ParallelLlavaEngine used after close()")

    # -- continuous batching -------------------------------------------------------------------------

    def _start_prep(self) -> None:
        """Keep the next ``parallel + 1`` queued frames being prepared on the helper thread."""
        assert self._feed is not None
        for job in list(self._pending)[: self.parallel + 1]:
            if job.prepared is None:
                job.prepared = self._feed.submit(job.path)

    def _step(self) -> None:
        """Fill free slots with queued frames, then decode one token for every frame in flight."""
        while self._pending:
            free = [s for s in self._slots if s.job is None]
            if not free:
                break
            self._admit([(slot, self._pending.popleft()) for slot in free[: len(self._pending)]])
        self._start_prep()
        active = [s for s in self._slots if s.job is not None]
        if not active:
            return
        started = time.perf_counter()
        try:
            self._sc.decode([(s.tokens[-1], s.n_past, s.seq, True) for s in active])
        except DecodeFailed as exc:
            log.warning("a batch of %d frames failed (%s): retrying each alone", len(active), exc)
            self._retry_each_alone(active)
            return
        self.stats["decode_steps"] += 1
        for i, s in enumerate(active):
            s.n_past += 1
            self._sample(s, i)
        self._step_s += time.perf_counter() - started

    def _admit(self, pairs: list[tuple[_Slot, _Job]]) -> None:
        """Put frames into free slots: their prompts evaluated together, each first token sampled."""
        assert self._feed is not None
        items: list[tuple[_Slot, Prepared]] = []
        for slot, job in pairs:
            prepared = self._feed.encode((job.prepared or self._feed.submit(job.path)).result())
            if prepared.error is not None:
                log.warning("frame %s: %s", job.path, prepared.error)
                self._finish(job, None)
                continue
            slot.job = job
            slot.started = time.perf_counter()
            items.append((slot, prepared))
        if not items:
            return

        def ready(i: int, row: int, n_past: int) -> None:
            self._first_token(items[i][0], row, n_past)

        try:
            self._prefill.prefill([(slot.seq, prepared) for slot, prepared in items], ready)
        except DecodeFailed as exc:
            log.warning("prompt evaluation of %d frames failed (%s): retrying each alone", len(items), exc)
            self._retry_each_alone([slot for slot, _ in items])
        finally:
            for _, prepared in items:
                self._feed.free(prepared)

    def _retry_each_alone(self, slots: list[_Slot]) -> None:
        jobs = [s.job for s in slots if s.job is not None]
        for s in slots:
            if s.job is not None:
                self._release(s)
        for job in jobs:
            self._retry_alone(job)

    def _retry_alone(self, job: _Job) -> None:
        """Run one frame with no other sequence in the batch, in a free slot."""
        assert self._feed is not None
        self.stats["retried_alone"] += 1
        slot = next(s for s in self._slots if s.job is None)
        prepared = self._feed.encode(self._feed.submit(job.path).result())  # the one CLIP thread
        if prepared.error is not None:
            self._finish(job, None)
            return
        slot.job = job
        slot.started = time.perf_counter()

        try:
            self._prefill.prefill(
                [(slot.seq, prepared)], lambda _i, row, n_past: self._first_token(slot, row, n_past)
            )
            while slot.job is job:
                self._sc.decode([(slot.tokens[-1], slot.n_past, slot.seq, True)])
                slot.n_past += 1
                self._sample(slot, 0)
        except DecodeFailed as exc:
            log.warning("frame %s: the model failed on it alone too: %s", job.path, exc)
            if slot.job is job:
                self._release(slot)
            self._finish(job, None)
        finally:
            self._feed.free(prepared)

    # -- one frame's answer ---------------------------------------------------------------------------

    def _first_token(self, slot: _Slot, row: int, n_past: int) -> None:
        """The slot's prompt is in: fresh samplers for its frame, its first token from batch row ``row``."""
        slot.n_past = n_past
        slot.sampler = SequenceSampler(self._voc, self._sampling)
        slot.tokens = []
        self._sample(slot, row)

    def _sample(self, slot: _Slot, idx: int) -> None:
        """Sample the slot's next token from batch row ``idx``; finish the frame at EOS or max_tokens."""
        assert slot.sampler is not None
        token = slot.sampler.sample(self._sc.logits(idx))
        if self._voc.is_eog(token):
            self._complete(slot, "stop")
            return
        slot.tokens.append(token)
        if len(slot.tokens) >= self.max_tokens or slot.n_past + 1 >= self.n_ctx_seq:
            self._complete(slot, "length")

    def _complete(self, slot: _Slot, reason: str) -> None:
        job = slot.job
        assert job is not None
        tokens = slot.tokens
        content = self._voc.detokenize(tokens)
        elapsed_ms = (time.perf_counter() - slot.started) * 1000
        self._release(slot)
        self.stats["tokens"] += len(tokens)
        if self.on_answer is not None:
            self.on_answer(job.path, content, reason)
        description = parse_scene_description(content)
        if description is None:
            why = (
                "the answer hit max_tokens"
                if reason == "length"
                else "the answer is not a valid SceneDescription"
            )
            log.warning("frame %s: %s: %.200r", job.path, why, content)
        else:
            log.debug("frame %s described in %.1f ms", job.path, elapsed_ms)
        self._finish(job, description)

    def _finish(self, job: _Job, description: SceneDescription | None) -> None:
        self.stats["frames"] += 1
        self._results.setdefault(job.path, collections.deque()).append(description)

    def _release(self, slot: _Slot) -> None:
        """Free the slot: its KV cells, its samplers."""
        self._sc.drop_seq(slot.seq)
        if slot.sampler is not None:
            self.stats["grammar_resamples"] += slot.sampler.resamples
            slot.sampler.free()
        slot.sampler = None
        slot.job = None
        slot.tokens = []
        slot.n_past = 0

    # -- teardown --------------------------------------------------------------------------------------

    def close(self) -> None:
        """Drop the frames in flight and free the context, the CLIP context and the model (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._feed is not None:
                self._feed.shutdown()
                for job in self._pending:
                    if job.prepared is not None and job.prepared.done() and not job.prepared.cancelled():
                        self._feed.free(job.prepared.result())
            self._pending.clear()
            for slot in self._slots:
                if slot.sampler is not None:
                    slot.sampler.free()
                    slot.sampler = None
            self._sc.free()

    def __enter__(self) -> ParallelLlavaEngine:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if hasattr(self, "_sc"):
                self.close()
        except Exception:
            pass
