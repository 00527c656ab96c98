"""LlavaEngine against real llama.cpp with the tiny generated LLaVA pair and real ffmpeg JPEGs."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from cinecut.demo.tinymodel import TinyLlava
from cinecut.inference.engine import EngineLoadError, LlavaEngine, gpu_offload_supported
from cinecut.inference.models import SceneDescription

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def frames(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three different keyframes (JPEG) and one PNG, as ffmpeg writes them."""
    out = tmp_path_factory.mktemp("frames")
    subprocess.run(
        [
            "ffmpeg",
            "-nostdin",
            "-loglevel",
            "error",
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=320x240:rate=2",
            "-frames:v",
            "3",
            "-q:v",
            "5",
            str(out / "frame_%02d.jpg"),
        ],
        check=True,
        timeout=60,
    )
    subprocess.run(
        [
            "ffmpeg",
            "-nostdin",
            "-loglevel",
            "error",
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=96x64",
            "-frames:v",
            "1",
            str(out / "frame.png"),
        ],
        check=True,
        timeout=60,
    )
    return [*sorted(out.glob("frame_*.jpg")), out / "frame.png"]


@pytest.fixture(scope="module")
def engine(tiny_llava: TinyLlava):
    """Defaults on purpose: n_gpu_layers=-1 must simply run on CPU where there is no GPU build."""
    with LlavaEngine(tiny_llava.model_path, tiny_llava.mmproj_path) as eng:
        yield eng


def test_describes_each_frame_into_a_valid_scene_description(engine: LlavaEngine, frames: list[Path]) -> None:
    for frame in frames:
        description = engine.describe(frame)
        assert isinstance(description, SceneDescription), frame
        assert all(v and v == v.strip() for v in description.to_dict().values())


def test_same_frame_same_answer(engine: LlavaEngine, frames: list[Path]) -> None:
    assert engine.describe(frames[0]) == engine.describe(frames[0])


def test_bad_frames_yield_none_and_the_next_frame_still_works(
    engine: LlavaEngine, frames: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"this is not an image at all" * 10)
    corrupt_jpeg = tmp_path / "corrupt.jpg"  # passes the magic check, so llama.cpp's decoder must fail it
    corrupt_jpeg.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00\x17garbage" * 50)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    bad = [garbage, corrupt_jpeg, empty, tmp_path / "missing.jpg", tmp_path]
    with caplog.at_level(logging.WARNING, logger="cinecut.inference.engine"):
        for path in bad:
            assert engine.describe(path) is None, path
            assert isinstance(engine.describe(frames[0]), SceneDescription), f"after {path}"
    for path in bad:
        assert any(str(path) in r.getMessage() for r in caplog.records), path


def test_native_libraries_print_nothing_while_describing(
    engine: LlavaEngine, frames: list[Path], capfd: pytest.CaptureFixture[str]
) -> None:
    capfd.readouterr()
    assert engine.describe(frames[1]) is not None
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")


def test_loading_prints_nothing(tiny_llava: TinyLlava, capfd: pytest.CaptureFixture[str]) -> None:
    capfd.readouterr()
    LlavaEngine(tiny_llava.model_path, tiny_llava.mmproj_path, n_gpu_layers=0).close()
    assert capfd.readouterr() == ("", "")


def test_a_truncated_answer_is_a_failed_frame(
    tiny_llava: TinyLlava, frames: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    with (
        LlavaEngine(tiny_llava.model_path, tiny_llava.mmproj_path, max_tokens=6) as eng,
        caplog.at_level(logging.WARNING, logger="cinecut.inference.engine"),
    ):
        assert eng.describe(frames[0]) is None
    assert any("max_tokens" in r.getMessage() for r in caplog.records)


def test_a_model_error_on_a_frame_is_a_failed_frame(tiny_llava: TinyLlava, frames: list[Path]) -> None:
    # 24 tokens of context cannot hold the prompt and the image: llama-cpp-python raises on this frame.
    with LlavaEngine(tiny_llava.model_path, tiny_llava.mmproj_path, n_ctx=24) as eng:
        assert eng.describe(frames[0]) is None


def test_close_is_idempotent_and_describe_after_close_is_a_bug(
    tiny_llava: TinyLlava, frames: list[Path]
) -> None:
    eng = LlavaEngine(tiny_llava.model_path, tiny_llava.mmproj_path, n_gpu_layers=0)
    assert not eng.closed
    eng.close()
    eng.close()
    assert eng.closed
    with pytest.raises(RuntimeError, match="after close"):
        eng.describe(frames[0])
    with LlavaEngine(tiny_llava.model_path, tiny_llava.mmproj_path) as ctx:
        assert ctx.describe(frames[0]) is not None
    assert ctx.closed


def _copy_truncated(src: Path, dest: Path, fraction: float) -> Path:
    data = src.read_bytes()
    dest.write_bytes(data[: int(len(data) * fraction)])
    return dest


def test_load_errors_name_the_file_and_why(tiny_llava: TinyLlava, tmp_path: Path) -> None:
    model, mmproj = tiny_llava.model_path, tiny_llava.mmproj_path
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_text("<html>404 Not Found</html>")
    cases: list[tuple[Path, Path, list[str]]] = [
        (tmp_path / "absent.gguf", mmproj, ["absent.gguf", "no such file"]),
        (model, tmp_path / "absent-mmproj.gguf", ["absent-mmproj.gguf", "no such file"]),
        (not_gguf, mmproj, [str(not_gguf), "not a GGUF file"]),
        (tmp_path, mmproj, [str(tmp_path), "directory"]),
        (mmproj, model, [str(mmproj), "swapped"]),
        (model, model, [str(model), "'llama'", "expected 'clip'"]),
        (
            _copy_truncated(model, tmp_path / "half.gguf", 0.5),
            mmproj,
            ["half.gguf", "corrupted or incomplete"],
        ),
        (
            model,
            _copy_truncated(mmproj, tmp_path / "half-mmproj.gguf", 0.5),
            ["half-mmproj.gguf", "Failed to load CLIP model"],
        ),
    ]
    for model_path, mmproj_path, expected in cases:
        with pytest.raises(EngineLoadError) as info:
            LlavaEngine(model_path, mmproj_path, n_gpu_layers=0)
        for part in expected:
            assert part in str(info.value), (part, str(info.value))


def test_missing_llama_cpp_is_a_load_error(tiny_llava: TinyLlava, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(EngineLoadError, match="llama-cpp-python"):
        LlavaEngine(tiny_llava.model_path, tiny_llava.mmproj_path)
    assert gpu_offload_supported() is False


def test_module_imports_without_llama_cpp() -> None:
    code = (
        "import sys; sys.modules['llama_cpp'] = None\n"
        "import cinecut.inference.engine as e\n"
        "print(e.gpu_offload_supported())\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO, check=False
    )
    assert (proc.returncode, proc.stdout.strip()) == (0, "False"), proc.stderr


def test_gpu_offload_supported_reports_the_installed_build() -> None:
    import llama_cpp

    assert gpu_offload_supported() is bool(llama_cpp.llama_supports_gpu_offload())
