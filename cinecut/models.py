"""Pipeline data models shared with upstream CineCut.

Field names are the upstream ones exactly: upstream rebuilds records with ``KeyframeRecord(**record)``, so
an extra or renamed key breaks it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Final

KEYFRAME_SOURCES: Final = ("subtitle_midpoint", "scene_change", "interval_fallback")


@dataclass(frozen=True, slots=True)
class KeyframeRecord:
    """One keyframe chosen for description: when it is, where its JPEG lies, and why it was chosen."""

    timestamp_s: float
    frame_path: str
    source: str

    def to_dict(self) -> dict[str, Any]:
        """The exact mapping upstream expects (no extra keys)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: object) -> KeyframeRecord:
        """Validate a decoded mapping strictly, as upstream's ``KeyframeRecord(**record)`` would accept it.

        Raises ValueError on anything else, so callers can treat the whole file as corrupt.
        """
        if not isinstance(data, dict) or set(data) != {"timestamp_s", "frame_path", "source"}:
            raise ValueError("keyframe record must have exactly timestamp_s, frame_path, source")
        ts, path, source = data["timestamp_s"], data["frame_path"], data["source"]
        if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts) or ts < 0:
            raise ValueError("timestamp_s must be a finite non-negative number")
        if not isinstance(path, str) or not isinstance(source, str):
            raise ValueError("frame_path and source must be strings")
        if source not in KEYFRAME_SOURCES:
            raise ValueError(f"unknown keyframe source {source!r}")
        return cls(float(ts), path, source)


@dataclass(slots=True)
class DialogueEvent:
    """Upstream's dialogue event (``cinecut.models.DialogueEvent``), field for field.

    Code written against upstream imports it from here; the ingest stage uses its own leaner
    :class:`cinecut.ingest.DialogueEvent` (seconds and text only), convertible with :meth:`from_seconds`.
    """

    start_ms: int
    end_ms: int
    start_s: float
    end_s: float
    midpoint_s: float
    text: str
    emotion: str

    @classmethod
    def from_seconds(cls, start_s: float, end_s: float, text: str, emotion: str = "neutral") -> DialogueEvent:
        """An event from on-screen times in seconds (milliseconds derived as pysubs2 counts them)."""
        return cls(
            round(start_s * 1000), round(end_s * 1000), start_s, end_s, (start_s + end_s) / 2, text, emotion
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
