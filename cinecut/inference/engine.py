"""The LLaVA engine: one llama-cpp-python model per job, one SceneDescription (or None) per keyframe.

The model is loaded once (``Llama`` + ``Llava15ChatHandler``); each keyframe goes in as a ``data:`` URI
image with the prompt, and generation is constrained by the SceneDescription JSON schema. A frame that
fails for any reason (unreadable image, model error, invalid JSON) yields ``None``, as upstream stores
it, and never ends the job; only a model that cannot be loaded is an error (:class:`EngineLoadError`).

llama.cpp and libmtmd log to stderr by default, even with ``verbose=False``; their log callbacks are
routed into the ``cinecut.inference.llama`` logger (DEBUG) instead, and the last lines are kept so a
load failure can say why.

Per frame: the model, its context and the CLIP context are reused; the chat handler clears the KV
cache itself and evaluates the prompt (text + image tokens) before generating. Measured with the tiny
generated model on a 2-core CPU (llama-cpp-python 0.3.36): 13-15 ms per frame for 320x240-640x360
JPEGs, of which ~5 ms are the ~35 decode steps, ~2.5 ms grammar sampling, ~1.5 ms JPEG decoding and
~4 ms the chat handler compiling its Jinja template on every call (not cacheable from outside). A real
LLaVA-1.5 7B spends its time in the 576 image tokens and in generation instead.

``llama_cpp`` is imported lazily, so this module (and everything importing it) loads without it.
"""

from __future__ import annotations

import base64
import collections
import logging
import struct
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Final

from cinecut.inference.models import SCENE_DESCRIPTION_SCHEMA, SceneDescription, parse_scene_description

log = logging.getLogger(__name__)
native_log = logging.getLogger("cinecut.inference.llama")

DEFAULT_PROMPT: Final = (
    "Describe this film frame for a trailer editor. Reply with a JSON object with exactly these keys, "
    "each a short sentence: visual_content (what is visible), mood (the emotional tone), "
    "action (what is happening) and setting (where and when it takes place)."
)

#: Keyframes are small JPEGs; anything bigger is not one of ours.
MAX_IMAGE_BYTES: Final = 32 * 1024 * 1024

_GGUF_MAGIC: Final = b"GGUF"
_INSTALL_HINT: Final = "install llama-cpp-python (pip install 'cinecut-cache[prewarm]')"


class EngineLoadError(RuntimeError):
    """The model pair cannot be loaded; the message names the file and the reason."""


# --- native logging -------------------------------------------------------------------------------

_native_tail: collections.deque[tuple[int, str]] = collections.deque(maxlen=40)
_native_callback: Any = None  # the ctypes callback; must stay referenced while llama.cpp holds it
_native_lock = threading.Lock()
# enum ggml_log_level: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (continues the previous line)
_GGML_LEVELS: Final = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}


def _route_native_logs() -> None:
    """Send llama.cpp, ggml and libmtmd log lines to Python logging instead of stderr (once per process)."""
    global _native_callback
    with _native_lock:
        if _native_callback is not None:
            return
        import llama_cpp
        from llama_cpp import mtmd_cpp

        last_level = [logging.DEBUG]

        @llama_cpp.llama_log_callback
        def callback(level: int, text: bytes, _user_data: Any) -> None:
            try:
                line = text.decode("utf-8", "replace").strip()
                py_level = last_level[0] if level == 5 else _GGML_LEVELS.get(level, logging.DEBUG)
                last_level[0] = py_level
                if line:
                    _native_tail.append((py_level, line))
                    native_log.debug("%s", line)
            except BaseException:  # a callback from C must never raise; a Ctrl-C landing here is not lost:
                pass  # the CLI's handler leaves a standing stop request that ends the run after this frame

        llama_cpp.llama_log_set(callback, None)
        mtmd_cpp.mtmd_log_set(callback, None)
        mtmd_cpp.mtmd_helper_log_set(callback, None)
        _native_callback = callback


def _native_errors() -> str:
    """The recent error lines llama.cpp logged, for an error message."""
    lines = [line for level, line in _native_tail if level >= logging.ERROR]
    return "; ".join(lines[-3:])


# --- GGUF header check ----------------------------------------------------------------------------

_SCALAR_SIZES: Final = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING: Final = 8
_ARRAY: Final = 9


