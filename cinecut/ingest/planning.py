"""The keyframe plan of one film: subtitles + scene changes + interval fallback, with what went missing.

A film without a subtitle sidecar is still analysed - its keyframes then come from scene changes and
intervals only - but the user is told, because the trailer is cut on dialogue and will be worse.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cinecut.ingest.ffmpeg import ProcessSet
from cinecut.ingest.keyframes import PlanEntry, plan_keyframes
from cinecut.ingest.probe import probe
from cinecut.ingest.scenes import DEFAULT_THRESHOLD, detect_scene_changes
from cinecut.ingest.subtitles import DialogueEvent, parse_subtitles

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FilmPlan:
    """Everything the keyframes stage decided, and the warnings a user should see."""

    duration_s: float
    dialogue: tuple[DialogueEvent, ...]
    scene_changes: tuple[float, ...]
    plan: tuple[PlanEntry, ...]
    warnings: tuple[str, ...]

    @property
    def timestamps(self) -> list[float]:
        """The sorted float list ``keyframe_timestamps.json`` holds."""
        return [t for t, _ in self.plan]


def plan_film(
    video: str | os.PathLike[str],
    subtitle: str | os.PathLike[str] | None,
    *,
    duration_s: float | None = None,
    scene_threshold: float = DEFAULT_THRESHOLD,
    max_gap: float = 30.0,
    min_spacing: float = 0.5,
    procs: ProcessSet | None = None,
) -> FilmPlan:
    """Plan the keyframes of ``video`` (normally the proxy) with its ``subtitle`` sidecar, if any.

    A missing sidecar (``None``) or one without dialogue is a warning, logged and returned; a sidecar
    that cannot be read is an error (SubtitleError), so a typo never silently loses the dialogue.
    """
    warnings: list[str] = []
    dialogue: list[DialogueEvent] = []
    if subtitle is None:
        warnings.append("no subtitles: keyframes come from scene changes and intervals only")
    else:
        dialogue = parse_subtitles(subtitle)
        if not dialogue:
            warnings.append(
                f"{Path(subtitle).name} has no dialogue: keyframes come from scene changes and intervals only"
            )
    duration = duration_s if duration_s is not None else probe(video).duration_s
    scenes = detect_scene_changes(video, scene_threshold, procs=procs)
    plan = plan_keyframes(duration, dialogue, scenes, max_gap=max_gap, min_spacing=min_spacing)
    for w in warnings:
        log.warning("%s: %s", video, w)
    return FilmPlan(duration, tuple(dialogue), tuple(scenes), tuple(plan), tuple(warnings))
