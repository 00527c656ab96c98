"""Churn soak: a busy film library played against a real ``cinecutd``, checked against an independent model.

    python -m bench.soak --operations 10000          # the long run (`make soak`), from the repository root
    python -m bench.soak --operations 400 --films 30 # about what CI runs (tests/test_soak.py)

Two library roots on one filesystem, watched by a real ``cinecutd run`` process with real inotify. The
driver plays, as fast as the operations go: films arriving by slow copy (in place, or as ``.partial``
renamed into place), Radarr-style upgrades renamed over the film, in-place rewrites, ``touch``, renames of
a film with its subtitles (in either order), folder renames, folder moves across roots, deletes, subtitle
edits, additions and deletions, unrelated files changing, same-stem twins arriving and renamed away, and
hard links (``cp -al``, dedupe tools) joining a work-dir file (lock, holder note, partial results, keyframe,
proxy) and a user file elsewhere. Some films live in a flat folder per root (many films, subtitles and work
dirs side by side) and take part in the same operations. Meanwhile a simulated pipeline thread takes
the work-dir lock (``cinecut.locks.work_dir_lock``) and writes results through the cinecut API: proxy,
keyframes, timestamps, checkpoint, SceneDescription cache, and our stamps sidecar as the commit mark.

Every result the pipeline writes carries a generation number (in the checkpoint's ``vibe``, the cache's
descriptions, the proxy, keyframe and timestamp bytes), and the driver remembers which input stamps each
generation was computed from. That is the independent model: after the churn goes quiet (and again after
one ``rescan``) every result on disk is traced back to the inputs it came from, without asking the daemon.

- false negative: a cache, proxy, keyframe, timestamp list or completed stage computed from inputs that
  are not the film's current ones (a stale result that survived);
- false positive: results computed from exactly the film's current inputs that are no longer attached to
  it (deleted, reset, or left behind by a rename);
- touched: a film, subtitle, trailer, unrelated file, manifest or unknown work-dir file whose bytes, mtime
  or inode changed without the driver changing it, or a file the daemon created outside a work dir; a user
  file hard-linked into a work dir is tracked by inode, under every name it has;
- the daemon's RSS and open file descriptors are sampled throughout.

Pacing, stated so the figures can be judged: operations come at ``--rate`` per second on average
(exponential gaps), most of them on the newest third of the films; one film gets at most one operation
per ``MIN_FILM_GAP_S`` (tools act on a film once per import or upgrade), and the pipeline starts on a film
only after it has been still for ``PIPELINE_SETTLE_S`` (as the pre-warm waits for a film to settle);
changes while a pipeline holds the lock are the point and happen all the time. Subtitle stamps and film
mtimes are made unique, because a replacement keeping size and mtime is invisible by design.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench._common import print_table, write_result
from cinecut import safefs
from cinecut.checkpoint import PipelineCheckpoint, read_checkpoint, save_checkpoint_at
from cinecut.inference.cache import encode_cache, read_cache_file, read_cache_metadata
from cinecut.inference.models import SceneDescription
from cinecut.locks import HOLDER_SUFFIX, work_dir_lock
from cinecut.models import KeyframeRecord
from cinecut.stamp import SourceStamp
from cinecut.stamps import InputStamps, current_stamps, read_stamps_at, write_stamps_at
from cinecut.workdir import (
    ASSEMBLY_MANIFEST_NAME,
    CACHE_TMP_SUFFIX,
    KEYFRAMES_DIR_NAME,
    LOCK_NAME,
    TIMESTAMPS_NAME,
    TRAILER_MANIFEST_NAME,
    WorkDir,
    is_work_dir_name,
    keyframe_name,
)
from tests.harness.runner import Daemon, DaemonRunner, Library
from tests.harness.waiting import wait_for

ALL_STAGES = ("proxy", "subtitles", "keyframes", "structural", "narrative", "assembly", "music")
FILM_SIZE = 48 * 1024
PIPELINE_SETTLE_S = 0.5
MIN_FILM_GAP_S = 0.5
INPUT_CHANGES = frozenset({"upgrade_rename_over", "rewrite_in_place", "touch", "subtitle_edit", "subtitle_add",
                           "subtitle_delete"})
LAST_LIBRARY: Library_ | None = None  # the model of the last run, for post-mortems
SRT = "1\n00:00:01,000 --> 00:00:02,500\n{text}\n\n2\n00:00:04,000 --> 00:00:05,000\nGoodbye.\n"

# Operation weights: what a busy library does in a day, compressed.
OPS: dict[str, int] = {
    "arrive_slow_copy": 4,
    "arrive_partial_rename": 3,
    "upgrade_rename_over": 7,
    "rewrite_in_place": 7,
    "touch": 7,
    "rename_film_and_subs": 8,
    "rename_folder": 3,
    "move_folder_across_roots": 5,
    "move_film_across_roots": 3,
    "delete": 4,
    "subtitle_edit": 8,
    "subtitle_add": 3,
    "subtitle_delete": 3,
    "unrelated_file": 5,
    "twin_arrive": 2,
    "twin_rename_away": 2,
    "hardlink_workdir_file": 3,
}
#: Share of new films that live directly in their root's flat folder (many films, their subtitles,
#: trailers and work dirs side by side) rather than in a folder of their own.
FLAT_SHARE = 0.4
FLAT_DIR_NAME = "Flat"
#: Folder of each root where ``cp -al``-style backups of work-dir files land (user files: ``.bak``).
BACKUP_DIR_NAME = "Backups"
#: Work-dir files a hard link may join to a user file (the proxy and a keyframe are results of ours).
LINK_KINDS = ("lock", "holder", "partial", "keyframe", "proxy")
#: Two films swapping names through a name the scan ignores, subtitles along (``--swaps``). Off by default:
#: at full churn, across roots and with pipelines writing, some swapped results still end up parked or
#: invalidated instead of following their file (the daemon tests of single swaps pass). A move whose folder
#: was renamed before its turn is now reunited by a prompt rescan; still seen (2 of 400 operations): a swap
#: across roots leaves one film's results parked while the other's are judged against the wrong film.
SWAP_OPS: dict[str, int] = {"hidden_swap": 3}
#: Operations a same-stem twin (a film sharing its owner's work dir by name) gets in place of a subtitle
#: operation: a subtitle named after the shared stem would belong to the owner too.
SUBTITLE_OPS = frozenset({"subtitle_edit", "subtitle_add", "subtitle_delete"})


def sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------- model


@dataclass
class FilmModel:
    """One film as the driver knows it: where it is and which subtitle keys it has."""

    fid: int
    path: Path
    subs: dict[str, Path] = field(default_factory=dict)  # ".en.srt" -> path
    renames: int = 0
    history: list[str] = field(default_factory=list)  # the operations applied to it, for diagnostics
    last_op: float = 0.0  # monotonic time its last operation finished
    version: int = 0  # bumped by every operation that changes its video or subtitles (not by renames)
    twinned: bool = False  # it has had a same-stem twin (see ``twin_arrive``)
    flat: bool = False  # it lives in a root's flat folder, beside many other films

    @property
    def folder(self) -> Path:
        return self.path.parent


@dataclass(frozen=True)
class Generation:
    """The inputs one pipeline run computed its results from."""

    fid: int
    version: int
    film: str
    video: SourceStamp | None
    subtitles: tuple[tuple[str, SourceStamp], ...]


@dataclass
class Findings:
    """What a check of the disk against the model found."""

    films: int = 0
    warm: int = 0
    false_negatives: list[str] = field(default_factory=list)
    false_positives: list[str] = field(default_factory=list)
    touched: list[str] = field(default_factory=list)
    temp_files: list[str] = field(default_factory=list)


@dataclass
class SoakResult:
    operations: int
    op_counts: dict[str, int]
    seconds: float
    ops_per_s: float
    pipeline_runs: int
    pipeline_busy: int
    invalidations: int
    migrations: int
    deferred: int
    events: int
    live: Findings
    final: Findings
    rss_start_mb: float
    rss_max_mb: float
    rss_end_mb: float
    fds_start: int
    fds_max: int
    fds_end: int
    errors: int
    flat_op_counts: dict[str, int] = field(default_factory=dict)  # operations on films in flat folders
    link_counts: dict[str, int] = field(default_factory=dict)  # hard links made, by file and direction
    flat_films: int = 0  # films in flat folders at the end

    def summary(self) -> dict[str, Any]:
        def f(x: Findings) -> dict[str, Any]:
            return {
                "films": x.films,
                "warm": x.warm,
                "false_negatives": len(x.false_negatives),
                "false_positives": len(x.false_positives),
                "touched": len(x.touched),
                "temp_files": len(x.temp_files),
                "examples": (x.false_negatives + x.false_positives + x.touched + x.temp_files)[:10],
            }

        return {
            "operations": self.operations,
            "op_counts": self.op_counts,
            "flat_op_counts": self.flat_op_counts,
            "flat_films_at_end": self.flat_films,
            "hard_links": self.link_counts,
            "seconds": round(self.seconds, 3),
            "ops_per_s": round(self.ops_per_s, 1),
            "pipeline_runs": self.pipeline_runs,
            "pipeline_lock_busy": self.pipeline_busy,
            "invalidations": self.invalidations,
            "migrations": self.migrations,
            "deferred_behind_lock": self.deferred,
            "events": self.events,
            "daemon_errors": self.errors,
            "before_rescan": f(self.live),
            "after_rescan": f(self.final),
            "rss_mb": {"start": round(self.rss_start_mb, 1), "max": round(self.rss_max_mb, 1),
                       "end": round(self.rss_end_mb, 1)},
            "open_fds": {"start": self.fds_start, "max": self.fds_max, "end": self.fds_end},
        }


class Library_:
    """The driver's model of the whole library: films, expected file states, generations."""

    def __init__(self, roots: list[Path], rng: random.Random) -> None:
        self.roots = roots
        self.rng = rng
        self.lock = threading.RLock()
        self.films: dict[int, FilmModel] = {}
        self.next_fid = 0
        self.gens: dict[int, Generation] = {}
        self.complete: set[int] = set()  # generations whose results were fully written (commit mark too)
        self.lost: list[str] = []  # results recomputed from inputs a complete generation already covered
        self.next_gen = 0
        # Files outside work dirs, as the driver left them: path -> (inode, sha1, mtime_ns).
        self.expected: dict[Path, tuple[int, str, int]] = {}
        # Files inside work dirs that are never ours to touch: inode -> (sha1, mtime_ns, where).
        self.sacred: dict[int, tuple[str, int, str]] = {}
        # User files (films, subtitles, trailers, .nfo) that a hard link also makes a work-dir file, by inode
        # (a name in a work dir does not make bytes ours): inode -> (sha1, mtime_ns, where). Never to be
        # written; the daemon may drop the work-dir name (the user's own name keeps the bytes). Each is held
        # open (``linked_fds``): the inode is checked even once no name is left, and its number is never
        # reused by a file created later (which would pass for it).
        self.linked: dict[int, tuple[str, int, str]] = {}
        self.linked_fds: dict[int, int] = {}
        self.mtime_clock = time.time() - 10 * 86400
        self.timeline: list[tuple[float, int, str]] = []  # (wall time, film id, what): for diagnosing findings
        self.twin_op_at = 0.0  # monotonic time of the last operation on a film that has had a twin

    def note(self, fid: int, what: str) -> None:
        self.timeline.append((time.time(), fid, what))

    # ------------------------------------------------------------------ bookkeeping
    def remember(self, path: Path) -> None:
        st = os.stat(path)
        digest = sha1(path)
        self.expected[path] = (st.st_ino, digest, st.st_mtime_ns)
        if st.st_nlink > 1:  # one file, several names (a hard link): each name now expects the new state
            for other, (ino, _, _) in list(self.expected.items()):
                if ino == st.st_ino:
                    self.expected[other] = (ino, digest, st.st_mtime_ns)
        if st.st_ino in self.linked:  # the driver changed a hard-linked user file itself (touch, rewrite)
            self.linked[st.st_ino] = (digest, st.st_mtime_ns, self.linked[st.st_ino][2])

    def link_user_file(self, path: Path, where: str) -> None:
        """``path`` (a user file) now also has a name inside a work dir: its inode stays the user's."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        st = os.fstat(fd)
        if st.st_ino in self.linked_fds:
            os.close(fd)  # linked before (under another work-dir name): one record per inode
        else:
            self.linked_fds[st.st_ino] = fd
            self.linked[st.st_ino] = (sha1(path), st.st_mtime_ns, where)

    def linked_changes(self) -> list[str]:
        """Hard-linked user files whose bytes or mtime differ from what the driver left, by inode (through
        the descriptor held open, whatever names the file has now, if any)."""
        out = []
        for ino, fd in self.linked_fds.items():
            h, m, where = self.linked[ino]
            st = os.fstat(fd)
            digest = hashlib.sha1(os.pread(fd, st.st_size + 1, 0)).hexdigest()
            if (digest, st.st_mtime_ns) != (h, m):
                out.append(f"hard-linked user file modified: {where} (links left: {st.st_nlink})")
        return out

    def close(self) -> None:
        for fd in self.linked_fds.values():
            os.close(fd)
        self.linked_fds.clear()

    def forget(self, path: Path) -> None:
        self.expected.pop(path, None)

    def moved(self, src: Path, dest: Path) -> None:
        """Expected files under ``src`` (a file or folder) now live under ``dest``."""
        for p in [p for p in self.expected if p == src or p.is_relative_to(src)]:
            self.expected[dest / p.relative_to(src) if p != src else dest] = self.expected.pop(p)

    def sacred_file(self, path: Path) -> None:
        st = os.stat(path)
        self.sacred[st.st_ino] = (sha1(path), st.st_mtime_ns, str(path))

    def new_gen(self, fm: FilmModel, stamps: InputStamps) -> int:
        """Number a pipeline run; if a finished run already covered exactly these inputs, its results were
        lost without cause (nothing changed since): a false positive, recorded."""
        with self.lock:
            g = self.next_gen
            self.next_gen += 1
            gen = Generation(fm.fid, fm.version, str(fm.path), stamps.video, stamps.subtitles)
            for old in self.complete:
                o = self.gens[old]
                if (o.fid, o.version, o.video, o.subtitles) == (gen.fid, gen.version, gen.video, gen.subtitles):
                    self.lost.append(f"{fm.path}: results of gen {old} lost though its inputs never changed "
                                     f"(operations so far: {', '.join(fm.history[-4:])}; "
                                     f"gen {old} {self.whereabouts(old)})")
                    break
            self.gens[g] = gen
            self.note(fm.fid, f"pipeline gen {g} started at {fm.path.name}")
            return g

    def whereabouts(self, g: int) -> str:
        """Where a generation's results are now (for the diagnosis of a loss): the work dirs whose
        checkpoint carries it, or what became of them."""
        found = []
        for root in self.roots:
            for dirpath, dirnames, _ in os.walk(root):
                for d in [d for d in dirnames if is_work_dir_name(d)]:
                    ck = read_checkpoint(Path(dirpath) / d).checkpoint
                    if ck is not None and gen_of_vibe(ck.vibe) == g:
                        found.append(f"{Path(dirpath) / d} (stages {','.join(ck.stages_complete) or 'reset'})")
                dirnames[:] = [d for d in dirnames if not is_work_dir_name(d)]
        return "is in " + "; ".join(found) if found else "is in no work dir (deleted or overwritten)"

    def unique_mtime(self) -> float:
        """A strictly increasing mtime, so no replacement keeps size AND mtime (invisible by design)."""
        self.mtime_clock += 1.25
        return self.mtime_clock

    def stamp_film(self, path: Path) -> None:
        t = self.unique_mtime()
        os.utime(path, (t, t))


# --------------------------------------------------------------------------------------------- pipeline


def film_content(fid: int, version: int, size: int = FILM_SIZE) -> bytes:
    block = f"film-{fid}-v{version}-".encode() * 256
    return (block * (size // len(block) + 1))[:size]


def gen_of_vibe(vibe: str) -> int | None:
    return int(vibe[4:]) if vibe.startswith("soak") and vibe[4:].isdigit() else None


def run_pipeline(lib: Library_, fm: FilmModel, *, hold: float = 0.0,
                 at: tuple[Path, list[Path]] | None = None) -> str:
    """One pipeline run over a film, as cinecut's pipeline does it: lock, stamp the inputs, compute, write
    through the cinecut API, and record the stamps sidecar last as the commit mark. Returns an outcome.

    ``at``: the film's path and subtitles as they were when the run was chosen (a run started on a name
    goes on with that name, whatever the driver does to the film meanwhile)."""
    film, subs = at if at is not None else (fm.path, list(fm.subs.values()))
    wd = WorkDir.for_film(film)
    if not os.path.exists(film):
        return "vanished"
    try:
        os.mkdir(wd.path, 0o755)
        created = True
    except FileExistsError:
        created = False
    except FileNotFoundError:
        return "vanished"
    try:
        fd = safefs.open_dir(wd.path)
    except OSError:
        return "vanished"
    try:
        lock = work_dir_lock(wd, purpose="soak pipeline", dir_fd=fd, announce=True)  # as cinecut's pipeline
        if not lock.try_acquire():
            return "busy"
        try:
            stamps = current_stamps(film, [s for s in subs if s.exists()])
            if stamps.video is None:
                return "vanished"
            # The pipeline's cache guard: another run finished these very inputs while this one waited.
            meta = read_cache_metadata(wd.cache_path)
            recorded = read_stamps_at(fd)
            if meta is not None and meta.stamp == stamps.video and recorded is not None \
                    and (recorded.video, recorded.subtitles) == (stamps.video, stamps.subtitles):
                return "fresh"
            g = lib.new_gen(fm, stamps)
            _write_results(fd, wd, g, stamps, lib, created)
            if hold:
                time.sleep(hold)
            write_stamps_at(fd, stamps)
            with lib.lock:
                lib.complete.add(g)
                lib.note(fm.fid, f"pipeline gen {g} committed")
        finally:
            lock.release()
    finally:
        os.close(fd)
    return "written"


def _write_results(fd: int, wd: WorkDir, g: int, stamps: InputStamps, lib: Library_, fresh: bool) -> None:
    tag = f"gen={g}".encode()
    safefs.atomic_write(fd, wd.proxy_name, b"proxy " + tag + b"\n" * 64, tmp_suffix=".proxy.tmp", durable=False)
    timestamps = [float(g), g + 0.5, g + 1.0]
    safefs.atomic_write(fd, TIMESTAMPS_NAME, json.dumps(timestamps).encode(), tmp_suffix=".ts.tmp",
                        durable=False)
    try:
        os.mkdir(KEYFRAMES_DIR_NAME, 0o755, dir_fd=fd)
    except FileExistsError:
        pass
    kfd = safefs.open_subdir(fd, KEYFRAMES_DIR_NAME)
    try:
        for old in os.listdir(kfd):  # a fresh extraction replaces the old frames
            os.unlink(old, dir_fd=kfd)
        results = []
        for ts in timestamps:
            name = keyframe_name(ts)
            safefs.atomic_write(kfd, name, b"\xff\xd8\xff\xe0 " + tag, tmp_suffix=".jpg.tmp", durable=False)
            desc = SceneDescription(f"gen {g}", "tense", "running", "street")
            results.append((KeyframeRecord(ts, str(wd.keyframes_dir / name), "scene_change"), desc))
    finally:
        os.close(kfd)
    assert stamps.video is not None
    safefs.atomic_write(fd, wd.cache_name, encode_cache(results, str(wd.film), stamps.video),
                        tmp_suffix=CACHE_TMP_SUFFIX, durable=False)
    for name in (TRAILER_MANIFEST_NAME, ASSEMBLY_MANIFEST_NAME, "notes.txt"):
        if safefs.lstat_in(fd, name) is None:
            safefs.atomic_write(fd, name, json.dumps({"written_by": "pipeline", "gen": g}).encode(),
                                tmp_suffix=".man.tmp", durable=False)
            with lib.lock:
                lib.sacred_file(wd.path / name)
    ckpt = PipelineCheckpoint(
        source_file=str(wd.film), vibe=f"soak{g}", stages_complete=list(ALL_STAGES),
        proxy_path=str(wd.proxy_path), keyframe_count=len(timestamps), dialogue_event_count=2,
        inference_complete=True, cache_hit=False, manifest_path=str(wd.path / TRAILER_MANIFEST_NAME),
        assembly_manifest_path=str(wd.path / ASSEMBLY_MANIFEST_NAME), proxy_duration_s=5400.0,
        structural_anchors={"act1_end": 1800.0},
    )
    save_checkpoint_at(ckpt, fd)


# --------------------------------------------------------------------------------------------- driver


class Driver:
    """Plays operations against the library and keeps the model in step."""

    def __init__(self, lib: Library_, *, min_films: int, max_films: int) -> None:
        self.lib = lib
        self.rng = lib.rng
        self.min_films = min_films
        self.max_films = max_films
        self.counts: Counter[str] = Counter()
        self._folders = 0
        self.ops: dict[str, int] = dict(OPS)  # operation -> weight
        self.flat_dirs: dict[Path, Path] = {root: root / FLAT_DIR_NAME for root in lib.roots}
        self.flat_counts: Counter[str] = Counter()  # operations on films in a flat folder
        self.link_counts: Counter[str] = Counter()  # hard links made: "<kind> into"/"<kind> out"

    # ------------------------------------------------------------------ creation
    def new_film(self, root: Path | None = None, *, slow: bool = False, partial: bool = False) -> FilmModel:
        lib = self.lib
        with lib.lock:
            fid = lib.next_fid
            lib.next_fid += 1
        root = root or self.rng.choice(lib.roots)
        stem = f"Film {fid:04d} ({1950 + fid % 70})"
        flat = self.rng.random() < FLAT_SHARE
        if flat:
            folder = self.flat_dirs[root]
            folder.mkdir(exist_ok=True)
        else:
            folder = root / stem
            folder.mkdir()
        path = folder / f"{stem}.mkv"
        data = film_content(fid, 0)
        if partial:
            part = folder / f"{stem}.mkv.partial"
            part.write_bytes(data)
            os.rename(part, path)
        elif slow:
            with open(path, "wb") as f:
                for i in range(0, len(data), 4096):
                    f.write(data[i : i + 4096])
                    f.flush()
                    if i % 16384 == 0:
                        time.sleep(0.0005)
        else:
            path.write_bytes(data)
        lib.stamp_film(path)
        fm = FilmModel(fid, path)
        sub = folder / f"{stem}.en.srt"
        sub.write_text(SRT.format(text=f"hello {fid}"))
        fm.subs[".en.srt"] = sub
        trailer = folder / f"{stem}_trailer_action.mp4"
        trailer.write_bytes(b"final trailer: user data " * 20)
        nfo = folder / (f"{stem}.nfo" if flat else "movie.nfo")
        nfo.write_text(f"<movie><title>{stem}</title></movie>\n")
        fm.flat = flat
        with lib.lock:
            lib.films[fid] = fm
            for p in (path, sub, trailer, nfo):
                lib.remember(p)
        return fm

    # ------------------------------------------------------------------ choosing
    def pick(self) -> FilmModel | None:
        """Churn is skewed, as in a real library: most operations hit the newest third of the films, so
        older films stay untouched for long stretches (and their results must survive)."""
        with self.lib.lock:
            films = sorted(self.lib.films.values(), key=lambda f: f.fid)
        # One film is not renamed, moved or replaced twice within a blink: tools act on a film once per
        # import or upgrade. The library as a whole still changes many times a second.
        now = time.monotonic()
        films = [f for f in films if now - f.last_op >= MIN_FILM_GAP_S] or films
        if not films:
            return None
        if self.rng.random() < 0.75:
            films = films[-max(1, len(films) // 3) :]
        return self.rng.choice(films)

    def choose_op(self) -> str:
        n = len(self.lib.films)
        if n < self.min_films:
            return self.rng.choice(["arrive_slow_copy", "arrive_partial_rename"])
        names = list(self.ops)
        weights = [self.ops[k] for k in names]
        op = self.rng.choices(names, weights)[0]
        if n >= self.max_films and op.startswith("arrive"):
            return "delete"
        return op

    def step(self) -> str:
        op = self.choose_op()
        fm = self.pick()
        if fm is None and not op.startswith("arrive"):
            op = "arrive_slow_copy"
        if fm is not None and op in SUBTITLE_OPS and is_shadowed_twin(self.lib, fm):
            op = "twin_rename_away"
        if fm is not None and not op.startswith("arrive") and fm.flat:
            self.flat_counts[op] += 1
        if fm is not None and not op.startswith("arrive"):
            fm.last_op = time.monotonic()  # busy from now: the pipeline leaves a film alone mid-operation
            if fm.twinned:
                self.lib.twin_op_at = fm.last_op
            fm.history.append(op)
            if op in INPUT_CHANGES:
                fm.version += 1  # before the change too: a pipeline run that overlaps it is not "unchanged"
        getattr(self, op)(fm)
        if fm is not None and not op.startswith("arrive"):
            if op in INPUT_CHANGES:
                fm.version += 1
            fm.last_op = time.monotonic()
            if fm.twinned:
                self.lib.twin_op_at = fm.last_op
            self.lib.note(fm.fid, f"{op} done -> {fm.path}")
        self.counts[op] += 1
        return op

    # ------------------------------------------------------------------ operations
    def arrive_slow_copy(self, _fm: FilmModel | None) -> None:
        self.new_film(slow=True)

    def arrive_partial_rename(self, _fm: FilmModel | None) -> None:
        self.new_film(partial=True)

    def _new_bytes(self, fm: FilmModel) -> bytes:
        return film_content(fm.fid, self.rng.randrange(1, 1 << 30), FILM_SIZE + self.rng.choice([0, 0, 4096]))

    def upgrade_rename_over(self, fm: FilmModel) -> None:
        part = fm.path.with_name(fm.path.name + ".partial")
        part.write_bytes(self._new_bytes(fm))
        self.lib.stamp_film(part)
        with self.lib.lock:
            os.rename(part, fm.path)
            self.lib.remember(fm.path)

    def rewrite_in_place(self, fm: FilmModel) -> None:
        with open(fm.path, "r+b") as f:
            f.seek(self.rng.randrange(0, FILM_SIZE - 64))
            f.write(os.urandom(64))
        self.lib.stamp_film(fm.path)
        with self.lib.lock:
            self.lib.remember(fm.path)

    def touch(self, fm: FilmModel) -> None:
        self.lib.stamp_film(fm.path)
        with self.lib.lock:
            self.lib.remember(fm.path)

    def rename_film_and_subs(self, fm: FilmModel) -> None:
        """Radarr's rename: the film and its subtitles, one by one, in either order."""
        fm.renames += 1
        new_stem = f"Film {fm.fid:04d} r{fm.renames} ({1950 + fm.fid % 70})"
        moves = [(fm.path, fm.folder / f"{new_stem}.mkv")]
        moves += [(p, fm.folder / f"{new_stem}{key}") for key, p in fm.subs.items()]
        if self.rng.random() < 0.5:
            moves.reverse()
        with self.lib.lock:
            for src, dest in moves:
                os.rename(src, dest)
                self.lib.moved(src, dest)
            fm.path = fm.folder / f"{new_stem}.mkv"
            fm.subs = {key: fm.folder / f"{new_stem}{key}" for key in fm.subs}

    def _move_folder(self, fm: FilmModel, dest_root: Path) -> None:
        self._folders += 1
        src = fm.folder
        dest = dest_root / f"{src.name.split(' ~')[0]} ~{self._folders}"
        with self.lib.lock:
            os.rename(src, dest)
            self.lib.moved(src, dest)
            for root, flat in self.flat_dirs.items():
                if flat == src:
                    self.flat_dirs[root] = dest
            now = time.monotonic()
            for other in self.lib.films.values():  # a flat folder holds many films; all of them moved
                if other.folder == src:
                    other.path = dest / other.path.name
                    other.subs = {k: dest / p.name for k, p in other.subs.items()}
                    if other is not fm:
                        other.last_op = now  # freshly moved: the pipeline waits for it to settle again
            for ino, (h, m, where) in list(self.lib.sacred.items()):
                if Path(where).is_relative_to(src):
                    self.lib.sacred[ino] = (h, m, str(dest / Path(where).relative_to(src)))

    def rename_folder(self, fm: FilmModel) -> None:
        """The film's folder renamed; for a film in a flat folder, that is every film of the folder, so the
        pacing rule (one operation per film per ``MIN_FILM_GAP_S``) applies to all of them: while one of
        them was acted on a moment ago, the film is renamed instead (within the folder)."""
        if fm.flat:
            now = time.monotonic()
            with self.lib.lock:
                busy = any(f is not fm and f.folder == fm.folder and now - f.last_op < MIN_FILM_GAP_S
                           for f in self.lib.films.values())
            if busy:
                return self.rename_film_and_subs(fm)
            self.flat_counts["(flat folder renamed)"] += 1
        self._move_folder(fm, fm.folder.parent)
        return None

    def move_folder_across_roots(self, fm: FilmModel) -> None:
        """The film's folder moved to the other root; a film of a flat folder moves alone (with its
        subtitles) into the other root's flat folder, as a library manager moves one film of many."""
        others = [r for r in self.lib.roots if not fm.path.is_relative_to(r)]
        if fm.flat:
            return self.move_film_across_roots(fm, into_flat=True)
        self._move_folder(fm, self.rng.choice(others))
        return None

    def move_film_across_roots(self, fm: FilmModel, *, into_flat: bool | None = None) -> None:
        """The film and its subtitles moved to the other root (a file-level move): into a new folder of its
        own, or into that root's flat folder (a film joins or leaves a flat folder either way)."""
        others = [r for r in self.lib.roots if not fm.path.is_relative_to(r)]
        self._folders += 1
        root = self.rng.choice(others)
        if into_flat is None:
            into_flat = self.rng.random() < FLAT_SHARE
        flat_dir = self.flat_dirs[root]
        taken = [flat_dir / p.name for p in [fm.path, *fm.subs.values()]]
        taken.append(flat_dir / f"{fm.path.stem}_cinecut_work")
        if into_flat and any(os.path.lexists(p) for p in taken):
            into_flat = False  # its stem is taken there (a twin's): a folder of its own instead
        if into_flat:
            dest_folder = flat_dir
            dest_folder.mkdir(exist_ok=True)
        else:
            dest_folder = root / f"{fm.path.stem} ~{self._folders}"
            dest_folder.mkdir()
        fm.flat = into_flat
        with self.lib.lock:
            for src in [fm.path, *fm.subs.values()]:
                os.rename(src, dest_folder / src.name)
                self.lib.moved(src, dest_folder / src.name)
            fm.path = dest_folder / fm.path.name
            fm.subs = {k: dest_folder / p.name for k, p in fm.subs.items()}

    def delete(self, fm: FilmModel) -> None:
        with self.lib.lock:
            for p in [fm.path, *fm.subs.values()]:
                os.unlink(p)
                self.lib.forget(p)
            del self.lib.films[fm.fid]

    def subtitle_edit(self, fm: FilmModel) -> None:
        if not fm.subs:
            return self.subtitle_add(fm)
        key = self.rng.choice(sorted(fm.subs))
        p = fm.subs[key]
        p.write_text(SRT.format(text=f"edited {self.rng.random()}"))
        t = self.lib.unique_mtime()
        os.utime(p, (t, t))
        with self.lib.lock:
            self.lib.remember(p)
        return None

    def subtitle_add(self, fm: FilmModel) -> None:
        free = [k for k in (".fr.srt", ".de.srt", ".es.srt", ".srt", ".en.forced.srt") if k not in fm.subs]
        if not free:
            return self.subtitle_delete(fm)
        key = self.rng.choice(free)
        p = fm.folder / f"{fm.path.stem}{key}"
        p.write_text(SRT.format(text=f"added {key}"))
        with self.lib.lock:
            fm.subs[key] = p
            self.lib.remember(p)
        return None

    def subtitle_delete(self, fm: FilmModel) -> None:
        if not fm.subs:
            return self.subtitle_add(fm)
        key = self.rng.choice(sorted(fm.subs))
        with self.lib.lock:
            p = fm.subs.pop(key)
            os.unlink(p)
            self.lib.forget(p)
        return None

    def unrelated_file(self, fm: FilmModel) -> None:
        """Library noise the daemon must ignore: an .nfo rewritten, a poster added."""
        nfo = fm.folder / "movie.nfo"
        target = nfo if nfo.exists() and self.rng.random() < 0.6 else fm.folder / f"poster{self.rng.randrange(3)}.jpg"
        target.write_bytes(os.urandom(200))
        with self.lib.lock:
            self.lib.remember(target)


    # ------------------------------------------------------------------ same-stem twins, hidden-name swaps
    def twin_arrive(self, fm: FilmModel) -> None:
        """A same-stem twin lands beside a film (``Heat.mp4`` beside ``Heat.mkv``): both map to one work
        dir by name, which stays the owner's (the film that was there first)."""
        if is_shadowed_twin(self.lib, fm) or twin_of(self.lib, fm) is not None:
            return None
        with self.lib.lock:
            fid = self.lib.next_fid
            self.lib.next_fid += 1
        path = fm.path.with_suffix(".mp4" if fm.path.suffix != ".mp4" else ".mkv")
        path.write_bytes(film_content(fid, 0, FILM_SIZE + 8192))
        self.lib.stamp_film(path)
        twin = FilmModel(fid, path, twinned=True, last_op=time.monotonic(), flat=fm.flat)
        with self.lib.lock:
            fm.twinned = True
            self.lib.twin_op_at = time.monotonic()
            self.lib.films[fid] = twin
            self.lib.remember(path)
            self.lib.note(fid, f"twin of {fm.fid} arrived at {path}")
        return None

    def twin_rename_away(self, fm: FilmModel) -> None:
        """The twin (never the owner) is renamed to a stem of its own, in its folder or in a new one: the
        owner's work dir must stay with the owner."""
        twin = fm if is_shadowed_twin(self.lib, fm) else twin_of(self.lib, fm)
        if twin is None:
            return self.twin_arrive(fm)
        twin.renames += 1
        stem = f"Film {twin.fid:04d} t{twin.renames} ({1950 + twin.fid % 70})"
        if self.rng.random() < 0.5:
            folder = twin.folder
        else:
            self._folders += 1
            folder = self.rng.choice(self.lib.roots) / f"{stem} ~{self._folders}"
            folder.mkdir()
            twin.flat = False
        dest = folder / f"{stem}{twin.path.suffix}"
        with self.lib.lock:
            os.rename(twin.path, dest)
            self.lib.moved(twin.path, dest)
            twin.path = dest
            twin.last_op = time.monotonic()
            self.lib.twin_op_at = twin.last_op
        return None

    def hidden_swap(self, fm: FilmModel) -> None:
        """Two films swap names through a name the scan ignores, subtitles along:
        ``mv A .swap; mv B A; mv .swap B`` (hidden, or an in-progress ``.part`` name)."""
        now = time.monotonic()
        with self.lib.lock:
            others = [f for f in self.lib.films.values() if f is not fm and not f.twinned
                      and now - f.last_op >= MIN_FILM_GAP_S]
        if fm.twinned or not others:
            return None
        a, b = fm, self.rng.choice(others)
        b.last_op = now
        b.history.append("hidden_swap")
        self._folders += 1
        hidden = f".swap-{self._folders}" if self.rng.random() < 0.6 else f"{a.path.name}.part"
        a_path, a_subs, b_path, b_subs = a.path, dict(a.subs), b.path, dict(b.subs)
        moves = [(a_path, a.folder / hidden)] + [(p, a.folder / f".swap-{self._folders}{k}") for k, p in a_subs.items()]
        moves += [(b_path, a_path)] + [(p, a.folder / f"{a_path.stem}{k}") for k, p in b_subs.items()]
        moves += [(a.folder / hidden, b_path)]
        moves += [(a.folder / f".swap-{self._folders}{k}", b.folder / f"{b_path.stem}{k}") for k in a_subs]
        with self.lib.lock:
            for src, dest in moves:
                os.rename(src, dest)
                self.lib.moved(src, dest)
            a.path, a.subs = b_path, {k: b.folder / f"{b_path.stem}{k}" for k in a_subs}
            b.path, b.subs = a_path, {k: a_path.parent / f"{a_path.stem}{k}" for k in b_subs}
            a.flat, b.flat = b.flat, a.flat
            b.last_op = time.monotonic()
            self.lib.note(b.fid, f"hidden_swap with {a.fid} done -> {b.path}")
        return None

    # ------------------------------------------------------------------ hard links
    def hardlink_workdir_file(self, fm: FilmModel) -> None:
        """A hard link joins a file of ``fm``'s work dir (the lock, the lock's holder note, the partial
        results, a keyframe, the proxy) and a user file elsewhere, as ``cp -al`` and dedupe tools make them.

        Into the work dir (``ln -f film wd/name``): the work-dir name now shares the inode of another film,
        a subtitle, a trailer or an .nfo; whatever the daemon and the pipelines then do with that name, the
        user's bytes and mtime stay (the model checks the inode wherever it is). Out of it (``cp -al`` of
        one file into a backup folder): the backup is a user file whose bytes must stay as they were when
        the pipeline or the daemon next rewrites, resets or deletes the work-dir name."""
        wd = WorkDir.for_film(fm.path)
        kind = self.rng.choice(LINK_KINDS)
        into = self.rng.random() < 0.6
        try:
            fd = safefs.open_dir(wd.path)
        except OSError:
            return None  # no work dir (yet): nothing to link
        try:
            dir_fd, name = fd, LOCK_NAME
            if kind == "holder" and safefs.lstat_in(fd, LOCK_NAME + HOLDER_SUFFIX) is not None:
                name = LOCK_NAME + HOLDER_SUFFIX  # a pipeline holds the lock right now
            elif kind == "partial" and (into or safefs.lstat_in(fd, wd.partial_name) is not None):
                name = wd.partial_name
            elif kind == "proxy" and safefs.lstat_in(fd, wd.proxy_name) is not None:
                name = wd.proxy_name
            elif kind == "keyframe" and safefs.lstat_in(fd, KEYFRAMES_DIR_NAME) is not None:
                dir_fd = safefs.open_subdir(fd, KEYFRAMES_DIR_NAME)
                frames = sorted(os.listdir(dir_fd))
                name = self.rng.choice(frames) if frames else keyframe_name(self.rng.randrange(1, 9000))
            else:
                kind = "lock"
            if name == LOCK_NAME and safefs.lstat_in(fd, LOCK_NAME) is None:
                return None  # no pipeline ran here yet
            try:
                self._link(fm, wd, dir_fd, name, kind, into)
            finally:
                if dir_fd != fd:
                    os.close(dir_fd)
        except FileNotFoundError:
            return None  # the work dir moved on (a migration after an earlier rename): nothing linked
        finally:
            os.close(fd)
        return None

    def _link(self, fm: FilmModel, wd: WorkDir, dir_fd: int, name: str, kind: str, into: bool) -> None:
        lib = self.lib
        self._folders += 1
        if into:
            with lib.lock:
                users = [p for p in lib.expected if p != fm.path]
            if not users:
                return
            user = self.rng.choice(sorted(users))
            tmp = f".soak-ln-{self._folders}"
            replaces = kind in ("proxy", "keyframe") and safefs.lstat_in(dir_fd, name) is not None
            with lib.lock:
                os.link(user, tmp, dst_dir_fd=dir_fd)
                os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                lib.link_user_file(user, f"{user} (hard-linked as {wd.path.name}/.../{name})")
                if replaces:
                    # A result of ours was replaced by someone else's bytes: the film's results may now be
                    # judged either way (kept, or reset as no longer ours), so they are no longer "valid".
                    fm.version += 1
                lib.note(fm.fid, f"hard link {kind}: {user} -> {wd.path.name}/{name}")
        else:
            folder = fm.folder.parent / BACKUP_DIR_NAME  # every film's folder (flat or its own) is in a root
            folder.mkdir(exist_ok=True)
            backup = folder / f"{wd.stem} {name}.{self._folders}.bak"
            with lib.lock:
                os.link(name, backup, src_dir_fd=dir_fd)
                lib.remember(backup)
                lib.note(fm.fid, f"hard link {kind}: {wd.path.name}/{name} -> {backup}")
        self.link_counts[f"{kind} {'into' if into else 'out'}"] += 1


