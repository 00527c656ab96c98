"""Judging a film: revalidate it, defer it behind a pipeline's lock and retry, apply the verdict.

The one owner of revalidation in the daemon: events, moves, rescans and pre-warm runs all ask
:meth:`Judge.revalidate`. A film whose work dir is locked is deferred and retried on a timer; a film whose
invalidation met errors is blocked (``cinecutd.health``) and retried with backoff. Each judgement after a
change is announced once on the bus (:class:`cinecutd.states.FilmJudged`).
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
from cinecut.locks import LockBusy, is_work_dir_locked
from cinecut.ownership import Owner, judge, read_evidence
from cinecut.problems import Problem
from cinecut.revalidate import Revalidation, revalidate
from cinecut.stages import Input, invalidate
from cinecut.stamp import SourceStamp
from cinecut.stamps import InputStamps
from cinecut.workdir import WorkDir
from cinecutd.config import Config
from cinecutd.health import Health, access_problems, older_than_film, remedy
from cinecutd.queries import cache_validity
from cinecutd.registry import FilmState, Registry
from cinecutd.states import Bus, Deferral, FilmJudged, Trigger
from cinecutd.tallies import Tallies

if TYPE_CHECKING:
    from cinecutd.moves import Moves

log = structlog.get_logger("cinecutd")

PENDING_RETRY_S = 0.25


class JudgeHost(Protocol):
    """What the judge needs of the engine: state and a timer."""

    reg: Registry
    config: Config
    health: Health
    tallies: Tallies
    bus: Bus

    def later(self, due: float, fn: Callable[[], None]) -> None: ...


class Lifecycle(Protocol):
    """The two lifecycle steps a judgement may trigger (:class:`cinecutd.intake.Intake` keeps them)."""

    def film_gone(self, film: Path) -> None: ...
    def recheck_subtitles_later(self, film: Path) -> None: ...


def note_verification(state: FilmState, verification: Verification | None, stamps: InputStamps | None,
                      unrecorded: bool) -> None:
    """Remember what proves a film's stages, and the first stamps seen of a work dir with no sidecar of
    ours: held in memory only (nothing is written into a work dir nothing changed), and used only to
    notice a subtitle that changes or vanishes later, never to certify a stage."""
    state.verification = verification
    if verification == Verification.RECORDED or verification is None:
        state.baseline = None
    elif unrecorded and stamps is not None and stamps.video is not None:
        if state.baseline is None or verification == Verification.NOTHING:  # no stage yet: nothing to compare
            state.baseline = stamps


def owns_work_dir(state: FilmState) -> bool:
    """For same-stem conflicts: the film the work dir's checkpoint or cache names is its owner."""
    # An unreadable checkpoint names nobody; realpaths compared (upstream records the film's realpath).
    return judge(read_evidence(state.work_dir, state.film.stem), state.film) is Owner.MINE


def _where(exc: OSError, wd: WorkDir) -> str:
    where = os.fsdecode(exc.filename) if exc.filename else str(wd.path)
    return where if os.path.isabs(where) else str(wd.path / where)


