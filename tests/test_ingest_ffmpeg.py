"""Running ffmpeg: missing binaries, failures that say why, and no child left behind."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import psutil
import pytest
from sigint import sigint_raises

from cinecut.ingest import FFmpegMissingError, MediaError, probe
from cinecut.ingest.ffmpeg import INSTALL_HINT, ProcessSet, run_tool, stderr_tail
from cinecut.ingest.keyframes import extract_keyframes
from cinecut.ingest.proxy import make_proxy

ENDLESS = ["-hide_banner", "-nostdin", "-re", "-f", "lavfi", "-i", "testsrc=s=64x64:r=10", "-f", "null", "-"]


def _ffmpeg_children() -> list[psutil.Process]:
    procs = []
    for child in psutil.Process().children(recursive=True):
        with_name = child.name() if child.is_running() and child.status() != psutil.STATUS_ZOMBIE else ""
        if "ffmpeg" in with_name or "ffprobe" in with_name:
            procs.append(child)
    return procs


def test_missing_ffmpeg_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, synthetic_film_template
):
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH with no ffmpeg on it
    with pytest.raises(FFmpegMissingError) as err:
        probe(synthetic_film_template.video)
    assert "ffprobe not found" in str(err.value) and INSTALL_HINT in str(err.value)
    assert err.value.exit_code == 69
    with pytest.raises(FFmpegMissingError, match="ffmpeg not found"):
        run_tool("ffmpeg", ["-version"], what="version")


def test_missing_ffmpeg_leaves_no_partial_outputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, synthetic_film_template
):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(FFmpegMissingError):
        make_proxy(synthetic_film_template.video, tmp_path / "p.mp4")
    with pytest.raises(FFmpegMissingError):
        extract_keyframes(synthetic_film_template.video, [(1.0, "scene_change")], tmp_path / "kf")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["kf"]


def test_failure_message_carries_the_stderr_tail(tmp_path: Path):
    with pytest.raises(MediaError) as err:
        run_tool(
            "ffmpeg", ["-hide_banner", "-nostdin", "-i", str(tmp_path / "nope.mkv")], what="reading nope"
        )
    msg = str(err.value)
    assert msg.startswith("reading nope: ffmpeg failed with exit status")
    assert "No such file or directory" in msg


def test_stderr_tail_keeps_the_last_lines():
    text = "\n".join(f"line {i}" for i in range(20)) + "\r\nfinal\n\n"
    assert stderr_tail(text, 3) == "line 18\nline 19\nfinal"


def test_timeout_kills_the_child():
    with pytest.raises(MediaError, match=r"timed out after 0\.5 s"):
        run_tool("ffmpeg", ENDLESS, what="endless", timeout=0.5)
    assert _ffmpeg_children() == []


def test_keyboard_interrupt_kills_the_child():
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    with sigint_raises():  # also when the suite was started with SIGINT ignored
        timer.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                run_tool("ffmpeg", ENDLESS, what="endless", timeout=20)
        finally:
            timer.cancel()
    assert _ffmpeg_children() == []


def test_process_set_kills_children_of_other_threads():
    errors: list[BaseException] = []
    procs = ProcessSet()

    def worker() -> None:
        try:
            run_tool("ffmpeg", ENDLESS, what="endless", timeout=20, procs=procs)
        except MediaError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    with pytest.raises(RuntimeError), procs:
        while len(_ffmpeg_children()) < 2:
            threading.Event().wait(0.05)
        raise RuntimeError("interrupted")
    for t in threads:
        t.join(10)
    assert len(errors) == 2 and all("cancelled" in str(e) for e in errors)
    assert _ffmpeg_children() == []
