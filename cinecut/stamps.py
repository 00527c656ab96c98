"""``cinecut_stamps.json``: the input stamps a work dir's completed stages are consistent with.

Upstream's checkpoint cannot hold extra keys and its cache only stamps the video, so staleness of the
proxy and keyframes (which exist without a cache) and of subtitle-derived stages needs a record of its
own. This sidecar is that record: written last, after an invalidation or a completed stage, so it acts
as a commit mark. Losing it is harmless (the next check re-derives it); upstream never reads it.
"""

from __future__ import annotations

import json
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cinecut import safefs
from cinecut.paths import film_identity
from cinecut.stamp import SourceStamp
from cinecut.workdir import STAMPS_NAME

FORMAT: Final = 1
#: Thousands of subtitle entries; a hostile JSON file costs up to ~25x its size to parse.
MAX_STAMPS_BYTES: Final = 256 << 10
_TMP_SUFFIX: Final = ".stamps.tmp"

SubtitleStamps = tuple[tuple[str, SourceStamp], ...]


@dataclass(frozen=True, slots=True)
class InputStamps:
    """Stamps of a film's inputs: the video (and its inode, to recognise a rename) and its subtitles."""

    source_file: str
    video: SourceStamp | None
    subtitles: SubtitleStamps
    inode: int | None = None
    device: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "source_file": self.source_file,
            "video": self.video.to_dict() if self.video else None,
            "inode": self.inode,
            "device": self.device,
            "subtitles": [{"name": n, **s.to_dict()} for n, s in self.subtitles],
            "recorded_at": time.time(),
        }

    @classmethod
    def from_dict(cls, data: object) -> InputStamps:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError("not a stamps file of a known format")
        src = data.get("source_file")
        if not isinstance(src, str):
            raise ValueError("source_file must be a string")
        video = None if data.get("video") is None else SourceStamp.from_dict(data["video"])
        subs_raw = data.get("subtitles")
        if not isinstance(subs_raw, list):
            raise ValueError("subtitles must be a list")
        subs = []
        for item in subs_raw:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise ValueError("subtitle entries need a name")
            subs.append((item["name"], SourceStamp.from_dict(item)))
        if len({n for n, _ in subs}) != len(subs):
            raise ValueError("duplicate subtitle names")
        inode, device = data.get("inode"), data.get("device")
        for v in (inode, device):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise ValueError("inode/device must be integers")
        return cls(src, video, tuple(sorted(subs, key=_name)), inode, device)


def _name(entry: tuple[str, SourceStamp]) -> str:
    """Sort key: stamps are not ordered, and two entries must never be compared by stamp."""
    return entry[0]


def current_stamps(
    film: str | os.PathLike[str],
    subtitles: list[Path] | tuple[Path, ...],
    *,
    st: os.stat_result | None = None,
    resolved: bool = False,
) -> InputStamps:
    """Stamp the film and its subtitle sidecars now (a vanished film gets ``video=None``).

    ``st`` is a ``stat`` of the film the caller just made, and ``resolved`` says ``film`` is already
    upstream's spelling (``WorkDir.film``): each saves syscalls on a rescan's hot path.
    """
    try:
        if st is None:
            st = os.stat(film)
        video, inode, dev = SourceStamp.from_stat(st), st.st_ino, st.st_dev
    except OSError:
        video, inode, dev = None, None, None
    subs = []
    stem = film.stem if isinstance(film, Path) else Path(film).stem
    for sub in subtitles:
        stamp = SourceStamp.maybe(sub)
        if stamp is not None:
            subs.append((subtitle_key(Path(sub).name, stem), stamp))
    # Upstream's spelling; a record in another spelling is the same film.
    src = os.fspath(film) if resolved else film_identity(film)
    return InputStamps(src, video, tuple(sorted(subs, key=_name)) if subs else (), inode, dev)


