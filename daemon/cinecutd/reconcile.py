"""The full rescan as a resumable job: the safety net under lost events, and the startup catch-up.

A rescan of a large library takes seconds; run in one go on the engine thread it would hold every
invalidation behind it (a replacement made during a 5,000-film rescan used to wait for all of it). So
the rescan is a generator, and :class:`ReconcileJob` runs it in slices of a few milliseconds between the
engine's queue items: an event waits at most one slice.

Interleaving makes the scan's findings age while the job runs. Each event the engine handles meanwhile
marks what it touched (the film stems in the event's folder, or a whole folder tree); a touched film is
looked at afresh (its file, its subtitle listing) before the job registers it, declares it gone or
judges it, and work dirs of touched stems are checked again before they are called orphans. Everything
else the job decides from its own scan, which no event has contradicted.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from cinecut import faults
from cinecut.locks import LockBusy
from cinecut.workdir import is_work_dir_name, stem_of_work_dir, subtitle_stems
from cinecutd.discovery import Known, ScanResult, iter_scan_root, subtitles_of
from cinecutd.gc import collect_orphans
from cinecutd.judged import Mounts
from cinecutd.migrate import JOURNAL_NAME, MigrationError, resume_migration
from cinecutd.registry import FilmState, RootState
from cinecutd.states import RootStatus

if TYPE_CHECKING:
    from cinecutd.config import LibraryConfig
    from cinecutd.reconciler import Reconciler

log = structlog.get_logger("cinecutd")

#: The longest a slice of a rescan holds the engine before queued events get their turn.
SLICE_S = 0.004
#: Films handled between two yields in the cheap passes (registration, the gone check).
BATCH = 64
#: Films found unchanged by their memo (a few ``stat`` calls each) between two yields; a film judged in
#: full is always followed by a yield.
QUICK_BATCH = 16

Summary = dict[str, Any]


class ReconcileJob:
    """One rescan in progress: its generator, who waits for it, and what events touched meanwhile."""

    def __init__(self, owner: Reconciler, reason: str, waiters: list[Callable[[Summary], None]] | None = None) -> None:
        self.reason = reason
        self.waiters: list[Callable[[Summary], None]] = list(waiters or [])
        self.summary: Summary | None = None
        self._touched: set[tuple[Path, str]] = set()  # (folder, stem) an event was about
        self._trees: set[Path] = set()  # folders created, moved or deleted: all they hold is touched
        self._steps = _steps(owner, self, reason)

    # ----------------------------------------------------------------- marks from events
    def mark(self, src: str, dest: str | None, is_dir: bool) -> None:
        """Note what an event handled during the job is about (called by the engine for every event)."""
        for p in (src, dest):
            if not p:
                continue
            path = Path(p)
            if is_dir:
                self._trees.add(path)
                continue
            name = path.name
            folder = path.parent
            self._touched.add((folder, os.path.splitext(name)[0]))
            self._touched.add((folder, name))  # a work dir named by the event itself
            for stem in _any_subtitle_stems(name):
                self._touched.add((folder, stem))

    def touched(self, film: Path) -> bool:
        """Has an event handled during this job been about ``film`` (or a folder holding it)?"""
        if not self._touched and not self._trees:
            return False
        if (film.parent, os.path.splitext(film.name)[0]) in self._touched:
            return True
        return self._in_tree(film)

    def _in_tree(self, path: Path) -> bool:
        """Inside a folder a dir event was about (one set lookup per ancestor, however many events)."""
        return bool(self._trees) and (path in self._trees or any(p in self._trees for p in path.parents))

    def touched_work_dir(self, wd: Path) -> bool:
        if not self._touched and not self._trees:
            return False
        name = wd.name
        if is_work_dir_name(name) and (wd.parent, stem_of_work_dir(name)) in self._touched:
            return True
        return self._in_tree(wd)

    # ----------------------------------------------------------------- running
    def step(self, budget_s: float | None = SLICE_S) -> bool:
        """Run the job for about ``budget_s`` (to the end when None); True once it has finished."""
        deadline = None if budget_s is None else time.monotonic() + budget_s
        try:
            for _ in self._steps:
                if deadline is not None and time.monotonic() >= deadline:
                    return False
        except BaseException:
            self.summary = {"reason": self.reason, "error": True}
            raise
        return True

    def cancel(self) -> None:
        self._steps.close()

    def finish(self, summary: Summary) -> None:
        self.summary = summary
        for waiter in self.waiters:
            try:
                waiter(summary)
            except Exception as exc:  # a waiter's failure is its own
                log.error("rescan_waiter_failed", error=repr(exc))


def _any_subtitle_stems(name: str) -> list[str]:
    """Stems a file could be a subtitle of, whatever the configured extensions (marks may over-reach)."""
    ext = os.path.splitext(name)[1]
    return subtitle_stems(name, (ext.lower(),)) if ext else []


def _steps(rec: Reconciler, job: ReconcileJob, reason: str) -> Iterator[None]:
    """The rescan, yielding between units of work (a slice of a listing, a film)."""
    faults.point("rescan")
    t0 = time.monotonic()
    eng = rec.host
    reg = eng.reg
    reg.counters["rescans"] += 1
    found: dict[Path, tuple[LibraryConfig, dict[Path, tuple[Path, ...]]]] = {}  # root -> films and subtitles
    work_dirs: set[Path] = set()
    scanned_roots: set[Path] = set()
    unreadable: list[tuple[str, str]] = []
    known: dict[Path, Known] = {}  # what this scan learns of each root's names: the next scan's
    new_work_dirs: set[Path] = set()
    for lib in list(eng.libraries):
        res = ScanResult(lib.path, known=rec.known.get(lib.path),
                         learned=Known.fresh(lib.video_extensions, lib.subtitle_extensions))
        yield from iter_scan_root(lib.path, lib.video_extensions, lib.subtitle_extensions, res)
        root_state = reg.roots.setdefault(lib.path, RootState(lib.path, lib.watch))
        if res.missing:
            if root_state.state != RootStatus.MISSING:
                log.warning("root_missing", root=str(lib.path), detail=res.unreadable[0][1] if res.unreadable else "")
            rec.root_missing(lib.path)
            continue
        rec.root_scanned(root_state)
        scanned_roots.add(lib.path)
        if res.learned is not None:
            known[lib.path] = res.learned
        root_state.films = len(res.films)
        unreadable.extend((str(path), why) for path, why in res.unreadable)
        for loop in res.loops:
            if loop not in rec.loops_warned:
                rec.loops_warned.add(loop)
                log.warning("folder_loop", folder=str(loop),
                            detail="already scanned under another path (a bind mount of an ancestor?); skipped")
        found[lib.path] = (lib, res.films)
        work_dirs |= res.work_dirs
        new_work_dirs |= res.new_work_dirs
    rec.known = known
    reg.unreadable = unreadable
    # Finish migrations a crash interrupted before trusting any work dir. Journals are only ever written
    # by a migration, into a work dir at a new place: a work dir the last scan saw at this path with this
    # inode is not looked at again once looked at (one ``lstat`` less per film). ``rec.journaled`` holds
    # those still to look at (a rescan cut short) and those whose journal is not resumed yet.
    rec.journaled = (rec.journaled & work_dirs) | new_work_dirs
    rec.journaled -= {w for w in rec.journaled if not os.path.lexists(f"{w}/{JOURNAL_NAME}")}
    for wd in list(rec.journaled):
        yield
        try:
            rep = resume_migration(wd, within=lambda f: eng.library_for(f) is not None)
        except (LockBusy, MigrationError, OSError, ValueError) as exc:
            # A pipeline holds it, or the journal names paths that make no sense here: never fatal;
            # the work dir stays as it is (the next reconcile tries again).
            log.warning("migration_resume_failed", work_dir=str(wd), error=str(exc))
            reg.counters["errors"] += 1
            continue
        rec.journaled.discard(wd)
        if rep is not None:
            log.info("migration_resumed", film=rep.new_film, work_dir=rep.new_work_dir)
            work_dirs.discard(wd)
            work_dirs.add(Path(rep.new_work_dir))
    if reason == "startup":
        pending = list(work_dirs)
        for i in range(0, len(pending), BATCH):
            rec.sweep(set(pending[i : i + BATCH]))
            yield
    # Register what the scan found; a film an event touched meanwhile is looked at afresh.
    states: list[FilmState] = []
    for i, (lib, film, subs) in enumerate((lib, f, s) for lib, films in found.values() for f, s in films.items()):
        if i % BATCH == 0:
            yield
        if job.touched(film):
            if not os.path.lexists(film):
                continue  # gone since the scan: the event said so
            subs = subtitles_of(film, lib.subtitle_extensions)
        state = reg.films.get(film)
        if state is None:
            state = rec.intake.register(film, lib, subs)
            learned = known.get(lib.path)
            seen = learned.work_dirs.get(str(state.work_dir)) if learned is not None else None
            if learned is not None and seen is not None:
                # The next scan hands out the registry's own path: claims are then found by identity.
                learned.work_dirs[str(state.work_dir)] = (state.work_dir, seen[1])
        state.subtitles = subs
        states.append(state)
    # Films the scan did not find are gone, unless an event brought them in meanwhile.
    gone = [f for f, s in reg.films.items()
            if s.root in scanned_roots and f not in found[s.root][1] and not job.touched(f)]
    for i, film in enumerate(gone):
        if i % BATCH == 0:
            yield
        if film in reg.films:
            rec.intake.film_gone(film)
    # Same-stem twins: every registered film is now one the disk has (or an event just brought).
    conflicts = {wd: sorted(fs) for wd, fs in reg.by_work_dir.items() if len(fs) > 1}
    reg.conflicts = conflicts
    conflicted = {f for fs in conflicts.values() for f in fs}
    for state in reg.films.values():
        state.conflict = bool(conflicted) and state.film in conflicted
    orphaned = {wd for wd in work_dirs if not reg.claimants(wd)}
    if orphaned:
        homeless = [s for s in states if s.work_dir not in work_dirs and s.film not in conflicted]
        if homeless:
            yield
            rec.adopt_orphans(homeless, orphaned, work_dirs)
    # Judge each film, one per step; a film an event touched meanwhile gets its subtitles listed again.
    mounts = Mounts()
    quick = 0  # films found unchanged since the last yield: a few dozen microseconds each
    for state in states:
        if quick == 0 or quick >= QUICK_BATCH:
            quick = 0
            yield
        if reg.films.get(state.film) is not state:
            continue  # renamed or gone since: the event handled it
        if job.touched(state.film):
            lib = eng.library_for(state.film)
            if lib is None:
                continue
            state.subtitles = subtitles_of(state.film, lib.subtitle_extensions)
        quick = quick + 1 if rec.reconcile_film(state, t0, mounts) else 0
    yield
    orphans: dict[Path, float] = {}
    for wd in work_dirs | {w for w in reg.orphans if job.touched_work_dir(w)}:
        if reg.claimants(wd):
            continue
        if job.touched_work_dir(wd) and not os.path.lexists(wd):
            continue
        orphans[wd] = reg.orphans.get(wd, time.time())
    reg.orphans = orphans
    elapsed = time.monotonic() - t0
    summary = {
        "reason": reason,
        "films": sum(len(films) for _, films in found.values()),
        "orphans": len(reg.orphans),
        "conflicts": len(reg.conflicts),
        "duration_s": round(elapsed, 4),
    }
    log.info("reconciled", **summary)
    if eng.config.daemon.orphans == "reclaim":
        yield
        collect_orphans(reg, apply=True, min_age_days=eng.config.daemon.orphan_grace_days)
    job.summary = summary
