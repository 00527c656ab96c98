"""Which subtitle sidecar a run reads: the best-ranked one that parses.

Sidecars are ranked untagged first, then English, then other languages; full before forced (forced
subtitles hold only the foreign-language lines), before hearing-impaired; SRT before ASS. A sidecar the
run picked itself and cannot read yields to the next one with a warning; one the user named is an error.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

from cinecut.ingest import DialogueEvent, SubtitleError, parse_subtitles
from cinecut.workdir import subtitle_sidecars

#: Worded as :func:`cinecut.ingest.plan_film` words it, so the two are one warning.
NO_SUBTITLES_WARNING: Final = "no subtitles: keyframes come from scene changes and intervals only"

_LANGUAGE_FREE_TAGS: Final = frozenset({"forced", "sdh", "hi", "cc", "default", "full"})
_ENGLISH: Final = frozenset({"en", "eng", "english", "en-us", "en-gb", "en_us", "en_gb"})
_EXT_RANK: Final = {".srt": 0, ".ass": 1, ".ssa": 2}


def _subtitle_rank(sub: Path, stem: str) -> tuple[int, int, int, int, str]:
    base, ext = os.path.splitext(sub.name)
    tags = [t.lower() for t in base[len(stem) :].split(".") if t]
    langs = [t for t in tags if t not in _LANGUAGE_FREE_TAGS]
    lang = 0 if not langs else 1 if any(t in _ENGLISH for t in langs) else 2
    forced = int("forced" in tags)  # forced subtitles hold only the foreign-language lines
    hearing = int(any(t in ("sdh", "hi", "cc") for t in tags))
    return (lang, forced, hearing, _EXT_RANK.get(ext.lower(), 3), sub.name)


def rank_subtitles(film: Path, sidecars: Sequence[Path]) -> list[Path]:
    """Sidecars, best first: untagged, then English, then others; full before forced; SRT before ASS."""
    stem = film.stem
    return sorted(sidecars, key=lambda s: _subtitle_rank(s, stem))


def choose_subtitle(film: str | os.PathLike[str]) -> Path | None:
    """The subtitle sidecar a run uses when none is given (``<stem>.srt``, ``<stem>.en.srt``, ...)."""
    f = Path(os.path.abspath(film))  # paired by the name given, as the daemon pairs them
    ranked = rank_subtitles(f, subtitle_sidecars(f))
    return ranked[0] if ranked else None


def read_dialogue(
    candidates: Sequence[Path], *, explicit: bool, warn: Callable[[str], None]
) -> tuple[Path | None, list[DialogueEvent]]:
    """The first candidate that parses and its dialogue; (None, []) with a warning when none does.

    ``explicit``: the one candidate is the user's choice, so its SubtitleError propagates.
    """
    for cand in candidates:
        try:
            return cand, parse_subtitles(cand)
        except SubtitleError as exc:
            if explicit:
                raise
            warn(f"skipping subtitle {cand.name}: {exc}")
    warn(NO_SUBTITLES_WARNING)
    return None, []
