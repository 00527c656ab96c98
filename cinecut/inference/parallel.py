"""Describe several keyframes at once: one llama.cpp context, one sequence per frame in flight.

Decoding one token costs about as much as decoding one token for each of N sequences in the same
batch when memory bandwidth is the limit (how ``llama-server -np N`` gets its throughput). This engine
keeps up to ``parallel`` frames in flight in one context (``n_seq_max = parallel``, a KV stream per
sequence): every step decodes the next token of every active frame in one ``llama_batch`` with
per-token sequence ids, and each sequence samples through its own sampler chain, with its own
SceneDescription grammar. A finished frame's slot takes the next queued frame at once (continuous
batching). A helper thread reads the next JPEGs, decodes them and runs the CLIP encoder while the main
thread decodes text; the image embeddings then go into the frame's own sequence
(``mtmd_helper_decode_image_chunk`` with its sequence id).

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
import ctypes
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from cinecut.inference.engine import (
    DEFAULT_PROMPT,
    MAX_IMAGE_BYTES,
    EngineLoadError,
    _check_model_file,
    _image_mime,
    _native_errors,
    _native_tail,
    _route_native_logs,
)
from cinecut.inference.models import SCENE_DESCRIPTION_SCHEMA, SceneDescription, parse_scene_description

log = logging.getLogger(__name__)

#: Llava15ChatHandler's default system message and template, rendered for one image and one text part.
SYSTEM_MESSAGE: Final = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions."
)
#: Sampling as ``Llama.create_chat_completion`` through Llava15ChatHandler does it by default.
REPEAT_PENALTY: Final = 1.1
PENALTY_LAST_N: Final = 64
TOP_K: Final = 40
TOP_P: Final = 0.95
MIN_P: Final = 0.05
DEFAULT_TEMPERATURE: Final = 0.2
#: Per-sequence context is what a frame needs (prompt + image + answer) rounded up to this.
_CTX_ROUND: Final = 256
_N_BATCH: Final = 512


#: The most frames one engine keeps in flight.
MAX_PARALLEL: Final = 64
#: ``parallel = 0`` picks the number of sequences: on a GPU from the free VRAM, at most this many...
MAX_AUTO_PARALLEL: Final = 8
#: ...and on the CPU this many (measured on two cores, 0.5 B model: 8 in flight 2.0x the sequential
#: upstream path, 16 2.4x; a 7B model's KV cache is ~0.5 GiB per sequence, in RAM there).
CPU_AUTO_PARALLEL: Final = 8
#: VRAM kept free beside the KV cache: CUDA context, compute buffers, CLIP activations.
VRAM_RESERVE: Final = 1 << 30


def choose_parallel(*, on_gpu: bool, free_vram: int | None, kv_per_sequence: int) -> tuple[int, str]:
    """How many frames to keep in flight when the configuration says 0 (auto), and why (for the log).

    On a GPU: as many KV caches as fit in the free VRAM left after the model is loaded, less a reserve,
    between 1 and MAX_AUTO_PARALLEL. Without a VRAM figure on a GPU: 2, a safe gain. On the CPU: a small
    fixed number, since RAM is rarely the limit there and two cores cap the gain.
    """
    if not on_gpu:
        return CPU_AUTO_PARALLEL, "CPU inference"
    if free_vram is None:
        return 2, "free VRAM unknown (nvidia-ml-py missing or no NVIDIA GPU)"
    fits = (free_vram - VRAM_RESERVE) // max(kv_per_sequence, 1)
    n = max(1, min(MAX_AUTO_PARALLEL, int(fits)))
    return (
        n,
        f"{free_vram / 2**20:,.0f} MiB VRAM free after loading, {kv_per_sequence / 2**20:,.0f} MiB KV per sequence",
    )


def free_vram_bytes() -> int | None:
    """Free memory summed over the visible NVIDIA GPUs (NVML), None when it cannot be known."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        allowed = {int(x) for x in visible.split(",") if x.strip().isdigit()} if visible is not None else None
        total = 0
        for i in range(pynvml.nvmlDeviceGetCount()):
            if allowed is not None and i not in allowed:
                continue
            total += int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).free)
        return total or None
    except Exception:
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def kv_cache_bytes(n_layer: int, n_embd_kv: int, cells: int, bytes_per_value: int = 2) -> int:
    """Bytes of an f16 K+V cache holding ``cells`` tokens for a model of these dimensions."""
    return 2 * n_layer * n_embd_kv * cells * bytes_per_value


