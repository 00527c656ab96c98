"""A hand-made reproduction of upstream CineCut's reader and writer, per the work-dir format page.

Tests use it as the other side of the contract: files upstream writes must load with our code, and files
we write must load with exactly upstream's calls (``msgpack.unpackb(data, raw=False,
strict_map_key=False)`` then ``Cls(**dict)``; ``PipelineCheckpoint(**json)``). It deliberately copies
upstream's weaknesses (no size limits, ``Cls(**dict)`` raising TypeError on an extra key, trusting any
cache whose stamp matches) because those are what our files must satisfy.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgpack


@dataclass
class KeyframeRecord:
    timestamp_s: float
    frame_path: str
    source: str


@dataclass
class SceneDescription:
    visual_content: str
    mood: str
    action: str
    setting: str


@dataclass
class PipelineCheckpoint:
    source_file: str
    vibe: str
    stages_complete: list[str] = field(default_factory=list)
    proxy_path: str | None = None
    keyframe_count: int | None = None
    dialogue_event_count: int | None = None
    inference_complete: bool | None = None
    cache_hit: bool | None = None
    manifest_path: str | None = None
    assembly_manifest_path: str | None = None
    proxy_duration_s: float | None = None
    structural_anchors: dict[str, Any] | None = None


UPSTREAM_CHECKPOINT_KEYS = frozenset(PipelineCheckpoint.__dataclass_fields__)
Result = tuple[KeyframeRecord, SceneDescription | None]


def work_dir_for(source_file: Path) -> Path:
    return source_file.parent / f"{source_file.stem}_cinecut_work"


def cache_path_for(source_file: Path, work_dir: Path) -> Path:
    return work_dir / f"{source_file.stem}.scenedesc.msgpack"


def save_cache(results: list[Result], source_file: Path, work_dir: Path) -> Path:
    """Upstream's writer: stat the film, pack metadata first, mkstemp ``.cache.tmp``, fsync, replace."""
    st = os.stat(source_file)
    payload = {
        "metadata": {"source_file": str(source_file), "mtime": st.st_mtime, "size": st.st_size},
        "results": [
            {"record": asdict(rec), "description": asdict(desc) if desc is not None else None}
            for rec, desc in results
        ],
    }
    packed = msgpack.packb(payload, use_bin_type=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=work_dir, suffix=".cache.tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(packed)
        f.flush()
        os.fsync(f.fileno())
    target = cache_path_for(source_file, work_dir)
    os.replace(tmp, target)
    return target


def unpack_cache_file(path: Path) -> dict[str, Any]:
    """Upstream's exact decoding call."""
    return msgpack.unpackb(path.read_bytes(), raw=False, strict_map_key=False)


def load_cache(source_file: Path, work_dir: Path) -> list[Result] | None:
    """Upstream's reader: exact stamp check, then ``Cls(**dict)`` for every record and description.

    Raises (TypeError, KeyError) exactly where upstream would, so a test sees any shape we get wrong.
    """
    path = cache_path_for(source_file, work_dir)
    if not path.exists():
        return None
    data = unpack_cache_file(path)
    meta = data["metadata"]
    st = os.stat(source_file)
    if meta["mtime"] != st.st_mtime or meta["size"] != st.st_size:
        return None
    return [
        (
            KeyframeRecord(**item["record"]),
            SceneDescription(**item["description"]) if item["description"] is not None else None,
        )
        for item in data["results"]
    ]


def save_checkpoint(ckpt: PipelineCheckpoint, work_dir: Path) -> Path:
    """Upstream's writer: mkstemp ``.ckpt.tmp`` in the work dir, fsync, ``os.replace``."""
    work_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=work_dir, suffix=".ckpt.tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(ckpt), f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    target = work_dir / "pipeline_checkpoint.json"
    os.replace(tmp, target)
    return target


def load_checkpoint_strict(work_dir: Path) -> PipelineCheckpoint:
    """``PipelineCheckpoint(**json.loads(...))``, raising on anything upstream would discard."""
    data = json.loads((work_dir / "pipeline_checkpoint.json").read_text())
    return PipelineCheckpoint(**data)


def load_checkpoint(work_dir: Path) -> PipelineCheckpoint | None:
    """Upstream's tolerant load: a missing or unparsable checkpoint means "start fresh" (None)."""
    try:
        return load_checkpoint_strict(work_dir)
    except (OSError, ValueError, TypeError):
        return None


LATER_STAGE_OUTPUTS = (
    "TRAILER_MANIFEST.json",
    "ASSEMBLY_MANIFEST.json",
    "title_card.mp4",
    "button.mp4",
    "silence_act2_act3.mp4",
    "trailer_noaudio.mp4",
    "trailer_final.mp4",
    "stems/dialogue.wav",
    "sfx/whoosh.wav",
    "vo/line_01.wav",
    "luts/teal_orange.cube",
    "conform_clips/clip_0001.mp4",
)


def run_pipeline(film: Path, *, vibe: str = "action", frames: int = 6, subtitle: bool = True) -> Path:
    """Leave a work dir as a finished upstream run does: every stage complete, every artifact present.

    The film, its subtitle and its trailer live beside the work dir; file contents are small but distinct,
    so tests can checksum what must never change.
    """
    wd = work_dir_for(film)
    (wd / "keyframes").mkdir(parents=True, exist_ok=True)
    if subtitle and not film.with_suffix(".srt").exists():
        film.with_suffix(".srt").write_text("1\n00:00:01,000 --> 00:00:02,000\nHello.\n")
    proxy = wd / f"{film.stem}_proxy.mp4"
    proxy.write_bytes(b"proxy" * 200)
    stamps = [1.5 + 2.25 * i for i in range(frames)]
    (wd / "keyframe_timestamps.json").write_text(json.dumps(stamps))
    results: list[Result] = []
    for i, ts in enumerate(stamps):
        jpg = wd / "keyframes" / f"frame_{int(ts * 1000):010d}.jpg"
        jpg.write_bytes(b"\xff\xd8jpeg" + bytes([i]) * 50)
        desc = None if i == 2 else SceneDescription(f"scene {i}", "tense", "running", "street")
        results.append((KeyframeRecord(ts, str(jpg), "subtitle_midpoint" if i % 2 else "scene_change"), desc))
    save_cache(results, film, wd)
    for name in LATER_STAGE_OUTPUTS:
        (wd / name).parent.mkdir(exist_ok=True)
        (wd / name).write_bytes(f"output {name}".encode())
    (film.parent / f"{film.stem}_trailer_{vibe}.mp4").write_bytes(b"final trailer")
    save_checkpoint(
        PipelineCheckpoint(
            source_file=str(film),
            vibe=vibe,
            stages_complete=["proxy", "subtitles", "keyframes", "structural", "narrative", "assembly", "music"],
            proxy_path=str(proxy),
            keyframe_count=frames,
            dialogue_event_count=1,
            inference_complete=True,
            cache_hit=False,
            manifest_path=str(wd / "TRAILER_MANIFEST.json"),
            assembly_manifest_path=str(wd / "ASSEMBLY_MANIFEST.json"),
            proxy_duration_s=5400.125,
            structural_anchors={"act1_end": 1800.0, "act2_end": 3600.5, "beats": [1.0, 2.0]},
        ),
        wd,
    )
    return wd
