"""probe and the proxy, on real files made by ffmpeg."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from cinecut.demo.film import make_synthetic_film, read_frame_numbers
from cinecut.ingest import MediaError, MissingInputError, UnsupportedMediaError, make_proxy, probe
from cinecut.ingest.keyframes import extract_keyframes
from cinecut.ingest.proxy import PROXY_TMP_SUFFIX


def test_probe_synthetic_film(synthetic_film_template):
    info = probe(synthetic_film_template.video)
    assert info.duration_s == pytest.approx(synthetic_film_template.duration_s, abs=0.1)
    assert (info.width, info.height, info.fps) == (320, 240, 24.0)
    assert info.has_audio and info.video_codec == "h264"
    assert info.frame_interval_s == pytest.approx(1 / 24)


def test_probe_rejects_audio_only_and_junk(tmp_path: Path):
    wav = tmp_path / "tone.wav"
    subprocess.run(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i", "sine=d=0.5", str(wav)], check=True
    )
    with pytest.raises(UnsupportedMediaError, match="no video stream"):
        probe(wav)
    junk = tmp_path / "Heat (1995).mkv"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(UnsupportedMediaError, match="not a media file") as err:
        probe(junk)
    assert err.value.exit_code == 65
    with pytest.raises(MissingInputError, match="no such file"):
        probe(tmp_path / "absent.mkv")
    with pytest.raises(MediaError, match="not a regular file"):
        probe(tmp_path)


def test_probe_handles_names_ffmpeg_could_misread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, synthetic_film_template
):
    odd = tmp_path / "-i file:odd.mkv"
    os.link(synthetic_film_template.video, odd)
    monkeypatch.chdir(tmp_path)
    assert probe(Path(odd.name)).width == 320


def test_proxy_is_420_lines_at_24_fps(tmp_path: Path):
    film = make_synthetic_film(tmp_path / "Short.mkv", duration_s=4.0, with_subtitles=False)
    dest = tmp_path / "Short_proxy.mp4"
    duration = make_proxy(film.video, dest, threads=1)
    info = probe(dest)
    assert (info.height, info.width, info.fps) == (420, 560, 24.0)
    assert info.has_audio
    assert duration == pytest.approx(film.duration_s, abs=0.1)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(PROXY_TMP_SUFFIX)] == []
    # the proxy keeps frame timing: its frame at 2.5 s is the film's frame 60
    recs = extract_keyframes(dest, [(2.5, "scene_change")], tmp_path / "kf")
    assert read_frame_numbers([Path(recs[0].frame_path)]) == [60]


def test_failed_or_interrupted_proxy_leaves_nothing(tmp_path: Path, synthetic_film_template):
    junk = tmp_path / "junk.mkv"
    junk.write_bytes(b"\x1a\x45\xdf\xa3" + os.urandom(2048))
    with pytest.raises(UnsupportedMediaError):
        make_proxy(junk, tmp_path / "junk_proxy.mp4")
    dest = tmp_path / "film_proxy.mp4"
    with pytest.raises(MediaError, match="timed out"):
        make_proxy(synthetic_film_template.video, dest, timeout=0.2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.mkv"]
