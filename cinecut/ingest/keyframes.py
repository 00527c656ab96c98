"""Which frames to describe (the plan) and their JPEGs (the extraction).

The plan: a keyframe at the midpoint of every subtitle line (what is said is what the trailer cuts on),
at every scene change, and evenly spaced fallbacks wherever neither leaves a gap longer than
``max_gap`` - including from the start and to the end, so a silent, static stretch is still seen.

The extraction: upstream runs ``ffmpeg -ss T -i film -frames:v 1`` once per keyframe, 1,000 to 3,000
processes per film, each re-opening the file and re-decoding from the previous keyframe. Here the
sorted timestamps are grouped into a few runs; each run seeks once to its first timestamp, decodes
forward, and a ``select`` expression keeps exactly the first frame at or after each timestamp - the
same frame ``-ss T`` yields. ``showinfo`` reports which frames came out, so each JPEG is matched to its
timestamps by pts rather than by trusting a count. Runs execute in parallel on a few cores.

Files are written atomically (ffmpeg writes into a hidden temporary directory beside them, then each
is renamed to ``frame_<ms:010d>.jpg``), and complete JPEGs already present are kept, so an interrupted
extraction resumes where it stopped.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import itertools
import math
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Final

from cinecut.ingest.ffmpeg import MediaError, ProcessSet, ffmpeg_args, media_arg, require_file, run_tool
from cinecut.ingest.probe import probe
from cinecut.ingest.scenes import parse_showinfo_ticks
from cinecut.ingest.subtitles import DialogueEvent
from cinecut.models import KEYFRAME_SOURCES, KeyframeRecord
from cinecut.workdir import keyframe_name

PlanEntry = tuple[float, str]

JPEG_QUALITY: Final = "2"
"""ffmpeg ``-q:v`` for keyframes: near-lossless MJPEG, the picture a vision model describes."""
TMP_DIR_PREFIX: Final = ".extract-"
TMP_DIR_SUFFIX: Final = ".tmp"


# ---------------------------------------------------------------------------------------------- plan


def plan_keyframes(
    duration_s: float,
    dialogue: Iterable[DialogueEvent],
    scene_changes: Iterable[float],
    max_gap: float = 30.0,
    min_spacing: float = 0.5,
) -> list[PlanEntry]:
    """Timestamps to describe, with why each was chosen (a source from ``KEYFRAME_SOURCES``), sorted.

    Subtitle midpoints come first; a scene change closer than ``min_spacing`` to a kept timestamp is
    dropped, as is any timestamp whose file name (whole milliseconds) is already taken. Then
    ``interval_fallback`` timestamps are spread evenly into every gap longer than ``max_gap`` (counting
    from 0 and to ``duration_s``). A non-empty film always gets at least one keyframe.
    """
    if not math.isfinite(max_gap) or max_gap < 0.01:
        raise ValueError(f"max_gap must be at least 0.01 s, got {max_gap}")
    if not math.isfinite(min_spacing) or min_spacing < 0 or max_gap <= 2 * min_spacing:
        raise ValueError(f"min_spacing must be >= 0 and below max_gap / 2, got {min_spacing}")
    if not math.isfinite(duration_s) or duration_s <= 0:
        return []

    def inside(t: float) -> bool:
        return math.isfinite(t) and 0.0 <= t < duration_s

    times: list[float] = []
    sources: dict[float, str] = {}
    taken_ms: set[int] = set()

    def too_close(t: float) -> bool:
        if int(t * 1000) in taken_ms:
            return True
        i = bisect.bisect_left(times, t)
        return (i > 0 and t - times[i - 1] < min_spacing) or (i < len(times) and times[i] - t < min_spacing)

    def keep(t: float, source: str) -> None:
        bisect.insort(times, t)
        sources[t] = source
        taken_ms.add(int(t * 1000))

    for t in sorted(m for m in (ev.midpoint_s for ev in dialogue) if inside(m)):
        if not too_close(t):
            keep(t, "subtitle_midpoint")
    for t in sorted(s for s in scene_changes if inside(s)):
        if not too_close(t):
            keep(t, "scene_change")

    if not times and duration_s <= max_gap:
        keep(duration_s / 2, "interval_fallback")
    bounds = [0.0, *times, duration_s]
    for a, b in itertools.pairwise(bounds):
        for t in _fill_gap(a, b, max_gap):
            keep(t, "interval_fallback")
    return [(t, sources[t]) for t in times]


def _fill_gap(a: float, b: float, max_gap: float) -> list[float]:
    """Evenly spaced points strictly inside (a, b) so that no step exceeds ``max_gap``."""
    if b - a <= max_gap:
        return []
    n = math.ceil((b - a) / max_gap)
    while True:
        pts = [a + (b - a) * k / n for k in range(1, n)]
        steps = [y - x for x, y in itertools.pairwise([a, *pts, b])]
        if max(steps) <= max_gap:
            return pts
        n += 1  # float rounding put a step a hair over the limit


# ------------------------------------------------------------------------------------------ helpers


def is_complete_jpeg(path: Path) -> bool:
    """True if ``path`` starts with a JPEG SOI and ends with an EOI marker (not cut short by a crash)."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
            f.seek(-2, os.SEEK_END)
            tail = f.read(2)
    except OSError:
        return False
    return head == b"\xff\xd8" and tail == b"\xff\xd9"


