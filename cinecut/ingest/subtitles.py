"""Dialogue from a subtitle sidecar (SRT, ASS/SSA, and whatever else pysubs2 reads).

Sidecars in real libraries come in every encoding a ripping tool ever used: UTF-8 with and without BOM,
UTF-16 from Windows tools, and cp1252 from old SRT sites. Decoding is done here, explicitly, so a stray
byte never makes the whole file unreadable. pysubs2 is imported only when a file is parsed, so the
daemon can import :mod:`cinecut` without it.
"""

from __future__ import annotations

import codecs
import os
from dataclasses import dataclass
from typing import Final

from cinecut.ingest.ffmpeg import IngestError, require_file

MAX_SUBTITLE_BYTES: Final = 32 * 1024 * 1024
"""Larger than any real subtitle file: refusing beyond it keeps a mistaken film path from being read."""

_BOMS: Final = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


class SubtitleError(IngestError):
    """A subtitle file that cannot be read as subtitles (unknown format, not text, too large)."""


@dataclass(frozen=True, slots=True)
class DialogueEvent:
    """One line of dialogue: when it is on screen, and its plain text (styling tags removed)."""

    start_s: float
    end_s: float
    text: str

    @property
    def midpoint_s(self) -> float:
        """The moment a keyframe is taken for this line."""
        return (self.start_s + self.end_s) / 2


def decode_subtitle_bytes(data: bytes) -> tuple[str, str]:
    """Decode subtitle bytes; returns (text, encoding used).

    A BOM decides; otherwise UTF-8, then cp1252 (the usual Windows legacy), then latin-1, which accepts
    any byte sequence. BOM-less UTF-16 is recognised by its NUL bytes.
    """
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            return data.decode(encoding), encoding
    if b"\x00" in data[:4096]:
        head = data[:4096]
        encoding = "utf-16-le" if head[1::2].count(0) > head[0::2].count(0) else "utf-16-be"
        try:
            return data.decode(encoding), encoding
        except UnicodeDecodeError as exc:
            raise SubtitleError(f"binary data, not a subtitle file ({exc.reason})") from exc
    for encoding in ("utf-8", "cp1252"):
        try:
            return data.decode(encoding), encoding
        except UnicodeDecodeError:
            continue
    return data.decode("latin-1"), "latin-1"


def parse_subtitles(path: str | os.PathLike[str]) -> list[DialogueEvent]:
    """Dialogue events of a subtitle file, sorted by start time.

    Comment lines, events with no visible text and events with a negative length are skipped; styling
    (``{\\i1}``, ``<i>``) is removed and ASS line breaks become newlines. SubtitleError when the file is
    not a subtitle format pysubs2 knows (MissingInputError if it does not exist).
    """
    p = require_file(path)
    size = p.stat().st_size
    if size > MAX_SUBTITLE_BYTES:
        raise SubtitleError(f"{p}: {size} bytes is too large for a subtitle file")
    try:
        text, encoding = decode_subtitle_bytes(p.read_bytes())
    except SubtitleError as exc:
        raise SubtitleError(f"{p}: {exc}") from exc
    text = text.replace("\r\n", "\n").replace("\r", "\n")  # Windows and old Mac line ends
    if not text.strip():
        raise SubtitleError(f"{p}: empty subtitle file")

    import pysubs2  # lazily: the daemon imports cinecut without pysubs2

    try:  # the format is detected from the content: extensions lie (an .srt that is really ASS)
        subs = pysubs2.SSAFile.from_string(text, fps=23.976)
    except pysubs2.exceptions.Pysubs2Error as exc:
        raise SubtitleError(f"{p}: not a subtitle file pysubs2 can read ({exc})") from exc
    except (ValueError, KeyError, IndexError, TypeError) as exc:  # malformed content deep in a parser
        raise SubtitleError(f"{p}: malformed {encoding} subtitle file ({type(exc).__name__}: {exc})") from exc

    events: list[DialogueEvent] = []
    for ev in subs.events:
        if ev.is_comment:
            continue
        plain = ev.plaintext.strip()
        if not plain or ev.end < ev.start:
            continue
        events.append(DialogueEvent(max(ev.start, 0) / 1000.0, max(ev.end, 0) / 1000.0, plain))
    events.sort(key=lambda e: (e.start_s, e.end_s))
    return events
