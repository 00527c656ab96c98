"""The frame feeder: keyframes read, decoded and tokenized with the prompt off the main thread.

A helper thread does a frame's file and image work (JPEG read and decode, libmtmd tokenizing) while the
main thread decodes text. The CLIP encoder runs on exactly one thread, never two at once (libmtmd's
context and its output buffer are not shared safely): on the helper where the model is offloaded, so a
GPU encodes the next image while the main thread decodes; on the main thread on a CPU, where both are
compute-bound on the same cores and a second thread running ggml makes libgomp stop spinning at every
barrier of the decode (it throttles when it manages more threads than CPUs): 30-50 % slower tokens.
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
    )  # ("text", tokens, None) | ("image", chunk, embd); embd None until encoded
    error: str | None = None


class FrameFeeder:
    """Prepares frames on one helper thread; ``submit`` returns a future, ``prepare`` works inline.

    ``encode_on_helper``: the helper also runs the CLIP encoder (for an offloaded model); otherwise the
    images of a submitted frame are encoded by :meth:`encode` on the caller's thread.
    """

    def __init__(self, sc: SequenceContext, prompt: str, *, encode_on_helper: bool = False) -> None:
        self.sc = sc
        self.encode_on_helper = encode_on_helper
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
        """The frame read and tokenized on the helper (encoded too where ``encode_on_helper``);
        pass the result to :meth:`encode` on the thread that decodes."""
        assert self._pool is not None
        return self._pool.submit(self._timed, path, self.encode_on_helper)

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
        """Read the file, decode the image, tokenize the prompt, run the CLIP encoder, all on the calling
        thread (for a caller with no helper thread: not to be mixed with :meth:`submit`); errors are data."""
        return self._timed(path, True)

    def encode(self, prepared: Prepared) -> Prepared:
        """Run the CLIP encoder, on the calling thread, for the images :meth:`submit` left raw."""
        raw = [embd is None for kind, _, embd in prepared.parts if kind == "image"]
        if prepared.error is not None or not any(raw):
            return prepared
        started = time.perf_counter()
        try:
            prepared.parts = [
                (kind, item, self._encode(item) if kind == "image" and embd is None else embd)
                for kind, item, embd in prepared.parts
            ]
        except _EncodeFailed as exc:
            prepared.error = str(exc)
            self.free(prepared)
        finally:
            self.image_s += time.perf_counter() - started
        return prepared

    def _timed(self, path: Path, encode: bool) -> Prepared:
        started = time.perf_counter()
        try:
            return self._prepare(path, encode)
        except Exception as exc:  # a frame's failure is that frame's None, never the job's end
            return Prepared(error=f"cannot prepare it: {exc}")
        finally:
            self.image_s += time.perf_counter() - started

    def _encode(self, chunk: Any) -> Any:
        """One image chunk through CLIP: its rows of embeddings (a copy: libmtmd reuses its buffer)."""
        import numpy as np

        mt = self.sc.mt
        if mt.mtmd_encode_chunk(self.sc.mtmd, chunk) != 0:
            raise _EncodeFailed(f"the image encoder failed on it ({_native_errors()})")
        n_tok = mt.mtmd_input_chunk_get_n_tokens(chunk)
        out = mt.mtmd_get_output_embd(self.sc.mtmd)
        return np.ctypeslib.as_array(out, shape=(n_tok * self.sc.n_embd,)).copy()

    def _prepare(self, path: Path, encode: bool) -> Prepared:
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
                try:
                    embd = self._encode(chunk) if encode else None
                except _EncodeFailed as exc:
                    prepared.error = str(exc)
                    return prepared
                prepared.parts.append(("image", chunk, embd))
            return prepared
        finally:
            mt.mtmd_bitmap_free(bitmap)
            if prepared.error is not None:
                self.free(prepared)


class _EncodeFailed(Exception):
    pass


def _text_tokens(mt: Any, chunk: Any) -> list[int]:
    n = ctypes.c_size_t()
    ptr = mt.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
    return [ptr[j] for j in range(n.value)]
