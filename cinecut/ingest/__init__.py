"""Ingestion: probe a film, make its proxy, read its subtitles, plan and extract its keyframes.

Everything shells out to ffmpeg/ffprobe (Debian's ``ffmpeg`` package). pysubs2 is imported only when a
subtitle file is parsed, so importing this package needs nothing beyond the standard library.
"""

from cinecut.ingest.ffmpeg import FFmpegMissingError, IngestError, MediaError, MissingInputError
from cinecut.ingest.keyframes import extract_keyframes, extract_keyframes_per_frame, plan_keyframes
from cinecut.ingest.planning import FilmPlan, plan_film
from cinecut.ingest.probe import MediaInfo, UnsupportedMediaError, probe
from cinecut.ingest.proxy import make_proxy
from cinecut.ingest.scenes import detect_scene_changes
from cinecut.ingest.subtitles import DialogueEvent, SubtitleError, parse_subtitles

__all__ = [
    "DialogueEvent",
    "FFmpegMissingError",
    "FilmPlan",
    "IngestError",
    "MediaError",
    "MediaInfo",
    "MissingInputError",
    "SubtitleError",
    "UnsupportedMediaError",
    "detect_scene_changes",
    "extract_keyframes",
    "extract_keyframes_per_frame",
    "make_proxy",
    "parse_subtitles",
    "plan_film",
    "plan_keyframes",
    "probe",
]
