"""Revalidation: decide whether a film's inputs changed since its work dir was last verified, and act.

The single place that compares stamps. The daemon calls it on every event and at every rescan; the
``cinecut`` CLI calls it before trusting a checkpoint. Witnesses, from strongest to weakest:

1. the cache's metadata stamp vs the film's stat (upstream's own rule),
2. our sidecar (``cinecut_stamps.json``): the stamps the completed stages are consistent with, written
   only as a record of what was verified (a stage our pipeline computed, an invalidation made here, or
   upstream's evidence checked here), never as "whatever is there now",
3. without a sidecar: the cache's stamp; with no cache, the proxy's media facts against the film's
   (:mod:`cinecut.evidence`); a subtitle newer than the checkpoint is a changed subtitle.

Nothing is written into a work dir that nothing changed: an unchanged work dir upstream wrote is
judged on its own evidence, lock-free, every time it is looked at.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cinecut import faults, safefs
from cinecut.checkpoint import CheckpointRead, read_checkpoint_at
from cinecut.evidence import EvidenceUnavailable, Verification, proxy_matches_film
from cinecut.inference.cache import CacheMetadata, metadata_from_fd
from cinecut.locks import work_dir_lock
from cinecut.stages import Input, InvalidationReport, downstream, invalidate_at
from cinecut.stamp import SourceStamp
from cinecut.stamps import FORMAT as STAMPS_FORMAT
from cinecut.stamps import (
    MAX_STAMPS_BYTES,
    InputStamps,
    current_stamps,
    read_stamps_at,
    subtitles_unchanged,
    write_stamps_at,
)
from cinecut.workdir import CHECKPOINT_NAME, STAMPS_NAME, WorkDir


@dataclass(slots=True)
class Revalidation:
    """Outcome of one revalidation of a film's work dir."""

    film: str
    work_dir: str
    exists: bool = False
    film_present: bool = True
    changed: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    report: InvalidationReport | None = None
    stamps: InputStamps | None = None
    cache: CacheMetadata | None = None
    checkpoint: CheckpointRead | None = None
    refused: str | None = None
    verification: Verification | None = None
    evidence: str = ""


def _cache_metadata_at(dir_fd: int, name: str) -> CacheMetadata | None:
    try:
        fd = safefs.open_regular(dir_fd, name)
    except OSError:
        return None
    try:
        return metadata_from_fd(fd)
    finally:
        os.close(fd)


@dataclass(slots=True)
class Assessment:
    """The decision about one work dir: what changed, what proves the rest, and whether to record it."""

    changed: set[Input] = field(default_factory=set)
    reasons: list[str] = field(default_factory=list)
    verification: Verification = Verification.NOTHING
    evidence: str = ""
    record: bool = False  # evidence was checked here: the sidecar may now record it
    needs_evidence: bool = False  # lock-free look only: the proxy must be examined by revalidate()


def assess(
    dir_fd: int,
    wd: WorkDir,
    current: InputStamps,
    recorded: InputStamps | None,
    meta: CacheMetadata | None,
    checkpoint: CheckpointRead | None,
    *,
    gather: bool = True,
    baseline: InputStamps | None = None,
) -> Assessment:
    """Which inputs changed, and what proves the stages that stay; the one place that decides.

    ``gather=False`` (rescans) never runs ffprobe: where the proxy would have to be examined it sets
    ``needs_evidence`` and leaves the decision to :func:`revalidate`.
    """
    a = Assessment()
    video = current.video
    if meta is not None and meta.stamp != video:
        a.changed.add(Input.VIDEO)
        a.reasons.append("cache stamp does not match the film")
    if recorded is not None:
        a.verification = Verification.RECORDED
        if recorded.video != video:
            a.changed.add(Input.VIDEO)
            a.reasons.append("film changed since its stages were recorded")
        same, why = subtitles_unchanged(recorded, current, wd.film.parent)
        if not same:
            a.changed.add(Input.SUBTITLE)
            a.reasons.append(why)
        return a
    read: list[CheckpointRead | None] = [checkpoint]

    def stages() -> list[str]:
        """The checkpoint's completed stages, read only when a decision needs them (rescans of a warm
        upstream library never do: the cache decides)."""
        if read[0] is None:
            read[0] = read_checkpoint_at(dir_fd)
        ckpt = read[0].checkpoint
        return ckpt.stages_complete if ckpt is not None else []

    if meta is not None:
        a.verification = Verification.CACHE
    elif video is not None and stages():
        if baseline is not None and baseline.video is not None and baseline.video != video:
            # Seen changing: whatever the stages were computed from, it was not these bytes.
            a.changed.add(Input.VIDEO)
            a.reasons.append("film changed since it was first seen; nothing proves its stages came from it")
        else:
            _judge_by_proxy(dir_fd, wd, video, a, gather)
    if baseline is not None or current.subtitles:
        _judge_subtitles_unrecorded(dir_fd, wd, current, baseline, a, stages)
    return a