def _same_work_dir(a: FilmModel, b: FilmModel) -> bool:
    return a.folder == b.folder and a.path.stem == b.path.stem


def twin_of(lib: Library_, fm: FilmModel) -> FilmModel | None:
    """The same-stem twin that shares ``fm``'s work dir and arrived after it, if any."""
    with lib.lock:
        return next((f for f in lib.films.values() if f.fid > fm.fid and _same_work_dir(f, fm)), None)


def is_shadowed_twin(lib: Library_, fm: FilmModel) -> bool:
    """``fm`` shares its work dir with a film that was there first (its owner): it has no results of its own."""
    with lib.lock:
        return any(f.fid < fm.fid and _same_work_dir(f, fm) for f in lib.films.values())


class Pipeline(threading.Thread):
    """Runs the simulated pipeline over films without a valid cache while the churn goes on."""

    def __init__(self, lib: Library_, seed: int, daemon: Daemon | None = None) -> None:
        super().__init__(name="soak-pipeline", daemon=True)
        self.lib = lib
        self.daemon = daemon
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.outcomes: Counter[str] = Counter()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                with self.lib.lock:
                    films = list(self.lib.films.values())
                # Like the pre-warm (which waits for a film to settle) and a user starting an analysis, the
                # pipeline starts on films that have been still for a moment; changes DURING its run are
                # what the lock must handle.
                now = time.monotonic()
                cold = [f for f in films if now - f.last_op > PIPELINE_SETTLE_S and not _cache_valid(f.path)
                        and not _twin_unsettled(self.lib, f, now)]
                if cold:
                    fm = self.rng.choice(cold)
                    asked = time.monotonic()
                    ready = self._daemon_done_with(fm.path)
                    # The name is taken together with the settle check, under the driver's lock: a film the
                    # driver renamed since ``cold`` was computed (its path is then a fresh name, its last_op
                    # new) is not started on, just as the pre-warm never starts on a name seconds old; nor
                    # one the driver touched after the daemon was asked about it.
                    with self.lib.lock:
                        at = (fm.path, list(fm.subs.values()))
                        settled = time.monotonic() - fm.last_op > PIPELINE_SETTLE_S and fm.last_op < asked
                    if settled and not ready:
                        settled = False
                        self.outcomes["daemon busy"] += 1
                    try:
                        outcome = run_pipeline(self.lib, fm, hold=self.rng.choice([0.0, 0.005, 0.03]), at=at) \
                            if settled else "unsettled"
                    except FileNotFoundError:
                        outcome = "vanished"  # its folder moved while it ran: a real pipeline fails too
                    self.outcomes[outcome] += 1
                self.stop.wait(self.rng.uniform(0.002, 0.02))
        except BaseException as exc:  # reported by the driver, never silently lost
            self.error = exc

    def _daemon_done_with(self, film: Path) -> bool:
        """Whether the daemon has handled every change made so far and holds nothing pending for ``film``.

        The pre-warm, which this thread stands in for, runs inside the daemon on films it has judged: it can
        never start on a name whose work dir the daemon is still moving there (a rename, a move across roots,
        a swap). A quiet time since the driver's last operation is no proof of that on a loaded machine, so
        the daemon is asked (a sync cookie, then the film's state). A work dir that never follows still
        shows: the run then starts on a film the daemon is done with, and its results are counted lost."""
        if self.daemon is None:
            return True
        try:
            self.daemon.sync(timeout=30)
            st = self.daemon.film_status(film)
        except Exception:  # not (yet) a film the daemon knows: not judged, not to be analysed yet
            return False
        return st.get("pending") is None


