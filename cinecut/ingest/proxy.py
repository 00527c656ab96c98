"""The analysis proxy: the film at 420 lines and 24 fps, the input of every later analysis stage.

The filter chain is upstream's (``scale=-2:420,fps=24``) so a proxy made here is interchangeable with
one upstream made. ffmpeg writes to a temporary name in the destination directory and the file is
renamed into place only once it is complete and synced: a crash or Ctrl-C can leave a ``*.proxy.tmp``
behind, never a truncated ``<stem>_proxy.mp4`` that looks finished.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Final

from cinecut.ingest.ffmpeg import ProcessSet, ffmpeg_args, media_arg, require_file, run_tool
from cinecut.ingest.probe import probe

PROXY_HEIGHT: Final = 420
PROXY_FPS: Final = 24
PROXY_FILTER: Final = f"scale=-2:{PROXY_HEIGHT},fps={PROXY_FPS}"
PROXY_TMP_SUFFIX: Final = ".proxy.tmp"
"""Suffix of an unfinished proxy; such files are ours to delete."""


def default_threads() -> int:
    """A modest share of the CPUs: a library server also serves streams while it analyses."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def _fsync_path(path: Path, *, directory: bool = False) -> None:
    fd = os.open(path, (os.O_RDONLY | os.O_DIRECTORY) if directory else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_proxy(
    film: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    threads: int | None = None,
    timeout: float | None = None,
    procs: ProcessSet | None = None,
) -> float:
    """Encode the 420p 24 fps proxy of ``film`` at ``dest``; returns the proxy's duration in seconds.

    The first video and (if any) first audio stream are kept; subtitles and data are dropped. Raises
    UnsupportedMediaError for a file with no video, MediaError if the encode fails (``dest`` untouched).
    """
    src = require_file(film)
    probe(src)  # a clear "not a film" error before a long encode
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}{PROXY_TMP_SUFFIX}")
    n = threads if threads is not None else default_threads()
    try:
        run_tool(
            "ffmpeg",
            ffmpeg_args(
                "-nostats",
                "-loglevel",
                "error",
                "-threads",
                str(n),
                "-i",
                media_arg(src),
                "-map",
                "0:v:0",
                "-map",
                "0:a:0?",
                "-sn",
                "-dn",
                "-vf",
                PROXY_FILTER,
                "-c:v",
                "libx264",
                "-preset",
                "veryfast",
                "-crf",
                "23",
                "-pix_fmt",
                "yuv420p",
                "-threads",
                str(n),
                "-c:a",
                "aac",
                "-b:a",
                "128k",
                "-movflags",
                "+faststart",
                "-f",
                "mp4",
                media_arg(tmp),
            ),
            what=f"making the proxy of {src}",
            timeout=timeout,
            procs=procs,
        )
        _fsync_path(tmp)
        duration = probe(tmp).duration_s
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_path(dest.parent, directory=True)
    return duration
