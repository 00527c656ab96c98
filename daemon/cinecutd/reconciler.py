"""Rescans and roots: when a rescan runs, what it decides per film, and which work dirs it re-homes.

:class:`cinecutd.reconcile.ReconcileJob` is one rescan's walk; this module owns everything around it:
one job running and at most one waiting (requests made meanwhile share it), the periodic rescan, the
per-film decision (judge it, or note its cache state from the probe alone), orphaned work dirs adopted by
the films they belong to, and the roots' lifecycle (missing, back and waiting for a watch). A finished
rescan is announced on the bus (:class:`cinecutd.states.Reconciled`); a root's change of status too
(:class:`cinecutd.states.RootChanged`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import structlog

from cinecut.evidence import Verification
from cinecut.ownership import Identity
from cinecut.revalidate import probe
from cinecut.stamp import SourceStamp
from cinecut.stamps import read_stamps
from cinecut.workdir import WorkDir
from cinecutd.config import Config, LibraryConfig
from cinecutd.discovery import Known
from cinecutd.health import Health, access_problems
from cinecutd.judge import Judge, note_verification, owns_work_dir
from cinecutd.judged import Mounts, remember, snapshot, unchanged
from cinecutd.migrate import is_parked_name
from cinecutd.moves import Moves
from cinecutd.queries import cache_validity
from cinecutd.reconcile import SLICE_S, ReconcileJob, Summary
from cinecutd.registry import FilmState, Registry, RootState
from cinecutd.states import Bus, Reconciled, RootChanged, RootStatus, Trigger
from cinecutd.sweep import sweep_own_temp_files
from cinecutd.tallies import Tallies
from cinecutd.upstream_orphans import orphans_by_cache_stamp

if TYPE_CHECKING:
    from cinecutd.intake import Intake

log = structlog.get_logger("cinecutd")


class ReconcileHost(Protocol):
    """What rescans need of the engine: state, the libraries, and a timer."""

    reg: Registry
    config: Config
    health: Health
    tallies: Tallies
    bus: Bus

    @property
    def libraries(self) -> list[LibraryConfig]: ...
    def library_for(self, path: Path) -> LibraryConfig | None: ...
    def later(self, due: float, fn: Callable[[], None]) -> None: ...


class Reconciler:
    """Runs rescans (whole, or in slices between events) and acts on what each film's probe says."""

    def __init__(self, host: ReconcileHost, intake: Intake, judge: Judge, moves: Moves) -> None:
        self.host = host
        self.intake = intake
        self.judge = judge
        self.moves = moves
        # The rescan in progress (run in slices between queue items) and the one asked for meanwhile.
        self._job: ReconcileJob | None = None
        self._job_next: ReconcileJob | None = None
        # The periodic rescan: when it is due, and the timers set for it (one, or two after a reload made
        # it earlier); a timer that fires before the due time (pushed back by a rescan since) re-arms.
        self._periodic_at: float | None = None
        self._armed: set[float] = set()
        self.loops_warned: set[Path] = set()
        #: What the last rescan learned of each root's names: the next one reuses it (ScanResult.known).
        self.known: dict[Path, Known] = {}
        self.journaled: set[Path] = set()  # work dirs whose migration journal is still to look at or resume
        self.schedule_periodic()

    # ----------------------------------------------------------------- when rescans run
    @property
    def rescanning(self) -> bool:
        """A rescan is in progress (or asked for)."""
        return self._job is not None or self._job_next is not None

    def mark(self, src: str, dest: str | None, is_dir: bool) -> None:
        """An event is being handled: the rescan in progress must not trust its findings about it."""
        if self._job is not None:
            self._job.mark(src, dest, is_dir)

    def reconcile(self, reason: str) -> Summary:
        """A full rescan of every root, run to its end now (startup: READY means caught up).

        A rescan in progress is dropped for this one (its waiters are answered by this one)."""
        waiters: list[Callable[[Summary], None]] = []
        for job in (self._job, self._job_next):
            if job is not None:
                job.cancel()
                waiters += job.waiters
        self._job = self._job_next = None
        job = ReconcileJob(self, reason, waiters)
        self._job = job
        try:
            job.step(None)
        finally:
            self._job = None
        return self._done(job)

    def request(self, reason: str, on_done: Callable[[Summary], None] | None = None) -> None:
        """Start a rescan that runs in slices between queued events (a periodic rescan, an overflow, a
        client's request). One already running started before this request and may have passed folders
        that changed since: a second one follows it (requests made meanwhile share it)."""
        waiters = [on_done] if on_done is not None else []
        if self._job is None:
            self._job = ReconcileJob(self, reason, waiters)
        elif self._job_next is None:
            self._job_next = ReconcileJob(self, reason, waiters)
        else:
            self._job_next.waiters.extend(waiters)

    def step(self) -> None:
        """One slice of the rescan in progress (a few ms); the next one starts when it ends."""
        if self._job is None:
            if self._job_next is None:
                return
            self._job, self._job_next = self._job_next, None
        job = self._job
        try:
            finished = job.step(SLICE_S)
        except Exception as exc:  # never fatal: the next rescan tries again
            log.error("rescan_failed", reason=job.reason, error=repr(exc))
            self.host.reg.counters["errors"] += 1
            self._job = None
            self.schedule_periodic()
            job.finish({"reason": job.reason, "error": repr(exc)})
            return
        if finished:
            self._job = None
            self._done(job)

    def restart(self) -> None:
        """The roots changed (a reload): a rescan in progress scans the old ones, so it starts over."""
        if self._job is not None:
            self._job.cancel()
            nxt = self._job_next.waiters if self._job_next is not None else []
            self._job_next = ReconcileJob(self, self._job.reason, self._job.waiters + nxt)
            self._job = None
        self.schedule_periodic()

    def schedule_periodic(self) -> None:
        """The next periodic rescan, ``rescan_interval`` from now (none when 0); replaces the one set.
        At most one timer waits for it, however many rescans end meanwhile."""
        interval = self.host.config.daemon.rescan_interval
        self._periodic_at = time.monotonic() + interval if interval > 0 else None
        if self._periodic_at is not None and not any(d <= self._periodic_at for d in self._armed):
            self._arm(self._periodic_at)

    def _arm(self, due: float) -> None:
        self._armed.add(due)
        self.host.later(due, partial(self._periodic_fired, due))

    def _periodic_fired(self, due: float) -> None:
        self._armed.discard(due)
        at = self._periodic_at
        if at is None:
            return
        if time.monotonic() >= at:
            self._periodic_at = None  # scheduled again when this rescan ends
            self.request("periodic")
        elif not any(d <= at for d in self._armed):
            self._arm(at)

    def _done(self, job: ReconcileJob) -> Summary:
        summary = job.summary or {"reason": job.reason}
        if isinstance(summary.get("duration_s"), int | float):
            self.host.tallies.rescan_duration.observe(summary["duration_s"])
        self.schedule_periodic()
        self.host.bus.publish(Reconciled(summary))
        job.finish(summary)
        return summary

    # ----------------------------------------------------------------- roots
    def root_scanned(self, root: RootState) -> None:
        """A rescan found a root that was missing or unreadable: it waits for its watch again."""
        if root.state in (RootStatus.MISSING, RootStatus.UNREADABLE):
            root.state = RootStatus.PENDING_WATCH
            self.host.bus.publish(RootChanged(root.path, RootStatus.PENDING_WATCH))

    def root_missing(self, root: Path) -> None:
        """A root is gone (unmounted): forget its films, create no orphans."""
        reg = self.host.reg
        state = reg.roots.get(root)
        if state is not None:
            state.state = RootStatus.MISSING
            state.films = 0
        for film in [f for f, s in reg.films.items() if s.root == root]:
            # An unmounted root is not a deletion: forget its films, create no orphans.
            reg.remove(film)
        reg.orphans = {w: t for w, t in reg.orphans.items() if not w.is_relative_to(root)}
        self.host.bus.publish(RootChanged(root, RootStatus.MISSING))

    # ----------------------------------------------------------------- what a rescan does
    def sweep(self, work_dirs: set[Path]) -> None:
        """Startup only: our dead writers' temp files (:mod:`cinecutd.sweep`)."""
        removed = sweep_own_temp_files(work_dirs)
        if removed:
            self.host.reg.counters["temp_files_removed"] += removed

    def reconcile_film(self, state: FilmState, t0: float, mounts: Mounts | None = None) -> bool:
        """The per-film decision of a rescan: judge a film the probe doubts (or a blocked one), else note
        its cache state from the probe alone. A film whose every input is, by stat, what its last
        judgement read is not judged again (:mod:`cinecutd.judged`): True then (a quick one)."""
        mounts = mounts if mounts is not None else Mounts()
        trusted = self._may_trust(state)
        if state.judged is not None:
            if trusted and unchanged(state.judged, state, mounts):
                return True
            state.judged = None
        self._judge_film(state, t0, mounts, trusted)
        return False

    def _judge_film(self, state: FilmState, t0: float, mounts: Mounts, trusted: bool) -> None:
        try:
            st = os.stat(state.film)
        except OSError:
            return
        # Taken before the probe reads anything: a change made while it reads shows at the next rescan.
        inputs = snapshot(state, st, mounts) if trusted else None
        stamp = SourceStamp.from_stat(st)
        if stamp != state.stamp:
            state.last_change = time.monotonic() if state.stamp is not None else state.last_change
        state.stamp, state.inode, state.device = stamp, st.st_ino, st.st_dev
        if state.conflict and not owns_work_dir(state):
            return
        wd = state.wd or WorkDir.for_film(state.film)
        p = probe(state.film, state.subtitles, wd=state.wd, st=st, baseline=state.baseline)
        state.has_work_dir = p.exists
        note_verification(state, p.verification, p.stamps, not p.recorded)
        if p.needs_revalidation and p.exists and self.moves.adopt_travelled_work_dir(state, t0):
            return  # its folder was renamed while nobody watched: paths rewritten, then revalidated
        if p.needs_revalidation or state.film in self.host.health.blocked:
            self.judge.revalidate(state, t0, Trigger.RESCAN)  # a blocked film is retried at every rescan too
            return
        state.cache = cache_validity(p.cache, stamp, work_dir_exists=p.exists, cache_path=wd.cache_path)
        if p.exists and access_problems(wd):
            # Upstream files it cannot read (or a work dir it cannot write): judged in full, and shown as
            # blocked before any change comes.
            self.judge.revalidate(state, t0, Trigger.RESCAN)
            return
        if p.self_contained:
            witness = p.verification not in (Verification.RECORDED, Verification.CACHE, Verification.NOTHING)
            state.judged = remember(inputs, proxy_witness=witness)

    def _may_trust(self, state: FilmState) -> bool:
        """A film in the middle of something (a twin, a judgement waiting for a lock, a burst, a refusal,
        a blocked film retried at every rescan) is judged in full, never from a memo."""
        if state.conflict or state.pending is not None or state.settle_due is not None or state.refused is not None:
            return False
        blocked = self.host.health.blocked
        return not blocked or state.film not in blocked

    def adopt_orphans(self, homeless: list[FilmState], orphaned: set[Path], work_dirs: set[Path]) -> None:
        """Films renamed or moved while nobody watched: an orphaned work dir whose stamps sidecar records
        this very file (device, inode, stamp) under a path that is gone follows it to its new name; one
        without a sidecar follows the film whose stamp its cache names (:mod:`cinecutd.upstream_orphans`)."""
        by_inode: dict[tuple[int | None, int], tuple[Path, Path | None]] = {}
        for wd in orphaned:
            rec = read_stamps(wd)
            if rec is None or rec.inode is None or rec.video is None:
                continue
            old = Path(rec.source_file)
            if is_parked_name(wd.name):  # parked when another film took its name: its file may be back
                by_inode[(rec.device, rec.inode)] = (old, wd)
            elif WorkDir.for_film(old).path.name == wd.name and not os.path.lexists(old):
                # At its recorded place, or in a folder renamed since (the record names the folder's old name).
                by_inode[(rec.device, rec.inode)] = (old, None if WorkDir.for_film(old).path == wd else wd)
        by_stamp = orphans_by_cache_stamp(orphaned)  # upstream's work dirs: no sidecar, the cache names it
        for state in homeless if by_inode or by_stamp else ():
            try:
                st = os.stat(state.film)
            except OSError:
                continue
            found = by_inode.pop((st.st_dev, st.st_ino), None)
            src_dir: Path | None = None
            identity: Identity | None = None
            if found is not None:
                old_film, src_dir = found
                rec = read_stamps(src_dir or WorkDir.for_film(old_film).path)
                if rec is None or rec.video != SourceStamp.from_stat(st):
                    continue
                identity = (st.st_dev, st.st_ino)
            else:
                old_film = by_stamp.pop(SourceStamp.from_stat(st), None)
                if old_film is None:
                    continue
            old_wd = src_dir or WorkDir.for_film(old_film).path
            self.moves.migrate(old_film, state.film, time.monotonic(), identity=identity, src_dir=src_dir)
            if not os.path.lexists(old_wd):
                work_dirs.discard(old_wd)
                work_dirs.add(state.work_dir)


__all__ = ["ReconcileHost", "Reconciler", "Summary"]
