"""``probe(path) -> MediaInfo``: what ffprobe says about a film, reduced to what the pipeline needs."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from cinecut.ingest.ffmpeg import MediaError, media_arg, require_file, run_tool

PROBE_TIMEOUT_S = 60.0


class UnsupportedMediaError(MediaError):
    """Not a media file ffmpeg can read, or one without a video stream (audio only, a subtitle, junk)."""


@dataclass(frozen=True, slots=True)
class MediaInfo:
    """The facts about a film the ingest steps rely on."""

    path: Path
    duration_s: float
    width: int
    height: int
    fps: float
    has_audio: bool
    video_codec: str
    time_base: Fraction
    """Time base of the video stream: converts ffmpeg's integer pts to exact seconds."""

    @property
    def frame_interval_s(self) -> float:
        """Seconds between frames (the tolerance of "the frame at t")."""
        return 1.0 / self.fps if self.fps > 0 else 0.0


def _fraction(value: object) -> Fraction | None:
    """``"24000/1001"`` -> Fraction; None for ffprobe's ``0/0`` and garbage."""
    if not isinstance(value, str) or not value:
        return None
    try:
        f = Fraction(value)
    except (ValueError, ZeroDivisionError):
        return None
    return f if f > 0 else None


def _float(value: object) -> float | None:
    try:
        f = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) and f > 0 else None


def parse_probe_json(path: Path, data: dict[str, Any]) -> MediaInfo:
    """Build MediaInfo from ffprobe's ``-show_format -show_streams`` JSON (UnsupportedMediaError if no video).

    Cover art (an attached picture) is not a video stream: a music file with artwork is not a film.
    """
    streams = [s for s in data.get("streams") or [] if isinstance(s, dict)]
    videos = [
        s
        for s in streams
        if s.get("codec_type") == "video" and not (s.get("disposition") or {}).get("attached_pic")
    ]
    if not videos:
        raise UnsupportedMediaError(f"{path}: no video stream (is this a film?)")
    v = videos[0]
    fmt = data.get("format") or {}
    duration = _float(fmt.get("duration")) or _float(v.get("duration"))
    if duration is None:
        raise UnsupportedMediaError(f"{path}: ffprobe reports no duration (a still image or a broken file?)")
    rate = _fraction(v.get("avg_frame_rate")) or _fraction(v.get("r_frame_rate"))
    width, height = v.get("width"), v.get("height")
    if not isinstance(width, int) or not isinstance(height, int) or width <= 0 or height <= 0:
        raise UnsupportedMediaError(f"{path}: video stream has no frame size")
    return MediaInfo(
        path=path,
        duration_s=duration,
        width=width,
        height=height,
        fps=float(rate) if rate else 0.0,
        has_audio=any(s.get("codec_type") == "audio" for s in streams),
        video_codec=str(v.get("codec_name") or "unknown"),
        time_base=_fraction(v.get("time_base")) or Fraction(1, 1000),
    )


def probe(path: str | os.PathLike[str], *, timeout: float = PROBE_TIMEOUT_S) -> MediaInfo:
    """Probe a film with ffprobe.

    MissingInputError if absent, UnsupportedMediaError if ffprobe cannot read it or it has no video,
    FFmpegMissingError without ffprobe.
    """
    p = require_file(path)
    try:
        res = run_tool(
            "ffprobe",
            ["-v", "error", "-print_format", "json", "-show_format", "-show_streams", media_arg(p)],
            what=f"probing {p}",
            timeout=timeout,
        )
    except UnsupportedMediaError:
        raise
    except MediaError as exc:
        if "timed out" in str(exc):
            raise
        raise UnsupportedMediaError(f"{p}: not a media file ffmpeg can read\n{exc}") from exc
    try:
        data = json.loads(res.stdout or b"{}")
    except json.JSONDecodeError as exc:
        raise UnsupportedMediaError(f"{p}: ffprobe output is not JSON") from exc
    if not isinstance(data, dict):
        raise UnsupportedMediaError(f"{p}: ffprobe output is not a JSON object")
    return parse_probe_json(p, data)