def _judge_subtitles_unrecorded(
    dir_fd: int,
    wd: WorkDir,
    current: InputStamps,
    baseline: InputStamps | None,
    a: Assessment,
    stages: Callable[[], list[str]],
) -> None:
    """Subtitle stages with no record of the subtitles they read: a subtitle written after the checkpoint,
    or one that changed or vanished since the caller last looked, makes them stale."""
    why = ""
    if baseline is not None:
        same, why = subtitles_unchanged(baseline, current, wd.film.parent)
        why = "" if same else why
    if not why and current.subtitles:
        ck = safefs.lstat_in(dir_fd, CHECKPOINT_NAME)
        if ck is not None and any(s.mtime > ck.st_mtime for _, s in current.subtitles):
            why = "a subtitle is newer than the checkpoint"
    if why and "subtitles" in stages():
        a.changed.add(Input.SUBTITLE)
        a.reasons.append(why)


def _judge_by_proxy(dir_fd: int, wd: WorkDir, video: SourceStamp, a: Assessment, gather: bool) -> None:
    """Completed stages, no cache, no record: the proxy is upstream's only witness of the film it read."""
    proxy = safefs.lstat_in(dir_fd, wd.proxy_name)
    if proxy is not None and stat.S_ISREG(proxy.st_mode) and proxy.st_mtime < video.mtime:
        a.changed.add(Input.VIDEO)
        a.reasons.append("film is newer than its proxy")
        return
    a.verification = Verification.UNVERIFIED
    if not gather:
        a.needs_evidence, a.evidence = True, "its proxy is still to be compared with the film"
        return
    try:
        verdict = proxy_matches_film(dir_fd, wd.proxy_name, wd.film)
    except EvidenceUnavailable as exc:
        a.evidence = f"nothing proves which film its stages came from: {exc}"
        return
    if verdict.matches:
        a.verification, a.evidence, a.record = Verification.PROXY, verdict.reason, True
    else:
        a.changed.add(Input.VIDEO)
        a.reasons.append(f"nothing proves its stages came from this film: {verdict.reason}")


def detect_changes(
    dir_fd: int,
    wd: WorkDir,
    current: InputStamps,
    recorded: InputStamps | None,
    meta: CacheMetadata | None,
    checkpoint: CheckpointRead | None,
) -> tuple[set[Input], list[str]]:
    """Which inputs changed, with a human-readable reason for each finding (see :func:`assess`)."""
    a = assess(dir_fd, wd, current, recorded, meta, checkpoint)
    return a.changed, a.reasons