def _twin_unsettled(lib: Library_, fm: FilmModel, now: float) -> bool:
    """A film of a twin pair is not analysed while it shares its work dir (the owner's results would be
    overwritten: the CLI refuses that), nor moments after a twin operation (its work dir may still be on
    its way to the owner's new name)."""
    if not fm.twinned:
        return False
    if now - lib.twin_op_at <= 2 * PIPELINE_SETTLE_S:
        return True
    with lib.lock:
        return any(f is not fm and _same_work_dir(f, fm) for f in lib.films.values())


def _cache_valid(film: Path) -> bool:
    meta = read_cache_metadata(WorkDir.for_film(film).cache_path)
    return meta is not None and meta.stamp == SourceStamp.maybe(film)


# --------------------------------------------------------------------------------------------- checking


def _gen_from_bytes(data: bytes) -> int | None:
    i = data.find(b"gen=")
    if i < 0:
        return None
    digits = data[i + 4 :].split(b"\n")[0].split(b" ")[0]
    return int(digits) if digits.isdigit() else None


def _walk(root: Path) -> Iterator[tuple[Path, bool]]:
    """Every regular file under ``root`` with whether it is inside a work dir (symlinks not followed)."""
    for dirpath, dirnames, filenames in os.walk(root):
        inside = any(is_work_dir_name(part) for part in Path(dirpath).parts)
        for name in filenames:
            yield Path(dirpath) / name, inside
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]


