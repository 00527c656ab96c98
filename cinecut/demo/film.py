"""A synthetic film for the demo and the tests: real video with real cuts, audio, and a subtitle sidecar.

Nobody can ship a feature film with a test suite, so one is generated with ffmpeg's lavfi sources
(``testsrc2``, ``smptebars``, ``life``, ...), one per shot, concatenated so the cuts between them are
real scene changes that ``select='gt(scene,...)'`` finds. A strip of 16 black/white blocks along the top
encodes the frame number in binary, so a test can read back *which* frame a JPEG shows
(:func:`read_frame_numbers`) instead of trusting the code that extracted it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cinecut.ingest.ffmpeg import ffmpeg_args, media_arg, run_tool

FPS: Final = 24
WIDTH: Final = 320
HEIGHT: Final = 240
CODE_BITS: Final = 16
"""Bits of the frame-number strip: 65,535 frames, 45 minutes at 24 fps."""
STRIP_FRACTION: Final = 15
"""The strip is the top 1/15 of the picture (16 px at 240 px), so it survives any rescale."""
_SAMPLE_RATE: Final = 48000
_MAX_DURATION_S: Final = (2**CODE_BITS - 1) / FPS

# One shot per source, in this order; neighbours differ enough that every cut scores well above 0.3.
_SHOTS: Final = (
    "testsrc2=s={s}:r={r}",
    "smptebars=s={s}:r={r}",
    "life=s={s}:r={r}:mold=10:ratio=0.1:seed=7:death_color=#C83232:life_color=#00ff00",
    "testsrc=s={s}:r={r}",
    "rgbtestsrc=s={s}:r={r}",
    "gradients=s={s}:r={r}:seed=11:speed=0.02",
    "color=c=0x1f3f7f:s={s}:r={r}",
    "smptehdbars=s={s}:r={r}",
)
# Shot lengths in seconds, cycled: irregular, like an edit.
_SHOT_LENGTHS_S: Final = (5.0, 4.0, 6.5, 3.5, 5.5, 4.5, 7.0, 3.0)
_LINES: Final = (
    "We don't have much time.",
    "<i>Where were you last night?</i>",
    "The money's in the car.\nAll of it.",
    "Nobody leaves this room.",
    "You said that before.",
    "Then listen this time.",
    "It's raining again.",
    "I know what you did.",
)


@dataclass(frozen=True, slots=True)
class SyntheticFilm:
    """A generated film: its files and the ground truth the tests check against."""

    video: Path
    subtitle: Path | None
    duration_s: float
    cut_times: tuple[float, ...]
    """Start of every shot after the first, in seconds (where a scene detector must find a change)."""
    events: tuple[tuple[float, float, str], ...] = ()
    """The subtitle events written, as (start_s, end_s, plain text)."""
    fps: float = float(FPS)

    def frame_time(self, frame_number: int) -> float:
        """When frame ``frame_number`` is shown."""
        return frame_number / self.fps


def _shot_frames(total_frames: int) -> list[int]:
    """Split ``total_frames`` into shots of the cycled lengths; a short tail joins the shot before it."""
    shots: list[int] = []
    left, i = total_frames, 0
    while left > 0:
        n = min(left, round(_SHOT_LENGTHS_S[i % len(_SHOT_LENGTHS_S)] * FPS))
        shots.append(n)
        left -= n
        i += 1
    if len(shots) > 1 and shots[-1] < 2 * FPS:
        tail = shots.pop()
        shots[-1] += tail
    return shots


def _filter_graph(shots: Sequence[int]) -> str:
    """Shots + per-shot tones, concatenated, with the frame-number strip laid over the top."""
    size = f"{WIDTH}x{HEIGHT}"
    parts: list[str] = []
    for i, frames in enumerate(shots):
        src = _SHOTS[i % len(_SHOTS)].format(s=size, r=FPS)
        parts.append(f"{src},format=yuv420p,trim=end_frame={frames},setpts=PTS-STARTPTS[v{i}]")
        freq = 220 + 110 * (i % 7)
        samples = frames * _SAMPLE_RATE // FPS
        parts.append(f"sine=f={freq}:sample_rate={_SAMPLE_RATE},atrim=end_sample={samples}[a{i}]")
    pads = "".join(f"[v{i}][a{i}]" for i in range(len(shots)))
    parts.append(f"{pads}concat=n={len(shots)}:v=1:a=1[cv][aout]")
    strip_h = HEIGHT // STRIP_FRACTION
    bit = f"mod(floor(N/pow(2,{CODE_BITS - 1}-X)),2)"
    parts.append(
        f"nullsrc=s={CODE_BITS}x1:r={FPS},geq=lum='255*{bit}':cb=128:cr=128,"
        f"scale={WIDTH}:{strip_h}:flags=neighbor[strip]"
    )
    parts.append("[cv][strip]overlay=0:0:shortest=1,format=yuv420p[vout]")
    return ";".join(parts)


def _ms_to_srt(t: float) -> str:
    ms = round(t * 1000)
    h, rem = divmod(ms, 3_600_000)
    m, rem = divmod(rem, 60_000)
    s, ms = divmod(rem, 1000)
    return f"{h:02d}:{m:02d}:{s:02d},{ms:03d}"


def _events(duration_s: float) -> list[tuple[float, float, str]]:
    """Dialogue every few seconds, of varying length, ending before the film does."""
    events: list[tuple[float, float, str]] = []
    t, i = 1.0, 0
    while True:
        length = 1.6 + 0.4 * (i % 3)
        if t + length > duration_s - 0.5:
            return events
        events.append((round(t, 3), round(t + length, 3), _LINES[i % len(_LINES)]))
        t += length + 1.2 + 0.7 * (i % 4)
        i += 1


def _plain(text: str) -> str:
    return text.replace("<i>", "").replace("</i>", "")


def _write_srt(path: Path, events: Sequence[tuple[float, float, str]]) -> None:
    blocks = [
        f"{n}\n{_ms_to_srt(a)} --> {_ms_to_srt(b)}\n{text}\n" for n, (a, b, text) in enumerate(events, 1)
    ]
    path.write_text("\n".join(blocks), encoding="utf-8")


def _write_ass(path: Path, events: Sequence[tuple[float, float, str]]) -> None:
    """An ASS script with override tags and one Comment line (which parsers must skip)."""
    import pysubs2

    subs = pysubs2.SSAFile()
    for a, b, text in events:
        ass_text = text.replace("<i>", r"{\i1}").replace("</i>", r"{\i0}").replace("\n", r"\N")
        subs.append(pysubs2.SSAEvent(start=round(a * 1000), end=round(b * 1000), text=ass_text))
    if events:
        a, b, _ = events[0]
        subs.append(
            pysubs2.SSAEvent(start=round(a * 1000), end=round(b * 1000), text="timing note", type="Comment")
        )
    subs.sort()
    subs.save(os.fspath(path), format_="ass")


def make_synthetic_film(
    path: Path,
    *,
    duration_s: float = 30.0,
    with_subtitles: bool = True,
    subtitle_format: str = "srt",
) -> SyntheticFilm:
    """Render a film of about ``duration_s`` seconds (320x240, 24 fps, H.264 + a tone per shot) to ``path``.

    The container follows the suffix (``.mkv``, ``.mp4``, ...); with subtitles, ``<stem>.srt`` or
    ``<stem>.ass`` is written beside it. Takes well under a second per 30 s of film (ultrafast preset).
    """
    if not 1.0 <= duration_s <= _MAX_DURATION_S:
        raise ValueError(f"duration_s must be within 1..{_MAX_DURATION_S:.0f} s, got {duration_s}")
    if subtitle_format not in ("srt", "ass"):
        raise ValueError(f"subtitle_format must be 'srt' or 'ass', got {subtitle_format!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    shots = _shot_frames(round(duration_s * FPS))
    # FLAC has no encoder delay, so in Matroska the video starts at exactly 0; AAC's priming shifts it.
    audio = (
        ["-c:a", "flac"]
        if path.suffix.lower() in (".mkv", ".mka", ".webm")
        else ["-c:a", "aac", "-b:a", "64k"]
    )
    run_tool(
        "ffmpeg",
        ffmpeg_args(
            "-loglevel",
            "error",
            "-filter_complex",
            _filter_graph(shots),
            "-map",
            "[vout]",
            "-map",
            "[aout]",
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-g",
            "48",
            "-pix_fmt",
            "yuv420p",
            *audio,
            media_arg(path),
        ),
        what=f"rendering synthetic film {path}",
        timeout=600,
    )
    start = _video_start(path)
    cuts, at = [], 0
    for frames in shots[:-1]:
        at += frames
        cuts.append(round(start + at / FPS, 6))
    duration = sum(shots) / FPS
    subtitle: Path | None = None
    events: list[tuple[float, float, str]] = []
    if with_subtitles:
        events = _events(duration)
        subtitle = path.with_name(f"{path.stem}.{subtitle_format}")
        (_write_srt if subtitle_format == "srt" else _write_ass)(subtitle, events)
    return SyntheticFilm(
        video=path,
        subtitle=subtitle,
        duration_s=duration,
        cut_times=tuple(cuts),
        events=tuple((a, b, _plain(text)) for a, b, text in events),
    )


def _video_start(path: Path) -> float:
    """Where the first video frame lies on the timeline ffmpeg's ``-ss`` counts on (from the file's start)."""
    res = run_tool(
        "ffprobe",
        [
            "-v",
            "error",
            "-select_streams",
            "v:0",
            "-show_entries",
            "stream=start_time:format=start_time",
            "-of",
            "json",
            media_arg(path),
        ],
        what=f"probing {path}",
        timeout=60,
    )
    data = json.loads(res.stdout)
    video = float((data.get("streams") or [{}])[0].get("start_time", 0.0))
    container = float((data.get("format") or {}).get("start_time", 0.0))
    return video - container


def read_frame_numbers(jpegs: Sequence[Path]) -> list[int]:
    """The frame number each image shows, read from its binary strip (one ffmpeg run for all of them).

    Works on any rescale of the film (the proxy, the keyframes), since the strip is a fixed fraction of
    the height and each bit a fixed fraction of the width.
    """
    if not jpegs:
        return []
    with tempfile.TemporaryDirectory(prefix="cinecut-frames-") as tmp:
        for i, p in enumerate(jpegs):
            os.symlink(os.path.abspath(p), os.path.join(tmp, f"{i:06d}.jpg"))
        res = run_tool(
            "ffmpeg",
            ffmpeg_args(
                "-loglevel",
                "error",
                "-f",
                "image2",
                "-i",
                os.path.join(tmp, "%06d.jpg"),
                "-vf",
                f"crop=iw:ih/{STRIP_FRACTION}:0:0,scale={CODE_BITS}:1:flags=area,format=gray",
                "-f",
                "rawvideo",
                "-",
            ),
            what="reading frame numbers",
            timeout=120,
        )
    raw = res.stdout
    if len(raw) != CODE_BITS * len(jpegs):
        raise ValueError(f"expected {len(jpegs)} decoded strips, got {len(raw) / CODE_BITS:g}")
    numbers = []
    for i in range(len(jpegs)):
        bits = raw[i * CODE_BITS : (i + 1) * CODE_BITS]
        numbers.append(int("".join("1" if b >= 128 else "0" for b in bits), 2))
    return numbers