def _to_record(a: Assessment, recorded: InputStamps | None, current: InputStamps) -> InputStamps | None:
    """The sidecar to write after this decision, or None: only stamps something here verified.

    An invalidation of the video resets every stage, so the current stamps are then true by
    construction; other changes and a checked proxy are recorded unless the video is unverified. A
    record whose identity (path, inode) moved with an unchanged stamp is brought up to date, keeping
    its subtitles: a subtitle found under another name is the same content, not a new record.
    """
    if Input.VIDEO in a.changed or a.record:
        return current
    if a.changed:
        return current if a.verification is not Verification.UNVERIFIED else None
    if recorded is not None and _identity_differs(recorded, current):
        return InputStamps(current.source_file, current.video, recorded.subtitles, current.inode, current.device)
    return None


def revalidate(
    film: str | os.PathLike[str],
    subtitles: list[Path] | tuple[Path, ...] = (),
    *,
    lock_timeout: float | None = 0.0,
    locked_fd: int | None = None,
    baseline: InputStamps | None = None,
) -> Revalidation:
    """Compare a film's inputs with its work dir and invalidate what they made stale.

    The decision is made lock-free first: a work dir with nothing to change or record is not locked and
    not written (no lock file is created in it). Raises LockBusy if a pipeline holds a work dir that
    needs an edit (``lock_timeout=0``), so the caller can defer. A film that vanished is not invalidated
    here: its work dir becomes an orphan, which is reported, not deleted. The stamps sidecar is written
    last, as the commit mark of the verification. ``baseline``: stamps the caller saw earlier of a work
    dir without a sidecar, used only to notice a subtitle that changed or vanished since (never to
    certify anything).
    """
    wd = WorkDir.for_film(film)
    result = Revalidation(str(wd.film), str(wd.path))
    if locked_fd is not None:
        _revalidate_at(locked_fd, wd, subtitles, result, baseline)
        return result
    try:
        with safefs.work_dir_fd(wd.path) as fd:
            look = _look(fd, wd, subtitles, result, baseline)
            if look is None or (not look[0].changed and _to_record(*look) is None):
                return result
            lock = work_dir_lock(wd, purpose="revalidate", dir_fd=fd)
            if not lock.try_acquire():
                lock.acquire(lock_timeout)
            try:
                _revalidate_at(fd, wd, subtitles, result, baseline)
            finally:
                lock.release()
    except FileNotFoundError:
        result.film_present = os.path.exists(wd.film)
        result.verification = Verification.NOTHING
    except safefs.SymlinkRefused as exc:
        result.exists = True
        result.refused = f"{exc.filename}: {exc.strerror}"
    return result


def _look(
    fd: int,
    wd: WorkDir,
    subtitles: list[Path] | tuple[Path, ...],
    result: Revalidation,
    baseline: InputStamps | None,
) -> tuple[Assessment, InputStamps | None, InputStamps] | None:
    """Read everything and decide (no write); None when the film itself is gone."""
    result.exists = True
    current = current_stamps(wd.film, list(subtitles))
    result.stamps = current
    if current.video is None:
        result.film_present = False
        return None
    recorded = read_stamps_at(fd)
    meta = _cache_metadata_at(fd, wd.cache_name)
    ckpt = read_checkpoint_at(fd)
    result.cache, result.checkpoint = meta, ckpt
    a = assess(fd, wd, current, recorded, meta, ckpt, baseline=baseline)
    result.changed = sorted(a.changed)
    result.reasons = a.reasons
    result.verification, result.evidence = a.verification, a.evidence
    return a, recorded, current


def _revalidate_at(
    fd: int,
    wd: WorkDir,
    subtitles: list[Path] | tuple[Path, ...],
    result: Revalidation,
    baseline: InputStamps | None = None,
) -> None:
    look = _look(fd, wd, subtitles, result, baseline)
    if look is None:
        return
    a, recorded, current = look
    if a.changed:
        report = InvalidationReport(str(wd.path), result.changed, "; ".join(a.reasons))
        invalidate_at(fd, wd, downstream(a.changed), report)
        result.report = report
        if Input.VIDEO in a.changed:
            result.cache = None
    record = _to_record(a, recorded, current)
    if record is not None and not (result.report is not None and result.report.errors):
        # An invalidation that met errors left stale stages behind: recording the inputs as verified
        # would hide them from the retry.
        faults.point("revalidate.before_stamps")
        write_stamps_at(fd, record)
        if a.changed:
            result.verification = Verification.RECORDED


