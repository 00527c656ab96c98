"""Upstream's own evidence of which film a work dir's stages were computed from.

Our stamps sidecar records only what we saw: a stage computed by our pipeline, an invalidation we made,
or a verification against evidence. A work dir that upstream wrote has no such record, and the film's
stat at the moment we first look proves nothing about the bytes its stages came from (``rsync -a`` and
Radarr set older mtimes). What does prove it, strongest first:

1. the cache's metadata stamp (upstream's own validity rule), when a cache exists;
2. the proxy's media facts against the film's: the proxy is the film re-encoded with
   ``scale=-2:420,fps=24``, so it has the film's duration (within a tolerance), 420 lines, the width
   the film's frame shape gives, and an audio stream exactly when the film has one. Another encode of
   the same cut passes this test, and rightly: its frames at each timestamp show the same picture.

When neither can be had (no ffprobe, a film ffprobe cannot read), the stages are *unverified*: reported,
neither certified nor deleted.
"""

from __future__ import annotations

import enum
import json
import os
import stat
import subprocess
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cinecut import safefs
from cinecut.ingest.ffmpeg import FFmpegMissingError, find_tool
from cinecut.ingest.probe import MediaInfo, UnsupportedMediaError, parse_probe_json
from cinecut.ingest.proxy import PROXY_HEIGHT

#: The proxy's format duration differs from the film's by the fps conversion and audio priming: a frame
#: or two. Different cuts or a PAL speed-up differ by seconds to minutes.
DURATION_TOLERANCE_S: Final = 0.5
#: ``scale=-2`` rounds the width to an even number.
WIDTH_TOLERANCE_PX: Final = 2
#: A probe reads headers only; a film on a slow NAS still answers in well under this.
PROBE_TIMEOUT_S: Final = 15.0
_MEMO_MAX: Final = 4096
_memo: OrderedDict[tuple[int, int, int, int], MediaInfo] = OrderedDict()


class Verification(enum.StrEnum):
    """What proves which film bytes a work dir's completed stages were computed from."""

    RECORDED = "recorded"  # our sidecar: stamps we saw computed, invalidated or verified
    CACHE = "cache"  # upstream's cache stamp equals the film's
    PROXY = "proxy"  # the proxy's media facts match the film's
    UNVERIFIED = "unverified"  # completed stages, and nothing proves which film they came from
    NOTHING = "nothing"  # no completed stage and no cache: nothing to verify


class EvidenceUnavailable(Exception):
    """The evidence could not be gathered (no ffprobe, a film it cannot read): neither stale nor valid."""


@dataclass(frozen=True, slots=True)
class ProxyVerdict:
    """The proxy against the film: ``matches`` True/False, with the reason for a log line."""

    matches: bool
    reason: str


def _probe_fd(fd: int, st: os.stat_result) -> MediaInfo:
    """ffprobe the file open at ``fd`` (handed over as stdin, so no path is followed again)."""
    key = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
    hit = _memo.get(key)
    if hit is not None:
        _memo.move_to_end(key)
        return hit
    try:
        tool = find_tool("ffprobe")
    except FFmpegMissingError as exc:
        raise EvidenceUnavailable(str(exc)) from exc
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        proc = subprocess.run(
            [tool, "-v", "error", "-print_format", "json", "-show_format", "-show_streams", "/dev/stdin"],
            stdin=fd,
            capture_output=True,
            timeout=PROBE_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EvidenceUnavailable(f"ffprobe: {exc}") from exc
    if proc.returncode != 0:
        raise UnsupportedMediaError(proc.stderr.decode(errors="replace").strip()[-200:] or "ffprobe failed")
    try:
        data = json.loads(proc.stdout or b"{}")
    except ValueError as exc:
        raise UnsupportedMediaError("ffprobe output is not JSON") from exc
    if not isinstance(data, dict):
        raise UnsupportedMediaError("ffprobe output is not a JSON object")
    info = parse_probe_json(Path("/dev/stdin"), data)
    _memo[key] = info
    if len(_memo) > _MEMO_MAX:
        _memo.popitem(last=False)
    return info


def _film_facts(film: str | os.PathLike[str]) -> MediaInfo:
    try:
        fd = os.open(film, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise EvidenceUnavailable(f"film: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise EvidenceUnavailable("film: not a regular file")
        try:
            return _probe_fd(fd, st)
        except UnsupportedMediaError as exc:  # the film, not the proxy, is what ffprobe cannot read
            raise EvidenceUnavailable(f"film: {exc}") from exc
    finally:
        os.close(fd)


def proxy_matches_film(dir_fd: int, proxy_name: str, film: str | os.PathLike[str]) -> ProxyVerdict:
    """Compare the proxy in the work dir open at ``dir_fd`` with the film.

    A proxy the checkpoint calls complete that is gone, not a regular file or unreadable by ffprobe is
    no evidence for the film: ``matches=False``. EvidenceUnavailable when the film's own facts cannot be
    had (the decision is then "unverified", never "stale").
    """
    film_info = _film_facts(film)
    try:
        fd = safefs.open_regular(dir_fd, proxy_name)
    except OSError as exc:
        return ProxyVerdict(False, f"its proxy is unusable ({exc.strerror or exc})")
    try:
        try:
            proxy = _probe_fd(fd, os.fstat(fd))
        except UnsupportedMediaError:
            return ProxyVerdict(False, "its proxy is not a readable video")
    finally:
        os.close(fd)
    return compare(proxy, film_info)


def compare(proxy: MediaInfo, film: MediaInfo) -> ProxyVerdict:
    """The proxy's facts against those a ``scale=-2:420,fps=24`` encode of ``film`` would have."""
    if abs(proxy.duration_s - film.duration_s) > DURATION_TOLERANCE_S:
        return ProxyVerdict(
            False, f"its proxy lasts {proxy.duration_s:.3f} s, the film {film.duration_s:.3f} s"
        )
    want_w = film.width * PROXY_HEIGHT / film.height
    if proxy.height != PROXY_HEIGHT or abs(proxy.width - want_w) > WIDTH_TOLERANCE_PX:
        return ProxyVerdict(
            False, f"its proxy is {proxy.width}x{proxy.height}, the film's frame makes {want_w:.0f}x{PROXY_HEIGHT}"
        )
    if proxy.has_audio != film.has_audio:
        return ProxyVerdict(False, "its proxy and the film disagree on having audio")
    return ProxyVerdict(True, "its proxy matches the film (duration, frame shape, audio)")
