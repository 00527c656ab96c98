"""Scene changes (cuts) of a video, found in one ffmpeg decode pass.

``select='gt(scene,T)'`` passes only the frames whose scene score exceeds T, and ``showinfo`` logs each
one's integer pts; with the time base ffmpeg logs for the filter input, that gives exact times (the
``pts_time`` showinfo prints has six significant digits only, too coarse past 1,000 s).
"""

from __future__ import annotations

import os
import re
from fractions import Fraction
from typing import Final

from cinecut.ingest.ffmpeg import MediaError, ProcessSet, ffmpeg_args, media_arg, require_file, run_tool

DEFAULT_THRESHOLD: Final = 0.3
_FRAME_RE: Final = re.compile(rb"Parsed_showinfo_\d+ @ [^\]]*\]\s+n:\s*\d+\s+pts:\s*(-?\d+)\s")
_TIMEBASE_RE: Final = re.compile(rb"Parsed_showinfo_\d+ @ [^\]]*\]\s+config in time_base:\s*(\d+)/(\d+)")


def parse_showinfo_ticks(stderr: bytes) -> tuple[list[int], Fraction]:
    """(pts of each frame showinfo logged, in log order; the time base they count in)."""
    frames = [int(m.group(1)) for m in _FRAME_RE.finditer(stderr)]
    tb = _TIMEBASE_RE.search(stderr)
    if tb is None or int(tb.group(2)) == 0:
        if not frames:
            return [], Fraction(1, 1000)
        raise MediaError("showinfo logged no time base (unexpected ffmpeg version?)")
    return frames, Fraction(int(tb.group(1)), int(tb.group(2)))


def parse_showinfo(stderr: bytes) -> list[float]:
    """Frame times (seconds) from ffmpeg's showinfo log, in log order."""
    frames, base = parse_showinfo_ticks(stderr)
    return [float(pts * base) for pts in frames]


def detect_scene_changes(
    video: str | os.PathLike[str],
    threshold: float = DEFAULT_THRESHOLD,
    *,
    threads: int = 2,
    timeout: float | None = None,
    procs: ProcessSet | None = None,
) -> list[float]:
    """Times (seconds from the start of the file, sorted) of the frames that begin a new scene.

    ``threshold`` is ffmpeg's scene score in (0, 1): 0.3 catches hard cuts and ignores camera moves.
    Run it on the proxy: the score needs no more than 420 lines, and decoding them is cheap.
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be within (0, 1), got {threshold}")
    p = require_file(video)
    res = run_tool(
        "ffmpeg",
        ffmpeg_args(
            "-nostats",
            "-loglevel",
            "info",
            "-threads",
            str(threads),
            "-i",
            media_arg(p),
            "-map",
            "0:v:0",
            "-an",
            "-sn",
            "-dn",
            "-vf",
            f"select='gt(scene,{threshold:.6f})',showinfo",
            "-fps_mode",
            "passthrough",
            "-f",
            "null",
            "-",
        ),
        what=f"detecting scene changes in {p}",
        timeout=timeout,
        procs=procs,
    )
    return sorted(t for t in parse_showinfo(res.stderr) if t >= 0)