def check(lib: Library_) -> Findings:
    """Compare the disk with the model (see the module docstring for the definitions)."""
    out = Findings()
    with lib.lock:
        films = list(lib.films.values())
        gens = dict(lib.gens)
        complete = set(lib.complete)
        out.false_positives += lib.lost
        expected = dict(lib.expected)
        sacred = dict(lib.sacred)
        linked = dict(lib.linked)
    for fm in films:
        out.films += 1
        if any(f.fid < fm.fid and _same_work_dir(f, fm) for f in films):
            continue  # a same-stem twin: the work dir its name maps to holds its owner's results
        _check_film(fm, gens, complete, out, set(linked))
    seen: dict[int, tuple[str, int]] = {}
    outside: set[Path] = set()
    for root in lib.roots:
        for path, inside in _walk(root):
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if inside:
                if path.name.endswith(".tmp"):
                    out.temp_files.append(str(path))
                if st.st_ino in sacred:
                    seen[st.st_ino] = (sha1(path), st.st_mtime_ns)
                continue
            outside.add(path)
            exp = expected.get(path)
            if exp is None:
                out.touched.append(f"unexpected file outside work dirs: {path}")
            elif (got := (st.st_ino, sha1(path), st.st_mtime_ns)) != exp:
                what = [w for w, a, b in zip(("inode", "bytes", "mtime"), got, exp, strict=True) if a != b]
                out.touched.append(f"changed ({', '.join(what)}): {path}")
    for path in set(expected) - outside:
        out.touched.append(f"missing: {path}")
    # A user file is one inode, whatever its names: hard-linked into a work dir, it is still the user's (its
    # name there may go; its bytes and mtime may not change).
    with lib.lock:
        out.touched += lib.linked_changes()
    for ino, (h, m, where) in sacred.items():
        got = seen.get(ino)
        if got is None:
            # A manifest of a work dir whose film was deleted stays, as an orphan; only a missing one counts.
            out.touched.append(f"work-dir file gone: {where}")
        elif got != (h, m):
            out.touched.append(f"work-dir file modified: {where}")
    return out


