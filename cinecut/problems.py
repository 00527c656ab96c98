"""What stopped an invalidation from doing its whole job, and the fallback when the checkpoint is unreadable.

Every error an invalidation meets (a permission, an I/O error, a refused symlink) becomes a
:class:`Problem` with the path and errno, so the daemon can log it at warning level, count it and show the
film as blocked until a retry finds it gone. Nothing here is silent.

The worst case is a checkpoint we cannot read: upstream writes it 0600 and its owner reads it, so its
stages stay "complete" over a film we know changed, and upstream's next run resumes on the old film's
proxy and keyframes (it only checks that the stage is named complete; it opens ``proxy_path`` without
looking, reuses ``keyframe_timestamps.json`` if present and extracts only missing frames). What still works
without reading it:

1. rename it aside to ``pipeline_checkpoint.stale.json`` (a directory write, no read needed): upstream
   finds no checkpoint and starts fresh (its proxy step reuses a still-valid proxy, so a subtitle-only
   change costs no re-encode); the old file stays for the user to look at;
2. if even that is refused, delete the artifacts of every stale stage anyway: with the proxy, the frames
   and the timestamps gone, upstream's resume of "keyframes" fails with an error instead of reusing the
   old film's frames; stale stages whose only artifact is the checkpoint itself (structural anchors) stay
   stale, and the film is reported blocked with the remedy.
"""

from __future__ import annotations

import errno as errno_mod
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from cinecut import safefs
from cinecut.workdir import CHECKPOINT_NAME

if TYPE_CHECKING:
    from cinecut.stages import InvalidationReport, Stage
    from cinecut.workdir import WorkDir

#: Where an unreadable checkpoint goes so that upstream starts fresh (upstream never reads this name).
STALE_CHECKPOINT_NAME: Final = "pipeline_checkpoint.stale.json"

_ACCESS = frozenset({errno_mod.EACCES, errno_mod.EPERM})


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing that could not be done: ``path`` (absolute), ``errno`` (None for a refusal by rule), why."""

    path: str
    errno: int | None
    reason: str
    action: str = ""  # what was done instead, if anything

    @classmethod
    def from_exc(cls, path: str, exc: OSError, action: str = "") -> Problem:
        return cls(path, exc.errno, exc.strerror or str(exc), action)

    @property
    def errno_name(self) -> str:
        return errno_mod.errorcode.get(self.errno, str(self.errno)) if self.errno is not None else ""

    @property
    def is_access(self) -> bool:
        return self.errno in _ACCESS or self.errno == errno_mod.EROFS

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "errno": self.errno_name or None, "reason": self.reason,
                "action": self.action or None}

    def summary(self) -> str:
        code = f" ({self.errno_name})" if self.errno is not None else ""
        return f"{self.path}: {self.reason}{code}"


def unreadable_checkpoint_errno(dir_fd: int) -> int | None:
    """The errno of opening the checkpoint when it exists but cannot be opened (None: readable or absent)."""
    try:
        fd = safefs.open_regular(dir_fd, CHECKPOINT_NAME)
    except FileNotFoundError:
        return None
    except safefs.SymlinkRefused:
        return None  # a planted link: reported by the reader, and upstream's own rename drops it
    except OSError as exc:
        return exc.errno
    os.close(fd)
    return None


def neutralize_unreadable_checkpoint(
    dir_fd: int, wd: WorkDir, stages: list[Stage], report: InvalidationReport, err: int, verb: str = "read"
) -> list[Stage]:
    """The checkpoint exists but cannot be read (or rewritten: ``verb``) for ``err``: make upstream unable
    to resume its stale stages. Returns the stages whose artifacts must now be removed (all of ``stages``).
    """
    src = str(wd.path / CHECKPOINT_NAME)
    why = os.strerror(err)
    try:
        os.rename(CHECKPOINT_NAME, STALE_CHECKPOINT_NAME, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        safefs.fsync_dir(dir_fd)
    except OSError as exc:
        report.problems.append(Problem(
            src, err, f"cannot {verb} the checkpoint ({why}) nor move it aside ({exc.strerror or exc}): "
            "its stale stages stay marked complete", "deleted the stale stages' files so upstream cannot "
            "reuse them"))
        report.errors.append(f"{CHECKPOINT_NAME}: {why}; could not move it aside: {exc.strerror or exc}")
    else:
        report.problems.append(Problem(
            src, err, f"cannot {verb} the checkpoint ({why})",
            f"moved it aside to {STALE_CHECKPOINT_NAME}: upstream starts fresh"))
        report.checkpoint = "moved-aside"
        report.stages_reset = [s.name for s in stages if s.recorded]
    return stages


__all__ = ["STALE_CHECKPOINT_NAME", "Problem", "neutralize_unreadable_checkpoint", "unreadable_checkpoint_errno"]