def _gguf_architecture(path: Path) -> str | None:
    """``general.architecture`` from a GGUF header, None if absent; ValueError if not a GGUF file.

    Read here, before llama.cpp, so a wrong file gets a precise message instead of a generic failure.
    """
    with open(path, "rb") as f:
        head = f.read(24)
        if len(head) < 24 or head[:4] != _GGUF_MAGIC:
            raise ValueError(f"not a GGUF file (starts with {head[:4]!r})")
        version, _n_tensors, n_kv = struct.unpack("<IQQ", head[4:])
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version}")
        for _ in range(min(n_kv, 256)):
            key = _read_string(f)
            vtype = _read_u32(f)
            if key == "general.architecture" and vtype == _STRING:
                return _read_string(f)
            _skip_value(f, vtype)
    return None


def _read_exact(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ValueError("truncated GGUF header")
    return data


def _read_u32(f: BinaryIO) -> int:
    return int(struct.unpack("<I", _read_exact(f, 4))[0])


def _read_string(f: BinaryIO) -> str:
    (n,) = struct.unpack("<Q", _read_exact(f, 8))
    if n > 1 << 20:
        raise ValueError("corrupt GGUF header (absurd string length)")
    return _read_exact(f, n).decode("utf-8", "replace")


def _skip_value(f: BinaryIO, vtype: int) -> None:
    if vtype == _STRING:
        _read_string(f)
    elif vtype == _ARRAY:
        etype = _read_u32(f)
        (count,) = struct.unpack("<Q", _read_exact(f, 8))
        if etype in _SCALAR_SIZES:
            f.seek(_SCALAR_SIZES[etype] * count, 1)
        else:
            for _ in range(count):
                _skip_value(f, etype)
    elif vtype in _SCALAR_SIZES:
        _read_exact(f, _SCALAR_SIZES[vtype])
    else:
        raise ValueError(f"corrupt GGUF header (unknown value type {vtype})")


def _check_model_file(path: Path, role: str, *, want_clip: bool) -> None:
    """Raise EngineLoadError unless ``path`` is a readable GGUF of the right kind for ``role``."""
    try:
        arch = _gguf_architecture(path)
    except FileNotFoundError as exc:
        raise EngineLoadError(f"{role} {path}: no such file") from exc
    except IsADirectoryError as exc:
        raise EngineLoadError(f"{role} {path}: is a directory, not a GGUF file") from exc
    except OSError as exc:
        raise EngineLoadError(f"{role} {path}: cannot read it ({exc.strerror or exc})") from exc
    except ValueError as exc:
        raise EngineLoadError(f"{role} {path}: {exc}") from exc
    if want_clip and arch != "clip":
        raise EngineLoadError(
            f"{role} {path}: general.architecture is {arch!r}, expected 'clip' "
            "(a LLaVA mmproj file; were the model and mmproj swapped?)"
        )
    if not want_clip and arch == "clip":
        raise EngineLoadError(
            f"{role} {path}: this is a CLIP projector (mmproj), not a language model "
            "(were the model and mmproj swapped?)"
        )


# --- the engine -----------------------------------------------------------------------------------


def gpu_offload_supported() -> bool:
    """Whether the installed llama.cpp build can offload layers to a GPU (False if not installed)."""
    try:
        import llama_cpp
    except ImportError:
        return False
    return bool(llama_cpp.llama_supports_gpu_offload())


def _image_mime(data: bytes) -> str | None:
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    return None


class LlavaEngine:
    """A loaded LLaVA-1.5 model that describes keyframes; use as a context manager or call close().

    Not reentrant: calls are serialized by a lock, so a close() from another thread waits for the
    frame in flight.
    """

    def __init__(
        self,
        model_path: Path,
        mmproj_path: Path,
        *,
        n_ctx: int = 2048,
        n_gpu_layers: int = -1,
        max_tokens: int = 256,
        seed: int = 0,
        prompt: str = DEFAULT_PROMPT,
    ) -> None:
        self.model_path = Path(model_path)
        self.mmproj_path = Path(mmproj_path)
        self.max_tokens = max_tokens
        self.seed = seed
        self.prompt = prompt
        self._lock = threading.Lock()
        self._llm: Any = None
        self._response_format = {"type": "json_object", "schema": SCENE_DESCRIPTION_SCHEMA}

        _check_model_file(self.model_path, "model", want_clip=False)
        _check_model_file(self.mmproj_path, "mmproj", want_clip=True)
        try:
            from llama_cpp import Llama
            from llama_cpp.llama_chat_format import Llava15ChatHandler
        except ImportError as exc:
            raise EngineLoadError(
                f"cannot load {self.model_path}: llama_cpp is not importable ({exc}); {_INSTALL_HINT}"
            ) from exc
        _route_native_logs()
        _native_tail.clear()

        try:
            handler = Llava15ChatHandler(clip_model_path=str(self.mmproj_path), verbose=False)
        except Exception as exc:
            raise EngineLoadError(f"mmproj {self.mmproj_path}: {exc}") from exc
        try:
            llm = Llama(
                model_path=str(self.model_path),
                chat_handler=handler,
                n_ctx=n_ctx,
                n_gpu_layers=n_gpu_layers,
                seed=seed,
                verbose=False,
            )
        except Exception as exc:
            raise EngineLoadError(
                f"model {self.model_path}: llama.cpp could not load it ({_native_errors() or exc})"
            ) from exc
        # The handler would load the CLIP model lazily on the first frame; load it now so a bad mmproj
        # fails the job up front, with its reason, instead of turning every frame into None.
        init_mtmd = getattr(handler, "_init_mtmd_context", None)
        if init_mtmd is not None:
            try:
                init_mtmd(llm)
            except Exception as exc:
                llm.close()
                raise EngineLoadError(
                    f"mmproj {self.mmproj_path}: libmtmd could not load it with "
                    f"{self.model_path.name} ({_native_errors() or exc})"
                ) from exc
        self._llm = llm
        log.debug(
            "loaded %s + %s (n_ctx=%d, n_gpu_layers=%d)",
            self.model_path,
            self.mmproj_path,
            n_ctx,
            n_gpu_layers,
        )

    @property
    def closed(self) -> bool:
        return self._llm is None

    def describe(self, image_path: Path) -> SceneDescription | None:
        """Describe one keyframe; None (logged) when this frame cannot be described, never an exception.

        Raises RuntimeError only when called after close(), which is a caller bug, not a frame failure.
        """
        if self._llm is None:
            raise RuntimeError("LlavaEngine.describe() called after close()")
        image_path = Path(image_path)
        uri = self._data_uri(image_path)
        if uri is None:
            return None
        with self._lock:
            if self._llm is None:
                raise RuntimeError("LlavaEngine.describe() called after close()")
            started = time.perf_counter()
            _native_tail.clear()  # so a failure below reports this frame's errors, not older ones
            try:
                reply = self._llm.create_chat_completion(
                    messages=[
                        {
                            "role": "user",
                            "content": [
                                {"type": "image_url", "image_url": {"url": uri}},
                                {"type": "text", "text": self.prompt},
                            ],
                        }
                    ],
                    response_format=self._response_format,
                    max_tokens=self.max_tokens,
                    seed=self.seed,
                )
                choice = reply["choices"][0]
                content = choice["message"].get("content")
            except Exception as exc:
                native = _native_errors()
                log.warning(
                    "frame %s: the model failed on it: %s%s", image_path, exc, f" ({native})" * bool(native)
                )
                return None
        description = parse_scene_description(content)
        elapsed_ms = (time.perf_counter() - started) * 1000
        if description is None:
            why = (
                "the answer hit max_tokens"
                if choice.get("finish_reason") == "length"
                else "the answer is not a valid SceneDescription"
            )
            log.warning("frame %s: %s: %.200r", image_path, why, content)
        else:
            log.debug("frame %s described in %.1f ms", image_path, elapsed_ms)
        return description

    def _data_uri(self, image_path: Path) -> str | None:
        try:
            with open(image_path, "rb") as f:
                data = f.read(MAX_IMAGE_BYTES + 1)
        except OSError as exc:
            log.warning("frame %s: cannot read it: %s", image_path, exc.strerror or exc)
            return None
        if len(data) > MAX_IMAGE_BYTES:
            log.warning("frame %s: larger than %d bytes, not a keyframe", image_path, MAX_IMAGE_BYTES)
            return None
        mime = _image_mime(data)
        if mime is None:
            log.warning("frame %s: not a JPEG or PNG image", image_path)
            return None
        return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"

    def close(self) -> None:
        """Free the model, its context and the CLIP context now (idempotent)."""
        with self._lock:
            llm, self._llm = self._llm, None
        if llm is not None:
            llm.close()

    def __enter__(self) -> LlavaEngine:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