def _check_film(fm: FilmModel, gens: dict[int, Generation], complete: set[int], out: Findings,
                linked: frozenset[int] | set[int] = frozenset()) -> None:
    """``linked``: inodes of user files hard-linked into work dirs (user bytes, not results of any run)."""
    wd = WorkDir.for_film(fm.path)

    def result(path: Path) -> bool:
        try:
            return os.lstat(path).st_ino not in linked
        except FileNotFoundError:
            return False
    cur = current_stamps(fm.path, [p for p in fm.subs.values() if p.exists()])
    problems: list[str] = []

    def stale(what: str, g: int | None, needs_subs: bool) -> None:
        gen = gens.get(g) if g is not None else None
        if gen is None:
            problems.append(f"{what}: unknown generation {g}")
        elif gen.video != cur.video:
            problems.append(f"{what}: computed from another video (gen {g})")
        elif needs_subs and gen.subtitles != cur.subtitles:
            problems.append(f"{what}: computed from other subtitles (gen {g})")

    ck = read_checkpoint(wd.path).checkpoint
    if ck is not None and ck.stages_complete:
        stale("stages " + ",".join(ck.stages_complete), gen_of_vibe(ck.vibe), set(ck.stages_complete) != {"proxy"})
    cache_gen: int | None = None
    if os.path.lexists(wd.cache_path):
        meta = read_cache_metadata(wd.cache_path)
        if meta is not None and meta.stamp != cur.video:
            problems.append("cache: metadata stamp does not match the film")
        try:
            _, results = read_cache_file(wd.cache_path)
            desc = results[0][1] if results else None
            cache_gen = int(desc.visual_content.split()[-1]) if desc is not None else None
        except (OSError, ValueError):
            cache_gen = None
        stale("cache", cache_gen, True)
    if os.path.lexists(wd.proxy_path) and result(wd.proxy_path):
        stale("proxy", _gen_from_bytes(wd.proxy_path.read_bytes()), False)
    if os.path.lexists(wd.timestamps_path):
        ts = json.loads(wd.timestamps_path.read_text())
        stale("timestamps", int(ts[0]) if ts else None, True)
    if wd.keyframes_dir.is_dir():
        for jpg in [j for j in wd.keyframes_dir.iterdir() if result(j)]:
            stale(f"keyframe {jpg.name}", _gen_from_bytes(jpg.read_bytes()), True)
    if problems:
        out.false_negatives.append(f"{fm.path}: {'; '.join(problems)} (operations: {', '.join(fm.history[-6:])})")
    # False positives: the newest results computed from exactly the current inputs must still be attached.
    now = (fm.fid, fm.version, cur.video, cur.subtitles)
    mine = [g for g in complete if (gens[g].fid, gens[g].version, gens[g].video, gens[g].subtitles) == now]
    if not mine:
        return
    if cache_gen is not None and cache_gen in mine and ck is not None and ck.stages_complete == list(ALL_STAGES) \
            and ck.source_file == str(fm.path) and not problems:
        out.warm += 1
        return
    why = "no cache" if cache_gen is None else "stages reset" if not (ck and ck.stages_complete) else "paths stale"
    out.false_positives.append(f"{fm.path}: valid results (gen {max(mine)}) not attached: {why} "
                               f"(operations: {', '.join(fm.history[-4:])})")