def _normalise(plan: Sequence[PlanEntry]) -> list[PlanEntry]:
    """Validate and sort a plan; entries naming the same file keep the first."""
    seen: set[str] = set()
    out: list[PlanEntry] = []
    for t, source in sorted(plan, key=lambda e: e[0]):
        if not math.isfinite(t) or t < 0:
            raise ValueError(f"keyframe timestamp must be finite and >= 0, got {t}")
        if source not in KEYFRAME_SOURCES:
            raise ValueError(f"unknown keyframe source {source!r}")
        name = keyframe_name(t)
        if name not in seen:
            seen.add(name)
            out.append((float(t), source))
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_tmp_dirs(out_dir: Path) -> list[Path]:
    """Delete temporary extraction dirs left by runs that died (their pid is in the name)."""
    removed = []
    for entry in out_dir.iterdir() if out_dir.is_dir() else ():
        name = entry.name
        if not (name.startswith(TMP_DIR_PREFIX) and name.endswith(TMP_DIR_SUFFIX)) or entry.is_symlink():
            continue
        pid_text = name[len(TMP_DIR_PREFIX) :].split("-", 1)[0]
        if pid_text.isdigit() and not _pid_alive(int(pid_text)) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


@contextlib.contextmanager
def _scratch(out_dir: Path) -> Iterator[Path]:
    """A hidden temp dir inside ``out_dir`` (same filesystem, so renames are atomic), removed afterwards."""
    tmp = out_dir / f"{TMP_DIR_PREFIX}{os.getpid()}-{secrets.token_hex(4)}{TMP_DIR_SUFFIX}"
    tmp.mkdir()
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prepare(
    video: str | os.PathLike[str], plan: Sequence[PlanEntry], out_dir: str | os.PathLike[str]
) -> tuple[Path, Path, list[PlanEntry], list[PlanEntry]]:
    """Checked inputs: (video, absolute out dir, normalised plan, entries still lacking a JPEG)."""
    src = require_file(video)
    out = Path(os.path.abspath(out_dir))
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp_dirs(out)
    entries = _normalise(plan)
    todo = [(t, s) for t, s in entries if not is_complete_jpeg(out / keyframe_name(t))]
    return src, out, entries, todo


def _records(entries: Sequence[PlanEntry], out: Path) -> list[KeyframeRecord]:
    return [KeyframeRecord(t, str(out / keyframe_name(t)), s) for t, s in entries]


# ------------------------------------------------------------------------- baseline: one per frame


def _ffmpeg_one_frame(
    src: Path, t: float, dest: Path, *, timeout: float | None, procs: ProcessSet | None
) -> None:
    run_tool(
        "ffmpeg",
        ffmpeg_args(
            "-nostats",
            "-loglevel",
            "error",
            "-ss",
            f"{t:.6f}",
            "-i",
            media_arg(src),
            "-map",
            "0:v:0",
            "-frames:v",
            "1",
            "-q:v",
            JPEG_QUALITY,
            "-f",
            "image2",
            media_arg(dest),
        ),
        what=f"extracting the frame at {t:.3f} s of {src}",
        timeout=timeout,
        procs=procs,
    )