def subtitle_key(name: str, stem: str) -> str:
    """A subtitle's name relative to its film's stem (``Heat.en.srt`` -> ``.en.srt``).

    Keyed this way, a film renamed together with its subtitles (Radarr does both) keeps equal stamps.
    """
    return name[len(stem) :] if name.startswith(stem) else name


#: Extensions searched when a recorded subtitle is missing under its name (besides the recorded one's).
_SUBTITLE_EXTENSIONS: Final = frozenset({".srt", ".ass", ".ssa", ".vtt", ".sub"})


def subtitles_unchanged(
    recorded: InputStamps, current: InputStamps, folder: str | os.PathLike[str]
) -> tuple[bool, str]:
    """Whether the subtitle *content* the record names is still what the film has; with the reason if not.

    A subtitle is identified by its stamp, not its name: a film renamed before (or without) its
    subtitles, or subtitles renamed before their film, changes which names pair with the film, not a
    byte of any input. So a recorded subtitle is unchanged while a file with its stamp is still the
    film's or still lies in the film's folder under any name; it changed only when no such file is
    left (edited, replaced or deleted). A subtitle whose stamp the record does not hold is new content
    the pipeline would read (another language, a first subtitle): the subtitle stages are stale.
    """
    if recorded.subtitles == current.subtitles:
        return True, ""
    had = {s for _, s in recorded.subtitles}
    have = {s for _, s in current.subtitles}
    new = [n for n, s in current.subtitles if s not in had]
    if new:
        return False, f"new subtitle content: {', '.join(new)}"
    missing = [(n, s) for n, s in recorded.subtitles if s not in have]
    if not missing:
        return True, ""
    exts = _SUBTITLE_EXTENSIONS | {os.path.splitext(n)[1].lower() for n, _ in missing}
    found = _stamps_in_folder(folder, exts, {s.size for _, s in missing})
    gone = [n for n, s in missing if s not in found]
    if gone:
        return False, f"subtitle changed or deleted: {', '.join(gone)}"
    return True, ""


def _stamps_in_folder(folder: str | os.PathLike[str], exts: frozenset[str] | set[str], sizes: set[int]) -> set[SourceStamp]:
    """Stamps of the subtitle-like files in ``folder`` whose size is one of ``sizes`` (no symlinks)."""
    out: set[SourceStamp] = set()
    try:
        with os.scandir(folder) as it:
            for entry in it:
                if entry.name.startswith(".") or os.path.splitext(entry.name)[1].lower() not in exts:
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if st.st_size in sizes and stat.S_ISREG(st.st_mode):
                    out.add(SourceStamp.from_stat(st))
    except OSError:
        pass
    return out


def read_stamps_at(dir_fd: int) -> InputStamps | None:
    """The sidecar of the work dir open at ``dir_fd``; None when missing, corrupt or symlinked."""
    try:
        data = safefs.read_bounded(dir_fd, STAMPS_NAME, MAX_STAMPS_BYTES)
        return InputStamps.from_dict(json.loads(data))
    except (OSError, ValueError, RecursionError):
        return None


def read_stamps(work_dir: str | os.PathLike[str]) -> InputStamps | None:
    """The sidecar of a work dir by path; None when missing or unusable."""
    try:
        with safefs.work_dir_fd(work_dir) as fd:
            return read_stamps_at(fd)
    except OSError:
        return None


def write_stamps_at(dir_fd: int, stamps: InputStamps, *, durable: bool = False) -> None:
    """Replace the sidecar atomically.

    Not fsynced by default: a sidecar lost to a power cut only makes the next check redo an idempotent
    invalidation or re-adopt the current stamps, so durability would cost latency for nothing.
    """
    data = json.dumps(stamps.to_dict()).encode()  # ASCII escapes: non-UTF-8 film names round-trip
    safefs.atomic_write(dir_fd, STAMPS_NAME, data, tmp_suffix=_TMP_SUFFIX, durable=durable)