# --------------------------------------------------------------------------------------------- running


def daemon_usage(d: Daemon) -> tuple[float, int]:
    p = psutil.Process(d.pid)
    return p.memory_info().rss / 2**20, p.num_fds()


def wait_quiet(d: Daemon, *, quiet_s: float = 1.0, timeout: float = 120.0) -> None:
    """Until the daemon's event and revalidation counters stop moving and nothing is pending."""
    last: tuple[int, int] | None = None
    since = time.monotonic()

    def settled() -> bool:
        nonlocal last, since
        st = d.status()
        c = st["counters"]
        now = (int(c.get("events", 0)), int(c.get("revalidations", 0)))
        if now != last or st.get("pending"):
            last, since = now, time.monotonic()
            return False
        return time.monotonic() - since >= quiet_s

    wait_for(settled, timeout, interval=0.1, what="the daemon to go quiet")


@dataclass
class SoakConfig:
    operations: int = 400
    films: int = 30
    seed: int = 1
    settle_seconds: float = 0.3
    rate: float = 60.0  # operations per second (mean; exponential gaps)
    pipelines: int = 2
    log_level: str = "info"
    swaps: bool = False  # add SWAP_OPS to the mix
    progress: Callable[[int], None] | None = None


def _raise_pipeline_error(pipes: list[Pipeline]) -> None:
    for pipe in pipes:
        if pipe.error is not None:
            raise pipe.error