def _last_frame(src: Path, dest: Path, *, timeout: float | None, procs: ProcessSet | None) -> None:
    """The video's final frame: what a timestamp past the last frame (within the container) shows."""
    run_tool(
        "ffmpeg",
        ffmpeg_args(
            "-nostats",
            "-loglevel",
            "error",
            "-sseof",
            "-3",
            "-noaccurate_seek",
            "-i",
            media_arg(src),
            "-map",
            "0:v:0",
            "-update",
            "1",
            "-q:v",
            JPEG_QUALITY,
            "-f",
            "image2",
            media_arg(dest),
        ),
        what=f"extracting the last frame of {src}",
        timeout=timeout,
        procs=procs,
    )


def _extract_singly(
    src: Path,
    todo: Sequence[PlanEntry],
    out: Path,
    tmp: Path,
    *,
    timeout: float | None,
    procs: ProcessSet | None,
) -> None:
    for t, _ in todo:
        name = keyframe_name(t)
        part = tmp / name
        _ffmpeg_one_frame(src, t, part, timeout=timeout, procs=procs)
        if not part.exists():  # -ss past the last frame: ffmpeg succeeds and writes nothing
            _last_frame(src, part, timeout=timeout, procs=procs)
        if not is_complete_jpeg(part):
            raise MediaError(f"{src}: no frame at {t:.3f} s")
        os.replace(part, out / name)


def extract_keyframes_per_frame(
    video: str | os.PathLike[str],
    plan: Sequence[PlanEntry],
    out_dir: str | os.PathLike[str],
    *,
    timeout_per_frame: float | None = 120.0,
) -> list[KeyframeRecord]:
    """Upstream's way: one ``ffmpeg -ss T -i video -frames:v 1`` per keyframe.

    Kept as the benchmark baseline and as the fallback for single frames the batched runs miss.
    Same output contract as :func:`extract_keyframes`.
    """
    src, out, entries, todo = _prepare(video, plan, out_dir)
    with ProcessSet() as procs, _scratch(out) as tmp:
        _extract_singly(src, todo, out, tmp, timeout=timeout_per_frame, procs=procs)
    _fsync_dir(out)
    return _records(entries, out)


# ------------------------------------------------------------------------------------------ batched


@dataclass(frozen=True, slots=True)
class _Run:
    """One ffmpeg pass: seek to ``start`` (exact, in seconds), decode ``span_s``, keep the ``targets``."""

    index: int
    start: Fraction
    span_s: float
    targets: tuple[PlanEntry, ...]


def group_runs(
    timestamps: Sequence[float],
    *,
    seek_gap_s: float,
    max_per_run: int,
    time_base: Fraction = Fraction(1, 1000),
) -> list[tuple[Fraction, list[int]]]:
    """Split sorted timestamps into runs: (seek point, indices); a new run starts after a long gap.

    Decoding through ``seek_gap_s`` seconds costs less than a new process and a fresh seek; beyond it,
    seeking wins. ``max_per_run`` bounds the select expression ffmpeg evaluates on every frame. The
    seek point is a whole number of ``time_base`` ticks at least a millisecond before the first
    timestamp, so the shift ffmpeg applies to the timestamps after the seek is exact.
    """
    groups: list[list[int]] = []
    for i, t in enumerate(timestamps):
        if not groups or t - timestamps[groups[-1][-1]] > seek_gap_s or len(groups[-1]) >= max_per_run:
            groups.append([])
        groups[-1].append(i)
    return [(max(0, math.floor((timestamps[g[0]] - 0.001) / time_base)) * time_base, g) for g in groups]


def _target_tick(t: float, time_base: Fraction) -> Fraction:
    """The exact time ``-ss t`` resolves to: ffmpeg rounds it to the stream's time base."""
    return round(Fraction(t) / time_base) * time_base


def _select_expr(targets: Sequence[Fraction], start: Fraction, slack: Fraction) -> str:
    """Pass the first frame at or after each target: ``t >= a`` while the previous frame was before it."""
    terms = []
    for target in targets:
        a = f"{float(target - start - slack):.9f}"
        terms.append(f"gte(t,{a})*not(gte(prev_t,{a}))")
    return f"gt({'+'.join(terms)},0)"


