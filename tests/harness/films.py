"""Films as a media library holds them, and the work dirs a finished pipeline run leaves.

Tests need realistic inputs (a film with subtitles and a trailer beside it) and realistic results (a
checkpoint with every stage complete, a cache, proxy, keyframes, manifests, user files, our stamps
sidecar), written with the core's own writers so they are exactly what upstream and our pipeline leave;
:func:`lock_held` plays a pipeline holding a work dir's lock from another process.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cinecut import safefs
from cinecut.checkpoint import PipelineCheckpoint, save_checkpoint
from cinecut.inference.cache import save_cache
from cinecut.inference.models import SceneDescription
from cinecut.models import KeyframeRecord
from cinecut.revalidate import revalidate
from cinecut.stamps import current_stamps, write_stamps_at
from cinecut.workdir import (
    ASSEMBLY_MANIFEST_NAME,
    TRAILER_MANIFEST_NAME,
    WorkDir,
    keyframe_name,
)

#: Every stage complete, in upstream's completion order.
ALL_STAGES = ["proxy", "subtitles", "keyframes", "structural", "narrative", "assembly", "music"]
#: Files in a work dir that are never ours to delete (a user may have edited the manifests).
KEPT_IN_WORK_DIR = (TRAILER_MANIFEST_NAME, ASSEMBLY_MANIFEST_NAME, "notes.txt", "stems/dialogue.wav")


@dataclass(frozen=True)
class Film:
    """A film file with its sidecars, as a media library holds it."""

    path: Path
    subtitles: tuple[Path, ...] = ()
    trailer: Path | None = None

    @property
    def wd(self) -> WorkDir:
        return WorkDir.for_film(self.path)

    @property
    def stem(self) -> str:
        return self.path.stem


def film_bytes(size: int, seed: int = 0) -> bytes:
    """Distinct, cheap, deterministic content for a film of ``size`` bytes."""
    block = (f"cinecut-film-{seed}-".encode() * 64)[:4096]
    return (block * (size // len(block) + 1))[:size]


SRT = "1\n00:00:01,000 --> 00:00:02,500\nHello there.\n\n2\n00:00:04,000 --> 00:00:05,000\nGoodbye.\n"


def make_film(
    folder: Path,
    stem: str = "Heat (1995)",
    ext: str = ".mkv",
    *,
    size: int = 64 * 1024,
    seed: int = 0,
    subtitles: Iterable[str] = (".en.srt",),
    trailer: str | None = "action",
) -> Film:
    """Write a film, its subtitle sidecars and (optionally) an upstream trailer beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}{ext}"
    path.write_bytes(film_bytes(size, seed))
    subs = []
    for suffix in subtitles:
        sub = folder / f"{stem}{suffix}"
        sub.write_text(SRT)
        subs.append(sub)
    trailer_path = None
    if trailer is not None:
        trailer_path = folder / f"{stem}_trailer_{trailer}.mp4"
        trailer_path.write_bytes(b"final trailer: user data " * 40)
    return Film(path, tuple(subs), trailer_path)


def build_work_dir(film: Film, *, frames: int = 6, vibe: str = "action", record_stamps: bool = True) -> WorkDir:
    """Leave the work dir a finished pipeline run leaves: checkpoint with every stage complete, a cache
    saved with the core's ``save_cache``, proxy, keyframes, timestamps, manifests, later-stage output and
    an unknown file; then (``record_stamps``) the stamps sidecar our pipeline's commit mark records."""
    wd = film.wd
    kdir = wd.keyframes_dir
    kdir.mkdir(parents=True, exist_ok=True)
    stamps = [1.5 + 2.25 * i for i in range(frames)]
    results = []
    for i, ts in enumerate(stamps):
        jpg = kdir / keyframe_name(ts)
        jpg.write_bytes(b"\xff\xd8\xff\xe0jpeg" + bytes([i]) * 300)
        desc = None if i == 2 else SceneDescription(f"scene {i}", "tense", "running", "street")
        results.append((KeyframeRecord(ts, str(jpg), "subtitle_midpoint" if i % 2 else "scene_change"), desc))
    wd.timestamps_path.write_text(json.dumps(stamps))
    wd.proxy_path.write_bytes(b"proxy video " * 500)
    save_cache(results, film.path, wd)
    (wd.path / TRAILER_MANIFEST_NAME).write_text(json.dumps({"film": film.stem, "edited_by_user": True}))
    (wd.path / ASSEMBLY_MANIFEST_NAME).write_text(json.dumps({"clips": [1, 2, 3]}))
    (wd.path / "notes.txt").write_text("my notes about this cut\n")
    (wd.path / "stems").mkdir(exist_ok=True)
    (wd.path / "stems" / "dialogue.wav").write_bytes(b"RIFFwav" * 100)
    save_checkpoint(
        PipelineCheckpoint(
            source_file=str(film.path),
            vibe=vibe,
            stages_complete=list(ALL_STAGES),
            proxy_path=str(wd.proxy_path),
            keyframe_count=frames,
            dialogue_event_count=2,
            inference_complete=True,
            cache_hit=False,
            manifest_path=str(wd.path / TRAILER_MANIFEST_NAME),
            assembly_manifest_path=str(wd.path / ASSEMBLY_MANIFEST_NAME),
            proxy_duration_s=5400.125,
            structural_anchors={"act1_end": 1800.0, "act2_end": 3600.5},
        ),
        wd,
    )
    # The proxy was made from the film: never older than it (the "no sidecar yet" witness checks that).
    st = os.stat(film.path)
    os.utime(wd.proxy_path, (st.st_atime, st.st_mtime + 1))
    if record_stamps:
        res = revalidate(film.path, film.subtitles)
        assert res.report is None or not res.report.changed_anything, res.report
        with safefs.work_dir_fd(wd.path) as fd:
            write_stamps_at(fd, current_stamps(film.path, list(film.subtitles)))
    return wd


def make_film_with_work_dir(folder: Path, stem: str = "Heat (1995)", **kwargs: Any) -> Film:
    """:func:`make_film` then :func:`build_work_dir`: a film whose cache is warm and stamps recorded."""
    frames = kwargs.pop("frames", 6)
    film = make_film(folder, stem, **kwargs)
    build_work_dir(film, frames=frames)
    return film


@contextlib.contextmanager
def lock_held(work_dir: Path, purpose: str = "pipeline") -> Iterator[subprocess.Popen[str]]:
    """A separate process holding ``cinecut.locks.work_dir_lock`` on ``work_dir`` until the block ends."""
    code = (
        "import sys\n"
        "from cinecut.locks import work_dir_lock\n"
        f"lock = work_dir_lock({str(work_dir)!r}, purpose={purpose!r}, announce=True)\n"
        "lock.acquire(5)\n"
        "print('locked', flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "locked", f"lock holder failed to start: {line!r}"
        yield proc
    finally:
        if proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
        proc.wait(10)