def _identity_differs(a: InputStamps, b: InputStamps) -> bool:
    """The same stamps, recorded for another path or inode (a rename, a copy that kept the stamp)."""
    return (a.source_file, a.inode, a.device) != (b.source_file, b.inode, b.device)


@dataclass(frozen=True, slots=True)
class Probe:
    """A lock-free, write-free look at a work dir: does it need a (locked) revalidation?"""

    exists: bool
    needs_revalidation: bool
    cache: CacheMetadata | None = None
    stamps: InputStamps | None = None
    verification: Verification | None = None
    recorded: bool = True  # our sidecar is there (False: the caller may keep ``stamps`` as a baseline)
    #: The decision read nothing but the film, its listed subtitles and its work dir's files (no search of
    #: the folder for a subtitle under another name): the same files, unchanged, give the same decision.
    self_contained: bool = True


def probe(
    film: str | os.PathLike[str],
    subtitles: list[Path] | tuple[Path, ...] = (),
    *,
    wd: WorkDir | None = None,
    st: os.stat_result | None = None,
    baseline: InputStamps | None = None,
) -> Probe:
    """Cheap check used by rescans: read the sidecar and the cache header, take no lock, write nothing.

    ``needs_revalidation`` is True when anything is off (changed inputs, stamps to update, a proxy to
    compare with the film, a symlinked work dir to report); the caller then runs :func:`revalidate`. A
    work dir upstream wrote whose cache matches the film needs nothing: it is not written to.
    """
    wd = wd if wd is not None else WorkDir.for_film(film)
    try:
        with safefs.work_dir_fd(wd.path) as fd:
            if st is not None and not subtitles:
                fast = _fast_probe(fd, wd, st)
                if fast is not None:
                    return fast
            current = current_stamps(wd.film, subtitles, st=st, resolved=True)
            if current.video is None:
                return Probe(True, False, stamps=current)
            recorded = read_stamps_at(fd)
            meta = _cache_metadata_at(fd, wd.cache_name)
            a = assess(fd, wd, current, recorded, meta, None, gather=False, baseline=baseline)
            needs = bool(a.changed) or a.needs_evidence or _to_record(a, recorded, current) is not None
            witness = recorded if recorded is not None else baseline
            alone = witness is None or witness.subtitles == current.subtitles
            return Probe(True, needs, meta, current, a.verification, recorded is not None, alone)
    except FileNotFoundError:
        return Probe(False, False, verification=Verification.NOTHING)
    except OSError:
        return Probe(True, True)


def _fast_probe(fd: int, wd: WorkDir, st: os.stat_result) -> Probe | None:
    """The rescan's common case, decided on the raw sidecar: everything matches, nothing to do.

    A library rescan probes every film; most are unchanged since the last look. Comparing the decoded
    JSON with the film's ``stat`` directly skips building and validating objects. Any doubt (a field
    that is off, an unusual sidecar) returns None and the full path decides.
    """
    try:
        raw = json.loads(safefs.read_bounded(fd, STAMPS_NAME, MAX_STAMPS_BYTES))
    except (OSError, ValueError, RecursionError):
        return None
    if not (
        type(raw) is dict
        and raw.get("format") == STAMPS_FORMAT
        and raw.get("subtitles") == []
        and raw.get("video") == {"mtime": st.st_mtime, "size": st.st_size}
        and raw.get("inode") == st.st_ino
        and raw.get("device") == st.st_dev
        and raw.get("source_file") == str(wd.film)
    ):
        return None
    meta = _cache_metadata_at(fd, wd.cache_name)
    if meta is not None and (meta.mtime != st.st_mtime or meta.size != st.st_size):
        return None
    return Probe(True, False, meta, None, Verification.RECORDED)