class Judge:
    """Revalidates films, defers them behind locks, retries, and records what blocks them."""

    def __init__(self, host: JudgeHost) -> None:
        self.host = host
        self.moves: Moves | None = None  # set by the engine: a film whose move is pending is not judged yet
        self.intake: Lifecycle | None = None  # set by the engine: films gone, subtitles looked at later
        self._pending: set[Path] = set()  # films with a retry timer set

    @property
    def _lifecycle(self) -> Lifecycle:
        assert self.intake is not None, "the engine wires the intake in"
        return self.intake

    # ----------------------------------------------------------------- revalidation
    def revalidate(self, state: FilmState, t0: float, trigger: str, *, announce: bool = True) -> Revalidation | None:
        """Judge ``state`` now. ``announce``: publish ``FilmJudged`` if anything changed (the settle step
        announces once itself, changed or not)."""
        if self.moves is not None and self.moves.holds(state.film):
            return None  # its work dir has not followed it yet; judged once the move is done
        if state.conflict and not owns_work_dir(state):
            self._drop_deferral(state, "its work dir holds a same-stem twin's results")
            return None
        reg = self.host.reg
        reg.counters["revalidations"] += 1
        try:
            res = revalidate(state.film, state.subtitles, baseline=state.baseline)
        except LockBusy as exc:
            self.defer(state, trigger, exc)
            return None
        except (OSError, ValueError) as exc:  # ValueError: e.g. a name that cannot be encoded; never fatal
            log.error("revalidation_failed", film=str(state.film), error=str(exc))
            reg.counters["errors"] += 1
            if isinstance(exc, OSError):
                wd = state.wd or WorkDir.for_film(state.film)
                where = _where(exc, wd)
                failed = Problem.from_exc(where, exc, "revalidation failed; nothing changed")
                self.set_problems(state, [failed, *(p for p in access_problems(wd) if p.path != where)])
            return None
        if state.pending is not None:
            log.info("pending_applied", film=str(state.film), reason=state.pending.trigger)
            self._pending.discard(state.film)
        state.pending = None
        changed = self._apply(state, res, t0, trigger)
        # Inside a burst (its settle step pending) the change is announced once, when the burst is quiet.
        if changed and announce and state.settle_due is None:
            self.host.bus.publish(FilmJudged(state, trigger, True))
        return res

    def defer(self, state: FilmState, trigger: str, exc: LockBusy) -> None:
        """A pipeline holds the work dir: remember why, and look again shortly."""
        if state.pending is None:
            state.pending = Deferral(trigger, time.time())
            self.host.reg.counters["deferred"] += 1
            who = exc.holder or {}
            log.info("deferred", film=str(state.film), reason="work dir locked by a pipeline", holder=who.get("purpose"))
        if state.film not in self._pending:
            self._retry_later(state.film)

    def _retry_later(self, film: Path) -> None:
        self._pending.add(film)
        self.host.later(time.monotonic() + PENDING_RETRY_S, partial(self.retry_pending, film))

    def _drop_deferral(self, state: FilmState, why: str) -> None:
        """A deferred judgement the film can no longer make: it waits no more."""
        if state.pending is not None:
            log.info("pending_dropped", film=str(state.film), reason=state.pending.trigger, why=why)
            state.pending = None
            self._pending.discard(state.film)

    def retry_pending(self, film: Path) -> None:
        """A deferred film's retry. Whatever the retry decides, a film still deferred afterwards has a retry
        of its own (a decision that declined without deferring again must not leave it waiting for ever)."""
        self._pending.discard(film)
        self._retry_pending(film)
        state = self.host.reg.films.get(film)
        if state is not None and state.pending is not None and film not in self._pending:
            self._retry_later(film)

    def _retry_pending(self, film: Path) -> None:
        from cinecutd.moves import Resume

        state = self.host.reg.films.get(film)
        moves = self.moves
        if state is None or state.pending is None:
            if moves is not None:
                moves.forget(film)
            return
        verdict = moves.resume(state) if moves is not None else Resume.GO
        if verdict is Resume.HELD:
            return  # deferred once more, with its own retry
        if verdict is Resume.WAIT or is_work_dir_locked(state.work_dir):
            self._retry_later(film)
            return
        now = time.monotonic()
        if moves is not None and moves.after_unlock(state, now):
            return
        self.revalidate(state, now, state.pending.trigger)

    def final_revalidation(self, state: FilmState) -> None:
        """After a burst went quiet: one last look, so the final state of the film is what counts."""
        try:
            st = os.stat(state.film)
        except OSError:
            self._lifecycle.film_gone(state.film)
            return
        state.stamp, state.inode, state.device = SourceStamp.from_stat(st), st.st_ino, st.st_dev
        changed = False
        if any(not os.path.lexists(sub) for sub in state.subtitles):
            # A sidecar listed for it is gone: most often half of a rename under way (Radarr renames the
            # subtitles first, then the film), whose events may still be on their way through the watcher.
            # Judged now, the gap would read as a deleted subtitle and wipe valid results; judged once things
            # are quiet, as any subtitle deletion is.
            self._lifecycle.recheck_subtitles_later(state.film)
        else:
            res = self.revalidate(state, time.monotonic(), Trigger.SETTLED, announce=False)
            changed = res is not None and res.report is not None and res.report.changed_anything
        self.host.bus.publish(FilmJudged(state, Trigger.SETTLED, changed))

    def _apply(self, state: FilmState, res: Revalidation, t0: float, trigger: str) -> bool:
        """Record the verdict on the film; True if it reset anything."""
        state.has_work_dir = res.exists
        note_verification(state, res.verification, res.stamps, res.report is None and res.exists)
        state.refused = res.refused
        if res.refused:
            log.warning("refused", film=str(state.film), reason=res.refused)
        wd = state.wd or WorkDir.for_film(state.film)
        state.cache = cache_validity(res.cache, state.stamp, work_dir_exists=res.exists, cache_path=wd.cache_path)
        self._check_health(state, res, trigger)
        rep = res.report
        if rep is None or not rep.changed_anything:
            return False
        latency = (time.monotonic() - t0) * 1000
        state.stale_fixed += 1
        c = self.host.reg.counters
        c["invalidations"] += 1
        c["bytes_reclaimed"] += rep.bytes_reclaimed
        self.host.tallies.invalidation_latency.observe(latency / 1000)
        self.host.reg.recent.appendleft({
            "film": str(state.film),
            "reason": rep.reason,
            "trigger": str(trigger),
            "stages": rep.stages_reset,
            "files_removed": len(rep.files_removed),
            "bytes_reclaimed": rep.bytes_reclaimed,
            "salvaged": rep.salvaged,
            "latency_ms": round(latency, 3),
            "at": time.time(),
        })
        log.info(
            "invalidated",
            film=str(state.film),
            reason=rep.reason,
            trigger=str(trigger),
            stages=rep.stages_reset,
            fields=rep.fields_nulled,
            files_removed=len(rep.files_removed),
            bytes_reclaimed=rep.bytes_reclaimed,
            refused=rep.refused or None,
            problems=len(rep.problems) or None,  # each one is also a "blocked" warning with path and errno
            salvaged=f"salvaged {rep.salvaged} of {rep.salvaged_of} frames" if rep.salvaged else None,
            salvage_error=rep.salvage_error,
            latency_ms=round(latency, 3),
        )
        return True

    # ----------------------------------------------------------------- blocked films
    def _check_health(self, state: FilmState, res: Revalidation, trigger: str) -> None:
        """Collect what kept this revalidation from doing its whole job, and what keeps the next one from it.

        With the checkpoint unreadable (upstream's 0600 file under another owner) the revalidation has no
        witness; a proxy or cache older than the film is then enough to invalidate, which makes upstream
        unable to resume the stale stages (``cinecut.problems``).
        """
        health = self.host.health
        blocked = health.get(state.film)
        if blocked is not None and blocked.pending:
            done = res.report is not None and not res.report.errors and set(blocked.pending) <= set(res.report.changed)
            # A fresh look finds nothing after a half-done invalidation (its stages are reset already), so
            # the film stays blocked until the invalidation itself went through.
            if not done and not self._reapply(state, blocked.pending):
                return
        problems = list(res.report.problems) if res.report is not None else []
        if res.refused:
            problems.append(Problem(res.work_dir, None, f"work dir refused: {res.refused}"))
        if res.exists and res.film_present and not res.refused:
            wd = state.wd or WorkDir.for_film(state.film)
            access = access_problems(wd)
            if res.report is None and state.stamp is not None and any(
                p.path == str(wd.checkpoint_path) for p in access
            ):
                older = older_than_film(wd, state.stamp.mtime)
                if older is not None:
                    try:
                        res.report = invalidate(wd, [Input.VIDEO], reason=f"checkpoint unreadable and {older} "
                                                "is older than the film")
                    except LockBusy as exc:
                        self.defer(state, trigger, exc)
                    except OSError as exc:  # not even the lock can be taken: reported, retried
                        problems.append(Problem.from_exc(_where(exc, wd), exc,
                                                         "the film changed; nothing could be reset"))
                    else:
                        problems += res.report.problems
                        access = access_problems(wd)
            seen = {p.path for p in problems}
            problems += [p for p in access if p.path not in seen]
        self.set_problems(state, problems)
        blocked = health.get(state.film)
        if blocked is not None and res.report is not None and res.report.errors:
            blocked.pending = sorted(set(blocked.pending) | set(res.report.changed))

    def set_problems(self, state: FilmState, problems: list[Problem]) -> None:
        """Record a film's current problems: each new one is logged once at warning level and counted."""
        health = self.host.health
        was_blocked = state.film in health.blocked
        new, resolved = health.update(state.film, problems)
        for p in new:
            self.host.reg.counters["problems"] += 1
            log.warning("blocked", film=str(state.film), path=p.path, errno=p.errno_name or None, reason=p.reason,
                        action=p.action or None, remedy=remedy(p))
        if resolved:
            log.info("unblocked", film=str(state.film))
        elif problems and not was_blocked:
            film = state.film
            self.host.later(time.monotonic() + (health.next_retry(film) or 1.0), partial(self.retry_blocked, film))

    def retry_blocked(self, film: Path) -> None:
        health = self.host.health
        state = self.host.reg.films.get(film)
        if state is None:
            health.forget(film)
            return
        if film not in health.blocked:
            return
        self.revalidate(state, time.monotonic(), Trigger.RETRY)  # re-applies a half-done invalidation first
        delay = health.next_retry(film)
        if delay is not None:
            self.host.later(time.monotonic() + delay, partial(self.retry_blocked, film))

    def _reapply(self, state: FilmState, inputs: list[str]) -> bool:
        """Apply again an invalidation that met errors; True once it went through without any."""
        wd = state.wd or WorkDir.for_film(state.film)
        try:
            rep = invalidate(wd, inputs, reason="retry of an invalidation that met errors")
        except LockBusy:
            return False  # a pipeline holds the work dir: the next retry
        except OSError as exc:
            where = _where(exc, wd)
            self.set_problems(state, [Problem.from_exc(where, exc, "retry failed; nothing changed"),
                                      *(p for p in access_problems(wd) if p.path != where)])
            return False
        if rep.errors:
            seen = {p.path for p in rep.problems}
            self.set_problems(state, [*rep.problems, *(p for p in access_problems(wd) if p.path not in seen)])
            return False
        blocked = self.host.health.get(state.film)
        if blocked is not None:
            blocked.pending = []
        if rep.changed_anything:
            self.host.reg.counters["invalidations"] += 1
            self.host.reg.counters["bytes_reclaimed"] += rep.bytes_reclaimed
            log.info("invalidated", film=str(state.film), reason=rep.reason, trigger=Trigger.RETRY,
                     stages=rep.stages_reset, files_removed=len(rep.files_removed),
                     bytes_reclaimed=rep.bytes_reclaimed)
        return True


__all__ = ["PENDING_RETRY_S", "Judge", "JudgeHost", "note_verification", "owns_work_dir"]