def run_soak(base: Path, cfg: SoakConfig) -> SoakResult:
    """Build the library, start the daemon, churn, go quiet, check, rescan, check again."""
    rng = random.Random(cfg.seed)
    roots = [base / "lib-a", base / "lib-b"]
    for r in roots:
        r.mkdir(parents=True)
    lib = Library_(roots, rng)
    global LAST_LIBRARY
    LAST_LIBRARY = lib
    driver = Driver(lib, min_films=max(2, cfg.films // 2), max_films=cfg.films * 2)
    if cfg.swaps:
        driver.ops.update(SWAP_OPS)
    for i in range(cfg.films):
        fm = driver.new_film(roots[i % 2])
        assert run_pipeline(lib, fm) == "written"
        for name in (TRAILER_MANIFEST_NAME, ASSEMBLY_MANIFEST_NAME, "notes.txt"):
            lib.sacred_file(WorkDir.for_film(fm.path).path / name)
    with DaemonRunner(base) as runner:
        d = runner.start([Library(r) for r in roots], settle_seconds=cfg.settle_seconds, log_level=cfg.log_level)
        rss0, fds0 = daemon_usage(d)
        rss_max, fds_max = rss0, fds0
        pipes = [Pipeline(lib, cfg.seed + 1 + i, d) for i in range(cfg.pipelines)]
        for pipe in pipes:
            pipe.start()
        t0 = time.monotonic()
        try:
            for i in range(cfg.operations):
                driver.step()
                time.sleep(rng.expovariate(cfg.rate))
                if i % 50 == 0:
                    rss, fds = daemon_usage(d)
                    rss_max, fds_max = max(rss_max, rss), max(fds_max, fds)
                    if cfg.progress is not None:
                        cfg.progress(i)
                    _raise_pipeline_error(pipes)
        finally:
            for pipe in pipes:
                pipe.stop.set()
            for pipe in pipes:
                pipe.join(10)
        seconds = time.monotonic() - t0
        _raise_pipeline_error(pipes)
        wait_quiet(d, quiet_s=max(1.0, cfg.settle_seconds * 3))
        live = check(lib)
        d.request("rescan", timeout=120)
        wait_quiet(d, quiet_s=max(1.0, cfg.settle_seconds * 3))
        final = check(lib)
        lib.close()
        rss1, fds1 = daemon_usage(d)
        counters = d.status()["counters"]
    return SoakResult(
        operations=cfg.operations,
        op_counts=dict(sorted(driver.counts.items())),
        seconds=seconds,
        ops_per_s=cfg.operations / seconds if seconds else 0.0,
        pipeline_runs=sum(p.outcomes["written"] for p in pipes),
        pipeline_busy=sum(p.outcomes["busy"] for p in pipes),
        invalidations=int(counters.get("invalidations", 0)),
        migrations=int(counters.get("migrations", 0)),
        deferred=int(counters.get("deferred", 0)),
        events=int(counters.get("events", 0)),
        live=live,
        final=final,
        rss_start_mb=rss0,
        rss_max_mb=max(rss_max, rss1),
        rss_end_mb=rss1,
        fds_start=fds0,
        fds_max=max(fds_max, fds1),
        fds_end=fds1,
        errors=int(counters.get("errors", 0)),
        flat_op_counts=dict(sorted(driver.flat_counts.items())),
        link_counts=dict(sorted(driver.link_counts.items())),
        flat_films=sum(1 for f in lib.films.values() if f.flat),
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--operations", type=int, default=10_000)
    ap.add_argument("--films", type=int, default=200, help="films at the start (the population floats)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rate", type=float, default=60.0, help="operations per second (mean)")
    ap.add_argument("--keep", action="store_true", help="keep the library folder for inspection")
    ap.add_argument("--swaps", action="store_true", help="add hidden-name swaps of two films to the mix")
    args = ap.parse_args(argv)
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="cinecut-soak-"))
    try:
        tty = sys.stdout.isatty()
        res = run_soak(base, SoakConfig(args.operations, args.films, args.seed, rate=args.rate, swaps=args.swaps,
                                        progress=lambda i: tty and print(f"\r{i} operations", end="", flush=True)))
    finally:
        print()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    s = res.summary()
    rows = [
        ["operations", res.operations, ""],
        ["rate", f"{res.ops_per_s:.0f} ops/s", ""],
        ["invalidations by the daemon", res.invalidations, ""],
        ["work dirs migrated after renames", res.migrations, ""],
        ["invalidations deferred behind a pipeline's lock", res.deferred, ""],
        ["pipeline runs (lock busy)", f"{res.pipeline_runs} ({res.pipeline_busy})", ""],
        ["false negatives before / after rescan",
         f"{len(res.live.false_negatives)} / {len(res.final.false_negatives)}", "0 / 0"],
        ["false positives before / after rescan",
         f"{len(res.live.false_positives)} / {len(res.final.false_positives)}", "0 / 0"],
        ["films, trailers, manifests, unknown files touched", len(res.final.touched), "0"],
        ["temp files left in work dirs", len(res.final.temp_files), "0"],
        ["daemon RSS start / max / end", f"{res.rss_start_mb:.1f} / {res.rss_max_mb:.1f} / {res.rss_end_mb:.1f} MB",
         "bounded"],
        ["daemon open fds start / max / end", f"{res.fds_start} / {res.fds_max} / {res.fds_end}", "bounded"],
        ["films at the end (warm)", f"{res.final.films} ({res.final.warm})", ""],
        ["films in flat folders at the end", res.flat_films, ""],
    ]
    ops = [[op, n, res.flat_op_counts.get(op, "")] for op, n in res.op_counts.items()]
    ops += [[f"hard link: {k}", n, ""] for k, n in res.link_counts.items()]
    ops += [["flat folder renamed (all its films)", "", res.flat_op_counts.get("(flat folder renamed)", 0)]]
    print_table("operations by kind", ["operation", "count", "on flat-folder films"], ops)
    print_table("cinecutd churn soak", ["measure", "value", "target"], rows)
    for example in s["after_rescan"]["examples"]:
        print("  ", example)
    path = write_result("soak", {"seed": args.seed, "films_at_start": args.films, "rate": args.rate, **s})
    print(f"wrote {path}")
    ok = not (res.final.false_negatives or res.final.false_positives or res.final.touched or res.final.temp_files)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
