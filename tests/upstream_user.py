"""Run upstream CineCut's own file writing as another user, the way a library owner runs it.

Upstream's writers (``tests/upstream_reader.py``: ``tempfile.mkstemp`` + ``os.replace`` for the checkpoint
and the cache, plain ``mkdir``/``write_text`` for the rest) run in a forked child that has switched to
``uid``/``gid`` with the usual umask 022: the checkpoint and the cache come out 0600, the directories 0755,
all owned by that user. Root only (switching users needs it).
"""

from __future__ import annotations

import os
import pickle
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

#: A uid/gid no account on a test box uses: "a library owner" that is neither root nor the service.
OTHER_UID = 4321
OTHER_GID = 4321


def run_as(uid: int, gid: int, fn: Callable[..., T], *args: Any, umask: int = 0o022) -> T:
    """``fn(*args)`` in a child running as ``uid``:``gid`` (no supplementary groups); its result or its
    exception comes back (the exception as an AssertionError carrying the child's traceback)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            os.umask(umask)
            payload = pickle.dumps(("ok", fn(*args)))
        except BaseException:  # everything goes back to the parent
            payload = pickle.dumps(("error", traceback.format_exc()))
        with os.fdopen(w, "wb") as f:
            f.write(payload)
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    kind, value = pickle.loads(data)
    if kind != "ok":
        raise AssertionError(f"as uid {uid}: {value}")
    return value


def chown_tree(path: os.PathLike[str] | str, uid: int, gid: int) -> None:
    """Give a library folder to its owner (so that owner's CineCut can create work dirs in it)."""
    for root, dirs, files in os.walk(path):
        os.chown(root, uid, gid)
        for name in dirs + files:
            os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)


def upstream_resume_reuses(work_dir: os.PathLike[str] | str) -> list[str]:
    """What upstream's next run would take from this work dir without recomputing it (its cli.py resume):
    with ``proxy`` complete it uses ``proxy_path`` unchecked; with ``keyframes`` complete it reuses
    ``keyframe_timestamps.json`` and extracts only frames that are missing. Run as the work dir's owner
    (upstream lets a PermissionError escape). Empty when nothing of the old film can be reused."""
    from pathlib import Path

    import upstream_reader

    wd = Path(work_dir)
    ckpt = upstream_reader.load_checkpoint(wd)
    if ckpt is None:
        return []
    out = []
    if "proxy" in ckpt.stages_complete and ckpt.proxy_path and Path(ckpt.proxy_path).exists():
        out.append("proxy")
    if "keyframes" in ckpt.stages_complete:
        if (wd / "keyframe_timestamps.json").exists():
            out.append("keyframe_timestamps.json")
        if any((wd / "keyframes").glob("frame_*.jpg")):
            out.append("keyframes")
    return out
