"""One llama.cpp context with a KV stream per sequence, and the libmtmd context beside it.

The parallel engine's only contact with llama.cpp's batches and memory: load the pair, create a
context of ``n_seq`` streams (``kv_unified = False``: attention never spans another frame), decode
batches of (token, position, sequence, wants logits) entries or of image-embedding rows, copy and
drop sequences. A refused decode is :class:`DecodeFailed`, which the caller turns into retries.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any, Final

from cinecut import faults
from cinecut.inference.engine import EngineLoadError, _native_errors

#: Tokens per llama_decode call and per micro-batch: prompts of several frames go in one call.
N_BATCH: Final = 512


class DecodeFailed(RuntimeError):
    """llama_decode refused a batch; every frame in it is retried alone."""


class SequenceContext:
    """The model, its CLIP projector and (after :meth:`create`) a context of ``n_seq`` KV streams."""

    def __init__(self, model_path: Path, mmproj_path: Path, *, n_gpu_layers: int, threads: int) -> None:
        import llama_cpp
        from llama_cpp import mtmd_cpp

        self.lc, self.mt = llama_cpp, mtmd_cpp
        self.model_path, self.mmproj_path = model_path, mmproj_path
        self.threads = threads
        self.model: Any = None
        self.mtmd: Any = None
        self.ctx: Any = None
        self.mem: Any = None
        self._batch: Any = None
        self._embd_batch: Any = None
        try:
            self._load(n_gpu_layers)
        except BaseException:
            self.free()
            raise

    def _load(self, n_gpu_layers: int) -> None:
        lc, mt = self.lc, self.mt
        model_path, mmproj_path = self.model_path, self.mmproj_path
        mparams = lc.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        model = lc.llama_model_load_from_file(str(model_path).encode(), mparams)
        if not model:
            raise EngineLoadError(f"model {model_path}: llama.cpp could not load it ({_native_errors()})")
        self.model = model
        cparams = mt.mtmd_context_params_default()
        cparams.use_gpu = n_gpu_layers != 0
        cparams.print_timings = False
        cparams.n_threads = self.threads
        mtmd = mt.mtmd_init_from_file(str(mmproj_path).encode(), model, cparams)
        if not mtmd:
            raise EngineLoadError(
                f"mmproj {mmproj_path}: libmtmd could not load it with {model_path.name} ({_native_errors()})"
            )
        self.mtmd = mtmd
        self.n_embd = int(lc.llama_model_n_embd_inp(model))
        self._mrope = bool(mt.mtmd_decode_use_mrope(mtmd))

    def can_batch_image(self, chunk: Any) -> bool:
        """Image rows of several frames may share a decode only where the model decodes that image
        causally with ordinary positions (LLaVA-1.5 does); otherwise it goes through libmtmd's helper."""
        return not self._mrope and not self.mt.mtmd_decode_use_non_causal(self.mtmd, chunk)

    def kv_bytes_per_cell(self) -> int:
        """Bytes of f16 K+V one token takes in the cache."""
        lc, m = self.lc, self.model
        n_embd_kv = lc.llama_model_n_embd(m) // lc.llama_model_n_head(m) * lc.llama_model_n_head_kv(m)
        return 2 * lc.llama_model_n_layer(m) * n_embd_kv * 2

    def create(self, n_seq: int, n_ctx_seq: int, kv_bytes: int) -> None:
        """The context: ``n_seq`` streams of ``n_ctx_seq`` cells each."""
        lc = self.lc
        params = lc.llama_context_default_params()
        params.n_ctx = n_ctx_seq * n_seq
        params.n_batch = N_BATCH
        params.n_ubatch = N_BATCH
        params.n_seq_max = n_seq
        params.n_threads = self.threads
        params.n_threads_batch = self.threads
        params.kv_unified = False
        ctx = lc.llama_init_from_model(self.model, params)
        if not ctx:
            raise EngineLoadError(
                f"model {self.model_path}: cannot create a context for {n_seq} sequences "
                f"({kv_bytes / 2**20:.0f} MiB of KV cache): {_native_errors()}"
            )
        self.ctx = ctx
        self.mem = lc.llama_get_memory(ctx)
        self._batch = lc.llama_batch_init(max(N_BATCH, n_seq), 0, 1)

    def decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, sequence, wants logits) entries."""
        b = self._batch
        for i, (tok, pos, seq, logits) in enumerate(entries):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = logits
        b.n_tokens = len(entries)
        self._run(b, several=faults.ARMED and len({e[2] for e in entries}) > 1)

    def decode_embd(self, rows: list[tuple[Any, int, int, int, int]]) -> None:
        """One llama_decode of image-embedding runs: (embeddings, first row, rows, first position, sequence).

        ``embeddings`` is a flat float32 array of whole rows (n_embd floats each); no logits are kept.
        """
        lc = self.lc
        if self._embd_batch is None:
            self._embd_batch = lc.llama_batch_init(N_BATCH, self.n_embd, 1)
        b = self._embd_batch
        base = ctypes.cast(b.embd, ctypes.c_void_p).value
        row_bytes = self.n_embd * 4
        i = 0
        for embd, first, count, pos0, seq in rows:
            ctypes.memmove(base + i * row_bytes, embd.ctypes.data + first * row_bytes, count * row_bytes)
            for j in range(count):
                b.pos[i + j] = pos0 + j
                b.n_seq_id[i + j] = 1
                b.seq_id[i + j][0] = seq
                b.logits[i + j] = False
            i += count
        b.n_tokens = i
        self._run(b, several=faults.ARMED and len({r[4] for r in rows}) > 1)

    def _run(self, batch: Any, *, several: bool = False) -> None:
        if several and faults.fails("llama_decode.batch"):  # as a GPU out of memory for a big batch does
            raise DecodeFailed("llama_decode returned -3 (fault injected for a batch of several frames)")
        rc = self.lc.llama_decode(self.ctx, batch)
        if rc != 0:
            raise DecodeFailed(f"llama_decode returned {rc} ({_native_errors()})")

    def logits(self, idx: int) -> Any:
        """The ``float*`` logits of row ``idx`` of the last decode."""
        return self.lc.llama_get_logits_ith(self.ctx, idx)

    def copy_seq(self, src: int, dst: int) -> None:
        self.lc.llama_memory_seq_cp(self.mem, src, dst, -1, -1)

    def drop_seq(self, seq: int) -> None:
        self.lc.llama_memory_seq_rm(self.mem, seq, -1, -1)

    def free(self) -> None:
        """Free batches, CLIP context, context and model (idempotent)."""
        lc, mt = self.lc, self.mt
        for name in ("_batch", "_embd_batch"):
            if getattr(self, name) is not None:
                lc.llama_batch_free(getattr(self, name))
                setattr(self, name, None)
        if self.mtmd is not None:
            mt.mtmd_free(self.mtmd)
            self.mtmd = None
        if self.ctx is not None:
            lc.llama_free(self.ctx)
            self.ctx = None
        if self.model is not None:
            lc.llama_model_free(self.model)
            self.model = None
