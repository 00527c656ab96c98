"""The keyframe stage's files in a work dir: the stored timestamps, the JPEGs of the plan, a plan's cap.

Everything goes through the work dir's descriptor (:mod:`cinecut.safefs`): ``keyframes/`` swapped for a
symlink is refused, and a JPEG that turns out to be a symlink is left alone.
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Sequence
from typing import Final

from cinecut import safefs
from cinecut.inference.partial import PlanEntry
from cinecut.pipeline_errors import WorkDirError
from cinecut.workdir import KEYFRAME_RE, KEYFRAMES_DIR_NAME, TIMESTAMPS_NAME, WorkDir

MAX_TIMESTAMPS_BYTES: Final = 16 << 20


def cap_plan(plan: Sequence[PlanEntry], limit: int | None) -> list[PlanEntry]:
    """At most ``limit`` entries, spread evenly over the plan (first and last kept)."""
    if limit is None or len(plan) <= limit:
        return list(plan)
    if limit == 1:
        return [plan[len(plan) // 2]]
    picks = sorted({round(i * (len(plan) - 1) / (limit - 1)) for i in range(limit)})
    return [plan[i] for i in picks]


def stored_timestamps_at(fd: int) -> list[float] | None:
    """``keyframe_timestamps.json`` as a list of finite numbers; None if absent, too big or malformed."""
    try:
        data = json.loads(safefs.read_bounded(fd, TIMESTAMPS_NAME, MAX_TIMESTAMPS_BYTES))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(data, list) or not all(
        isinstance(t, int | float) and not isinstance(t, bool) and math.isfinite(t) for t in data
    ):
        return None
    return [float(t) for t in data]


def check_keyframes_dir_at(fd: int, wd: WorkDir) -> None:
    """WorkDirError if ``keyframes/`` exists and is not a real directory."""
    st = safefs.lstat_in(fd, KEYFRAMES_DIR_NAME)
    if st is not None and not stat.S_ISDIR(st.st_mode):
        raise WorkDirError(f"{wd.keyframes_dir} is not a directory (a symlink?); refusing to use it")


def prune_keyframes_at(fd: int, keep: set[str]) -> None:
    """Remove JPEGs of an older plan, so ``keyframes/`` holds exactly the plan's frames."""
    kfd = safefs.open_subdir(fd, KEYFRAMES_DIR_NAME)
    try:
        for entry in os.scandir(kfd):
            if KEYFRAME_RE.match(entry.name) and entry.name not in keep:
                try:
                    safefs.unlink_regular(kfd, entry.name)
                except OSError:
                    pass  # a symlink or a race: not ours to touch, and harmless
    finally:
        os.close(kfd)