@dataclass(slots=True)
class _Prepared:
    """A frame ready for its sequence: tokenized prompt parts, the image already through CLIP."""

    chunks: Any = None  # mtmd_input_chunks*, freed after the prefill
    parts: list[tuple[str, Any, Any]] = field(
        default_factory=list
    )  # ("text", tokens, None) | ("image", chunk, embd)
    error: str | None = None


@dataclass(slots=True)
class _Job:
    path: Path
    prepared: concurrent.futures.Future[_Prepared] | None = None


@dataclass(slots=True)
class _Slot:
    seq: int
    job: _Job | None = None
    sampler: Any = None  # the chain without the grammar
    grammar: Any = None
    n_past: int = 0
    tokens: list[int] = field(default_factory=list)
    started: float = 0.0


class _DecodeFailed(RuntimeError):
    """llama_decode refused a batch; every frame in it is retried alone."""


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
        self._model: Any = None
        self._ctx: Any = None
        self._mtmd: Any = None
        self._batch: Any = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.stats = {"frames": 0, "tokens": 0, "decode_steps": 0, "retried_alone": 0, "grammar_resamples": 0}
        #: Seconds spent per part of the work (the image part runs on the helper thread, overlapped).
        self.timings = {"image_s": 0.0, "prefill_s": 0.0, "step_s": 0.0}

        _check_model_file(self.model_path, "model", want_clip=False)
        _check_model_file(self.mmproj_path, "mmproj", want_clip=True)
        try:
            import llama_cpp
            from llama_cpp import llama_grammar, mtmd_cpp
        except ImportError as exc:
            raise EngineLoadError(
                f"cannot load {self.model_path}: llama_cpp is not importable ({exc})"
            ) from exc
        self._l, self._m = llama_cpp, mtmd_cpp
        _route_native_logs()
        _native_tail.clear()
        llama_cpp.llama_backend_init()
        threads = n_threads or os.cpu_count() or 1
        try:
            self._load(n_gpu_layers, n_ctx, threads)
            grammar = llama_grammar.LlamaGrammar.from_json_schema(
                json.dumps(SCENE_DESCRIPTION_SCHEMA), verbose=False
            )
            self._grammar = (grammar._grammar.encode(), grammar._root.encode())
        except BaseException:
            self._free()
            raise
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="cinecut-frame-prep"
        )
        self._slots = [_Slot(seq=i) for i in range(self.parallel)]

    # -- loading ---------------------------------------------------------------------------------

    def _load(self, n_gpu_layers: int, n_ctx: int, threads: int) -> None:
        lc, mt = self._l, self._m
        mparams = lc.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        self._model = lc.llama_model_load_from_file(str(self.model_path).encode(), mparams)
        if not self._model:
            self._model = None
            raise EngineLoadError(
                f"model {self.model_path}: llama.cpp could not load it ({_native_errors()})"
            )
        self._vocab = lc.llama_model_get_vocab(self._model)
        self._n_vocab = lc.llama_vocab_n_tokens(self._vocab)
        cparams = mt.mtmd_context_params_default()
        cparams.use_gpu = n_gpu_layers != 0
        cparams.print_timings = False
        cparams.n_threads = threads
        self._mtmd = mt.mtmd_init_from_file(str(self.mmproj_path).encode(), self._model, cparams)
        if not self._mtmd:
            self._mtmd = None
            raise EngineLoadError(
                f"mmproj {self.mmproj_path}: libmtmd could not load it with {self.model_path.name} "
                f"({_native_errors()})"
            )
        self._marker = mt.mtmd_default_marker().decode()
        self._text = f"{SYSTEM_MESSAGE}\nUSER: {self._marker}{self.prompt}\nASSISTANT: ".encode()
        self.prompt_tokens = self._count_prompt_tokens()
        need = self.prompt_tokens + self.max_tokens + 1
        self.n_ctx_seq = -(-need // _CTX_ROUND) * _CTX_ROUND
        n_layer = lc.llama_model_n_layer(self._model)
        n_embd_kv = (
            lc.llama_model_n_embd(self._model)
            // lc.llama_model_n_head(self._model)
            * lc.llama_model_n_head_kv(self._model)
        )
        kv_per_seq = kv_cache_bytes(n_layer, n_embd_kv, self.n_ctx_seq)
        if self.parallel == 0:
            on_gpu = n_gpu_layers != 0 and bool(lc.llama_supports_gpu_offload())
            self.parallel, why = choose_parallel(
                on_gpu=on_gpu, free_vram=free_vram_bytes() if on_gpu else None, kv_per_sequence=kv_per_seq
            )
            log.info("parallel = auto: %d sequences (%s)", self.parallel, why)
        # One more stream holds the prompt's text before the image (system message, "USER: "), the same
        # for every frame: each frame's sequence starts as a copy of it instead of evaluating it again.
        self._prefix_seq = self.parallel
        self.kv_bytes = kv_per_seq * (self.parallel + 1)
        log.info(
            "parallel engine: %d sequences (+1 for the shared prompt prefix) x %d tokens of context "
            "(prompt %d incl. image, answer %d): KV cache %.0f MiB",
            self.parallel, self.n_ctx_seq, self.prompt_tokens, self.max_tokens, self.kv_bytes / 2**20,
        )  # fmt: skip
        params = lc.llama_context_default_params()
        params.n_ctx = self.n_ctx_seq * (self.parallel + 1)
        params.n_batch = _N_BATCH
        params.n_ubatch = _N_BATCH
        params.n_seq_max = self.parallel + 1
        params.n_threads = threads
        params.n_threads_batch = threads
        params.kv_unified = False  # one KV stream per sequence: attention never spans other frames
        self._ctx = lc.llama_init_from_model(self._model, params)
        if not self._ctx:
            self._ctx = None
            raise EngineLoadError(
                f"model {self.model_path}: cannot create a context for {self.parallel} sequences "
                f"({self.kv_bytes / 2**20:.0f} MiB of KV cache): {_native_errors()}"
            )
        self._mem = lc.llama_get_memory(self._ctx)
        self._batch = lc.llama_batch_init(max(_N_BATCH, self.parallel), 0, 1)
        self._init_candidates()
        if self._prefix_tokens:
            try:
                self._decode([(t, i, self._prefix_seq, False) for i, t in enumerate(self._prefix_tokens)])
            except _DecodeFailed as exc:
                log.warning(
                    "the shared prompt prefix could not be evaluated (%s): each frame evaluates it", exc
                )
                self._prefix_tokens = []

    def _init_candidates(self) -> None:
        """Reusable llama_token_data arrays (the whole vocabulary, and one token) with numpy views."""
        import numpy as np

        lc = self._l
        dtype = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
        assert dtype.itemsize == ctypes.sizeof(lc.llama_token_data)
        self._cand_buf = (lc.llama_token_data * self._n_vocab)()
        self._cand = np.frombuffer(self._cand_buf, dtype=dtype)
        self._cand_ptr = ctypes.cast(self._cand_buf, lc.llama_token_data_p)
        self._one_buf = (lc.llama_token_data * 1)()
        self._one = np.frombuffer(self._one_buf, dtype=dtype)
        self._one_ptr = ctypes.cast(self._one_buf, lc.llama_token_data_p)
        self._ids = np.arange(self._n_vocab, dtype=np.int32)

    def _count_prompt_tokens(self) -> int:
        """Positions the prompt takes with one image (LLaVA-1.5's image token count is fixed)."""
        mt = self._m
        pixels = (ctypes.c_uint8 * (64 * 64 * 3))()
        bitmap = mt.mtmd_bitmap_init(64, 64, pixels)
        chunks = mt.mtmd_input_chunks_init()
        try:
            if self._tokenize(chunks, bitmap) != 0:
                raise EngineLoadError(f"mmproj {self.mmproj_path}: libmtmd cannot tokenize the prompt")
            self._prefix_tokens = []
            first = mt.mtmd_input_chunks_get(chunks, 0)
            if mt.mtmd_input_chunk_get_type(first) == mt.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t()
                ptr = mt.mtmd_input_chunk_get_tokens_text(first, ctypes.byref(n))
                self._prefix_tokens = [ptr[j] for j in range(n.value)]
            return int(mt.mtmd_helper_get_n_pos(chunks))
        finally:
            mt.mtmd_input_chunks_free(chunks)
            mt.mtmd_bitmap_free(bitmap)

    def _tokenize(self, chunks: Any, bitmap: Any) -> int:
        mt = self._m
        text = mt.mtmd_input_text()
        text.text = self._text
        text.text_len = len(self._text)
        text.add_special = True
        text.parse_special = True
        bitmaps = (mt.mtmd_bitmap_p_ctypes * 1)(bitmap)
        return int(mt.mtmd_tokenize(self._mtmd, chunks, ctypes.byref(text), bitmaps, 1))

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

    # -- the scheduler -----------------------------------------------------------------------------

    def _start_prep(self) -> None:
        """Keep the next ``parallel + 1`` queued frames being prepared on the helper thread."""
        assert self._pool is not None
        for job in list(self._pending)[: self.parallel + 1]:
            if job.prepared is None:
                job.prepared = self._pool.submit(self._prepare, job.path)

    def _step(self) -> None:
        """Fill free slots with queued frames, then decode one token for every frame in flight."""
        for slot in self._slots:
            while slot.job is None and self._pending:
                self._admit(slot, self._pending.popleft())
        self._start_prep()
        active = [s for s in self._slots if s.job is not None]
        if not active:
            return
        started = time.perf_counter()
        try:
            self._decode([(s.tokens[-1], s.n_past, s.seq, True) for s in active])
        except _DecodeFailed as exc:
            log.warning("a batch of %d frames failed (%s): retrying each alone", len(active), exc)
            jobs = [s.job for s in active]
            for s in active:
                self._release(s)
            for job in jobs:
                assert job is not None
                self._retry_alone(job)
            return
        self.stats["decode_steps"] += 1
        for i, s in enumerate(active):
            s.n_past += 1
            self._sample(s, i)
        self.timings["step_s"] += time.perf_counter() - started

    def _admit(self, slot: _Slot, job: _Job) -> None:
        """Put a frame into ``slot``: its image and prompt into the slot's sequence, first token sampled."""
        prepared = (job.prepared or self._immediate(job.path)).result()
        if prepared.error is not None:
            log.warning("frame %s: %s", job.path, prepared.error)
            self._finish(job, None)
            return
        slot.job = job
        slot.started = time.perf_counter()
        try:
            idx = self._prefill(slot, prepared)
            self.timings["prefill_s"] += time.perf_counter() - slot.started
        except _DecodeFailed as exc:
            log.warning("frame %s: prompt evaluation failed (%s): retrying it alone", job.path, exc)
            self._release(slot)
            self._retry_alone(job)
            return
        finally:
            self._m.mtmd_input_chunks_free(prepared.chunks)
        self._new_sampler(slot)
        self._sample(slot, idx)

    def _immediate(self, path: Path) -> concurrent.futures.Future[_Prepared]:
        assert self._pool is not None
        return self._pool.submit(self._prepare, path)

    def _retry_alone(self, job: _Job) -> None:
        """Run one frame with no other sequence in the batch (its own slot 0 of a fresh sequence)."""
        self.stats["retried_alone"] += 1
        slot = next(s for s in self._slots if s.job is None)
        prepared = self._immediate(job.path).result()
        if prepared.error is not None:
            self._finish(job, None)
            return
        slot.job = job
        slot.started = time.perf_counter()
        try:
            idx = self._prefill(slot, prepared)
            self._new_sampler(slot)
            self._sample(slot, idx)
            while slot.job is job:
                self._decode([(slot.tokens[-1], slot.n_past, slot.seq, True)])
                slot.n_past += 1
                self._sample(slot, 0)
        except _DecodeFailed as exc:
            log.warning("frame %s: the model failed on it alone too: %s", job.path, exc)
            self._release(slot)
            self._finish(job, None)
        finally:
            self._m.mtmd_input_chunks_free(prepared.chunks)

    # -- one frame's work ----------------------------------------------------------------------------

    def _prepare(self, path: Path) -> _Prepared:
        """Helper thread: read the file, decode the image, tokenize the prompt, run the CLIP encoder."""
        started = time.perf_counter()
        try:
            return self._prepare_image(path)
        except Exception as exc:  # a frame's failure is that frame's None, never the job's end
            return _Prepared(error=f"cannot prepare it: {exc}")
        finally:
            self.timings["image_s"] += time.perf_counter() - started

    def _prepare_image(self, path: Path) -> _Prepared:
        import numpy as np

        mt = self._m
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_IMAGE_BYTES + 1)
        except OSError as exc:
            return _Prepared(error=f"cannot read it: {exc.strerror or exc}")
        if len(data) > MAX_IMAGE_BYTES:
            return _Prepared(error=f"larger than {MAX_IMAGE_BYTES} bytes, not a keyframe")
        if _image_mime(data) is None:
            return _Prepared(error="not a JPEG or PNG image")
        buf = (ctypes.c_uint8 * len(data)).from_buffer(bytearray(data))
        bitmap = mt.mtmd_helper_bitmap_init_from_buf(self._mtmd, buf, len(data), False)
        if not bitmap:
            return _Prepared(error="the image cannot be decoded")
        chunks = mt.mtmd_input_chunks_init()
        prepared = _Prepared(chunks=chunks)
        try:
            if self._tokenize(chunks, bitmap) != 0:
                prepared.error = "libmtmd cannot tokenize the prompt with this image"
                return prepared
            n_embd = self._l.llama_model_n_embd_inp(self._model)
            for i in range(mt.mtmd_input_chunks_size(chunks)):
                chunk = mt.mtmd_input_chunks_get(chunks, i)
                if mt.mtmd_input_chunk_get_type(chunk) == mt.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    n = ctypes.c_size_t()
                    ptr = mt.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                    prepared.parts.append(("text", [ptr[j] for j in range(n.value)], None))
                    continue
                if mt.mtmd_encode_chunk(self._mtmd, chunk) != 0:
                    prepared.error = f"the image encoder failed on it ({_native_errors()})"
                    return prepared
                n_tok = mt.mtmd_input_chunk_get_n_tokens(chunk)
                out = mt.mtmd_get_output_embd(self._mtmd)
                embd = np.ctypeslib.as_array(out, shape=(n_tok * n_embd,)).copy()
                prepared.parts.append(("image", chunk, embd))
            return prepared
        finally:
            mt.mtmd_bitmap_free(bitmap)
            if prepared.error is not None:
                mt.mtmd_input_chunks_free(chunks)
                prepared.chunks = None

    def _prefill(self, slot: _Slot, prepared: _Prepared) -> int:
        """Evaluate the prompt into the slot's sequence; returns the batch index holding the last logits."""
        lc, mt = self._l, self._m
        n_past = 0
        idx = -1
        last = len(prepared.parts) - 1
        shared = bool(self._prefix_tokens) and last > 0 and prepared.parts[0][1] == self._prefix_tokens
        if shared:
            lc.llama_memory_seq_cp(self._mem, self._prefix_seq, slot.seq, -1, -1)
            n_past = len(self._prefix_tokens)
        for k, (kind, payload, embd) in enumerate(prepared.parts):
            if k == 0 and shared:
                continue
            if kind == "text":
                tokens: list[int] = payload
                for start in range(0, len(tokens), _N_BATCH):
                    piece = tokens[start : start + _N_BATCH]
                    final = k == last and start + _N_BATCH >= len(tokens)
                    self._decode(
                        [
                            (t, n_past + j, slot.seq, final and j == len(piece) - 1)
                            for j, t in enumerate(piece)
                        ]
                    )
                    n_past += len(piece)
                    idx = len(piece) - 1
            else:
                new_n_past = lc.llama_pos(0)
                ptr = embd.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
                rc = mt.mtmd_helper_decode_image_chunk(
                    self._mtmd,
                    self._ctx,
                    payload,
                    ptr,
                    n_past,
                    slot.seq,
                    _N_BATCH,
                    ctypes.byref(new_n_past),
                    mt.mtmd_helper_post_decode_callback(),
                    None,
                )
                if rc != 0:
                    raise _DecodeFailed(f"image decode returned {rc} ({_native_errors()})")
                n_past = new_n_past.value
                idx = -1
        if idx < 0:
            raise _DecodeFailed("the prompt does not end in text")
        slot.n_past = n_past
        return idx

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, sequence, wants logits) entries."""
        b = self._batch
        for i, (tok, pos, seq, logits) in enumerate(entries):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = logits
        b.n_tokens = len(entries)
        rc = self._l.llama_decode(self._ctx, b)
        if rc != 0:
            raise _DecodeFailed(f"llama_decode returned {rc} ({_native_errors()})")

    def _new_sampler(self, slot: _Slot) -> None:
        """Fresh samplers per frame, as each create_chat_completion builds them: same answer in any batch.

        The grammar is a separate sampler, consulted the way llama-server's sampler does it: the chain
        picks a token from the raw logits, the grammar checks only that token, and only when it refuses
        is the grammar applied to the whole vocabulary and the chain run again. Checking one token
        instead of 32,000 is most of the sampling cost saved; with greedy sampling the token is the same.
        """
        lc = self._l
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        add = lambda s: lc.llama_sampler_chain_add(chain, s)  # noqa: E731
        add(lc.llama_sampler_init_penalties(self._n_vocab, PENALTY_LAST_N, REPEAT_PENALTY, 0.0, 0.0))
        if self.temperature <= 0:
            add(lc.llama_sampler_init_greedy())
        else:
            add(lc.llama_sampler_init_top_k(TOP_K))
            add(lc.llama_sampler_init_typical(1.0, 1))
            add(lc.llama_sampler_init_top_p(TOP_P, 1))
            add(lc.llama_sampler_init_min_p(MIN_P, 1))
            add(lc.llama_sampler_init_temp(self.temperature))
            add(lc.llama_sampler_init_dist(self.seed))
        slot.sampler = chain
        slot.grammar = lc.llama_sampler_init_grammar(self._vocab, *self._grammar)
        slot.tokens = []

    def _sample(self, slot: _Slot, idx: int) -> None:
        """Sample the slot's next token from batch row ``idx``; finish the frame at EOS or max_tokens."""
        import numpy as np

        lc = self._l
        logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(self._ctx, idx), shape=(self._n_vocab,))
        cand = self._cand
        cand["id"] = self._ids
        cand["logit"] = logits
        arr = lc.llama_token_data_array(self._cand_ptr, self._n_vocab, -1, False)
        lc.llama_sampler_apply(slot.sampler, ctypes.byref(arr))
        token = int(cand["id"][arr.selected])
        one = self._one
        one["id"] = token
        one["logit"] = 1.0
        one_arr = lc.llama_token_data_array(self._one_ptr, 1, -1, False)
        lc.llama_sampler_apply(slot.grammar, ctypes.byref(one_arr))
        if not np.isfinite(one["logit"][0]):
            self.stats["grammar_resamples"] += 1
            cand["id"] = self._ids
            cand["logit"] = logits
            arr = lc.llama_token_data_array(self._cand_ptr, self._n_vocab, -1, False)
            lc.llama_sampler_apply(slot.grammar, ctypes.byref(arr))
            lc.llama_sampler_apply(slot.sampler, ctypes.byref(arr))
            token = int(cand["id"][arr.selected])
        lc.llama_sampler_accept(slot.grammar, token)
        lc.llama_sampler_accept(slot.sampler, token)
        if lc.llama_vocab_is_eog(self._vocab, token):
            self._complete(slot, "stop")
            return
        slot.tokens.append(token)
        if len(slot.tokens) >= self.max_tokens or slot.n_past + 1 >= self.n_ctx_seq:
            self._complete(slot, "length")

    def _complete(self, slot: _Slot, reason: str) -> None:
        job = slot.job
        assert job is not None
        tokens = slot.tokens
        content = self._detokenize(tokens)
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
        """Free the slot: its KV cells, its sampler."""
        self._l.llama_memory_seq_rm(self._mem, slot.seq, -1, -1)
        for sampler in (slot.sampler, slot.grammar):
            if sampler is not None:
                self._l.llama_sampler_free(sampler)
        slot.sampler = slot.grammar = None
        slot.job = None
        slot.tokens = []
        slot.n_past = 0

    def _detokenize(self, tokens: list[int]) -> str:
        buf = ctypes.create_string_buffer(256)
        out = bytearray()
        for t in tokens:
            n = self._l.llama_token_to_piece(self._vocab, t, buf, len(buf), 0, False)
            if n > 0:
                out += buf.raw[:n]
        return out.decode("utf-8", "ignore")

    # -- teardown --------------------------------------------------------------------------------------

    def close(self) -> None:
        """Drop the frames in flight and free the context, the CLIP context and the model (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
            for job in self._pending:
                if job.prepared is not None and job.prepared.done() and not job.prepared.cancelled():
                    chunks = job.prepared.result().chunks
                    if chunks is not None:
                        self._m.mtmd_input_chunks_free(chunks)
            self._pending.clear()
            for slot in getattr(self, "_slots", []):
                for sampler in (slot.sampler, slot.grammar):
                    if sampler is not None:
                        self._l.llama_sampler_free(sampler)
                slot.sampler = slot.grammar = None
            self._free()

    def _free(self) -> None:
        lc, mt = self._l, self._m
        if self._batch is not None:
            lc.llama_batch_free(self._batch)
            self._batch = None
        if self._mtmd is not None:
            mt.mtmd_free(self._mtmd)
            self._mtmd = None
        if self._ctx is not None:
            lc.llama_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            lc.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> ParallelLlavaEngine:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
