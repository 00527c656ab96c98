"""The frame feeder: keyframes read, decoded, tokenized with the prompt and through CLIP, off the main thread.

A helper thread does a frame's image work (JPEG read and decode, libmtmd tokenizing, the CLIP encoder)
while the main thread decodes text, so the image part of a frame overlaps the other frames' tokens.
The prompt is Llava15ChatHandler's template rendered for one image and one text part, so the model
sees exactly what the one-at-a-time engine gives it.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from cinecut.inference.engine import MAX_IMAGE_BYTES, EngineLoadError, _image_mime, _native_errors
from cinecut.inference.seqcontext import SequenceContext

#: Llava15ChatHandler's default system message and template, rendered for one image and one text part.
SYSTEM_MESSAGE: Final = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions."
)


@dataclass(slots=True)
class Prepared:
    """A frame ready for its sequence: tokenized prompt parts, the image already through CLIP."""

    chunks: Any = None  # mtmd_input_chunks*, freed once the prompt is in the KV cache
    parts: list[tuple[str, Any, Any]] = field(
        default_factory=list
    )  # ("text", tokens, None) | ("image", chunk, embd)
    error: str | None = None


class FrameFeeder:
    """Prepares frames on one helper thread; ``submit`` returns a future, ``prepare`` works inline."""

    def __init__(self, sc: SequenceContext, prompt: str) -> None:
        self.sc = sc
        marker = sc.mt.mtmd_default_marker().decode()
        self._text = f"{SYSTEM_MESSAGE}\nUSER: {marker}{prompt}\nASSISTANT: ".encode()
        #: Seconds spent preparing frames (on the helper thread: overlapped with decoding).
        self.image_s = 0.0
        self.prefix_tokens: list[int] = []
        self.prompt_tokens = self._count_prompt_tokens()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="cinecut-frame-prep"
        )

    def submit(self, path: Path) -> concurrent.futures.Future[Prepared]:
        assert self._pool is not None
        return self._pool.submit(self.prepare, path)

    def shutdown(self) -> None:
        """Stop the helper thread, dropping frames not started (waits for the one being prepared)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def free(self, prepared: Prepared) -> None:
        if prepared.chunks is not None:
            self.sc.mt.mtmd_input_chunks_free(prepared.chunks)
            prepared.chunks = None

    def _count_prompt_tokens(self) -> int:
        """Positions the prompt takes with one image (LLaVA-1.5's image token count is fixed); also
        the text before the image, the same for every frame (:attr:`prefix_tokens`)."""
        mt = self.sc.mt
        pixels = (ctypes.c_uint8 * (64 * 64 * 3))()
        bitmap = mt.mtmd_bitmap_init(64, 64, pixels)
        chunks = mt.mtmd_input_chunks_init()
        try:
            if self._tokenize(chunks, bitmap) != 0:
                raise EngineLoadError(f"mmproj {self.sc.mmproj_path}: libmtmd cannot tokenize the prompt")
            first = mt.mtmd_input_chunks_get(chunks, 0)
            if mt.mtmd_input_chunk_get_type(first) == mt.MTMD_INPUT_CHUNK_TYPE_TEXT:
                self.prefix_tokens = _text_tokens(mt, first)
            return int(mt.mtmd_helper_get_n_pos(chunks))
        finally:
            mt.mtmd_input_chunks_free(chunks)
            mt.mtmd_bitmap_free(bitmap)

    def _tokenize(self, chunks: Any, bitmap: Any) -> int:
        mt = self.sc.mt
        text = mt.mtmd_input_text()
        text.text = self._text
        text.text_len = len(self._text)
        text.add_special = True
        text.parse_special = True
        bitmaps = (mt.mtmd_bitmap_p_ctypes * 1)(bitmap)
        return int(mt.mtmd_tokenize(self.sc.mtmd, chunks, ctypes.byref(text), bitmaps, 1))

    def prepare(self, path: Path) -> Prepared:
        """Read the file, decode the image, tokenize the prompt, run the CLIP encoder; errors are data."""
        started = time.perf_counter()
        try:
            return self._prepare(path)
        except Exception as exc:  # a frame's failure is that frame's None, never the job's end
            return Prepared(error=f"cannot prepare it: {exc}")
        finally:
            self.image_s += time.perf_counter() - started

    def _prepare(self, path: Path) -> Prepared:
        import numpy as np

        mt = self.sc.mt
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_IMAGE_BYTES + 1)
        except OSError as exc:
            return Prepared(error=f"cannot read it: {exc.strerror or exc}")
        if len(data) > MAX_IMAGE_BYTES:
            return Prepared(error=f"larger than {MAX_IMAGE_BYTES} bytes, not a keyframe")
        if _image_mime(data) is None:
            return Prepared(error="not a JPEG or PNG image")
        buf = (ctypes.c_uint8 * len(data)).from_buffer(bytearray(data))
        bitmap = mt.mtmd_helper_bitmap_init_from_buf(self.sc.mtmd, buf, len(data), False)
        if not bitmap:
            return Prepared(error="the image cannot be decoded")
        chunks = mt.mtmd_input_chunks_init()
        prepared = Prepared(chunks=chunks)
        try:
            if self._tokenize(chunks, bitmap) != 0:
                prepared.error = "libmtmd cannot tokenize the prompt with this image"
                return prepared
            for i in range(mt.mtmd_input_chunks_size(chunks)):
                chunk = mt.mtmd_input_chunks_get(chunks, i)
                if mt.mtmd_input_chunk_get_type(chunk) == mt.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    prepared.parts.append(("text", _text_tokens(mt, chunk), None))
                    continue
                if mt.mtmd_encode_chunk(self.sc.mtmd, chunk) != 0:
                    prepared.error = f"the image encoder failed on it ({_native_errors()})"
                    return prepared
                n_tok = mt.mtmd_input_chunk_get_n_tokens(chunk)
                out = mt.mtmd_get_output_embd(self.sc.mtmd)
                embd = np.ctypeslib.as_array(out, shape=(n_tok * self.sc.n_embd,)).copy()
                prepared.parts.append(("image", chunk, embd))
            return prepared
        finally:
            mt.mtmd_bitmap_free(bitmap)
            if prepared.error is not None:
                self.free(prepared)


def _text_tokens(mt: Any, chunk: Any) -> list[int]:
    n = ctypes.c_size_t()
    ptr = mt.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
    return [ptr[j] for j in range(n.value)]
