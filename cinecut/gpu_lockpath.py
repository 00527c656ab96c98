"""Where the GPU lock lives, and creating its directory safely; the daemon and the CLI must agree on it."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Final

from cinecut.pipeline_errors import WorkDirError

GPU_LOCK_NAME: Final = "gpu.lock"
SYSTEM_GPU_LOCK_DIR: Final = Path("/run/cinecut")


def default_gpu_lock_path(
    *,
    system_dir: Path = SYSTEM_GPU_LOCK_DIR,
    environ: dict[str, str] | None = None,
    tmp_root: Path = Path("/tmp"),
) -> Path:
    """Where the GPU lock lives when none is configured; the daemon and the CLI must agree on it.

    ``/run/cinecut/gpu.lock`` when that directory exists and is writable (the packaged service creates
    it for the ``cinecut`` group), else ``$XDG_RUNTIME_DIR/cinecut/gpu.lock``, else
    ``/tmp/cinecut-$UID/gpu.lock``.
    """
    system_lock = system_dir / GPU_LOCK_NAME
    if system_lock.is_file() or (system_dir.is_dir() and os.access(system_dir, os.W_OK | os.X_OK)):
        # A group member may lock the daemon's existing lock file without write access to the dir.
        return system_lock
    env = os.environ if environ is None else environ
    xdg = env.get("XDG_RUNTIME_DIR", "")
    if xdg and os.path.isabs(xdg) and os.path.isdir(xdg) and os.access(xdg, os.W_OK | os.X_OK):
        return Path(xdg) / "cinecut" / GPU_LOCK_NAME
    return tmp_root / f"cinecut-{os.getuid()}" / GPU_LOCK_NAME


def prepare_lock_dir(lock_path: Path) -> None:
    """Create the GPU lock's directory; refuse one another user controls inside a shared sticky dir.

    In ``/tmp`` anyone can create ``cinecut-$UID`` first; a lock there would let them block or fake
    our GPU lock, so such a directory must be a real directory owned by us.
    """
    d = lock_path.parent
    parent = d.parent
    try:
        pst = os.stat(parent)
    except OSError as exc:
        raise WorkDirError(f"GPU lock directory {parent}: {exc.strerror or exc}") from exc
    shared = bool(pst.st_mode & stat.S_ISVTX) and bool(pst.st_mode & stat.S_IWOTH)
    try:
        os.mkdir(d, 0o700 if shared else 0o755)
    except FileExistsError:
        pass
    except OSError as exc:
        raise WorkDirError(f"cannot create the GPU lock directory {d}: {exc.strerror or exc}") from exc
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode) or (shared and st.st_uid != os.getuid()):
        raise WorkDirError(
            f"GPU lock directory {d} is not a directory owned by uid {os.getuid()}; "
            "remove it or pass --gpu-lock"
        )