def _run_batch(
    run: _Run,
    *,
    src: Path,
    out: Path,
    tmp: Path,
    time_base: Fraction,
    threads: int,
    timeout: float | None,
    procs: ProcessSet,
) -> list[PlanEntry]:
    """Execute one run; move its JPEGs into place; return the targets it could not serve."""
    work = tmp / f"run{run.index:05d}"
    work.mkdir()
    slack = time_base / 4  # frames lie on whole ticks: a quarter tick absorbs float error, never a frame
    targets = [_target_tick(t, time_base) for t, _ in run.targets]
    seek = ["-ss", f"{float(run.start):.6f}"] if run.start > 0 else []
    select = f"select='{_select_expr(targets, run.start, slack)}',showinfo"
    args = ffmpeg_args("-nostats", "-loglevel", "info", "-threads", str(threads))
    args += [*seek, "-t", f"{run.span_s:.6f}", "-i", media_arg(src), "-map", "0:v:0", "-an", "-sn", "-dn"]
    args += ["-vf", select, "-fps_mode", "passthrough", "-q:v", JPEG_QUALITY]
    args += ["-f", "image2", media_arg(work / "%06d.jpg")]
    res = run_tool(
        "ffmpeg",
        args,
        what=f"extracting {len(targets)} keyframes from {float(run.start):.3f} s of {src}",
        timeout=timeout,
        procs=procs,
    )
    ticks, shown_base = parse_showinfo_ticks(res.stderr)
    frame_times = [run.start + tick * shown_base for tick in ticks]
    files = sorted(work.iterdir())
    if len(files) != len(frame_times):
        raise MediaError(f"{src}: ffmpeg wrote {len(files)} frames but reported {len(frame_times)}")
    missing: list[PlanEntry] = []
    used: set[int] = set()
    j = 0
    for entry, target in zip(run.targets, targets):
        while j < len(frame_times) and frame_times[j] < target - slack:
            j += 1
        if j == len(frame_times) or not is_complete_jpeg(files[j]):
            missing.append(entry)
            continue
        dest = out / keyframe_name(entry[0])
        if j in used:  # two timestamps within one frame interval: same picture, two names
            part = work / f"copy-{dest.name}"
            shutil.copyfile(files[j], part)
            os.replace(part, dest)
        else:
            os.replace(files[j], dest)
            used.add(j)
            files[j] = dest
    return missing


def extract_keyframes(
    video: str | os.PathLike[str],
    plan: Sequence[PlanEntry],
    out_dir: str | os.PathLike[str],
    *,
    workers: int | None = None,
    threads: int = 1,
    seek_gap_s: float = 15.0,
    max_per_run: int = 64,
    timeout: float | None = None,
) -> list[KeyframeRecord]:
    """Write ``frame_<ms:010d>.jpg`` into ``out_dir`` for every plan entry; records in timestamp order.

    Frames already present as complete JPEGs are not extracted again. Each JPEG shows the first frame
    at or after its timestamp (``-ss`` semantics); a timestamp past the last frame gets the last frame.
    ``workers`` parallel ffmpeg runs (default: a quarter of the CPUs, 1 to 4), each with ``threads``
    decoder threads. ``frame_path`` in the records is absolute.
    """
    if max_per_run < 1 or seek_gap_s < 0:
        raise ValueError("max_per_run must be >= 1 and seek_gap_s >= 0")
    src, out, entries, todo = _prepare(video, plan, out_dir)
    if not todo:
        return _records(entries, out)
    info = probe(src)
    tb = info.time_base
    interval = info.frame_interval_s or 0.1
    groups = group_runs([t for t, _ in todo], seek_gap_s=seek_gap_s, max_per_run=max_per_run, time_base=tb)
    runs = []
    for k, (start, idx) in enumerate(groups):
        targets = tuple(todo[i] for i in idx)
        span = targets[-1][0] - float(start) + 2 * interval + 0.5
        runs.append(_Run(k, start, span, targets))
    n_workers = workers if workers is not None else max(1, min(4, (os.cpu_count() or 2) // 4))
    with ProcessSet() as procs, _scratch(out) as tmp:
        job = functools.partial(
            _run_batch, src=src, out=out, tmp=tmp, time_base=tb, threads=threads, timeout=timeout, procs=procs
        )
        if n_workers == 1 or len(runs) == 1:
            results = [job(r) for r in runs]
        else:
            with ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="keyframes") as pool:
                futures = [pool.submit(job, r) for r in runs]
                try:
                    results = [f.result() for f in futures]
                except BaseException:
                    procs.kill_all()
                    for f in futures:
                        f.cancel()
                    raise
        missing = [entry for res in results for entry in res]
        if missing:  # past the last frame, or a run that lost frames: take them one by one
            _extract_singly(src, missing, out, tmp, timeout=120.0, procs=procs)
    _fsync_dir(out)
    return _records(entries, out)
