"""The ways tools and people change a film on disk, each done the way that tool really does it.

A replacement is only caught if the daemon sees the events (or the stat) that tool really produces:
``dd conv=notrunc``, ``open(..., "wb")``, coreutils ``cp`` and ``mv``, an atomic temp-then-rename,
Radarr's ``.partial`` rename, a hard-link swap, ``touch``, ``rsync -a``, a slow copy. Tests and the soak
pick them by name from :data:`REPLACEMENTS`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .films import film_bytes


def new_content(film: Path, seed: int = 1, size: int | None = None) -> bytes:
    """Different bytes for a film (same size by default: a size-only check would miss it)."""
    return film_bytes(size if size is not None else film.stat().st_size, seed)


def replace_in_place(film: Path, data: bytes | None = None) -> None:
    """Overwrite the bytes without truncating (``dd conv=notrunc``-style)."""
    data = data if data is not None else new_content(film)
    with open(film, "r+b") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def truncate_and_write(film: Path, data: bytes | None = None) -> None:
    """``open(film, "wb")`` then write: a moment of size 0, then the new content."""
    data = data if data is not None else new_content(film)
    with open(film, "wb") as f:
        f.flush()
        os.fsync(f.fileno())
        f.write(data)


def staging_dir(film: Path) -> Path:
    """A fresh folder for files to move in: same filesystem, outside the library root, assuming the
    harness layout ``<base>/<library>/<folder>/<film>`` (or ``<base>/<library>/<film>``)."""
    root = film.parents[1] if film.parent.parent.name else film.parent
    return Path(tempfile.mkdtemp(prefix="incoming-", dir=root.parent))


def cp_over(film: Path, data: bytes | None = None) -> None:
    """``cp new film``: the real coreutils cp writing over the existing file (truncate and copy)."""
    src = staging_dir(film) / "new.bin"
    src.write_bytes(data if data is not None else new_content(film))
    subprocess.run(["cp", str(src), str(film)], check=True, timeout=30)


def mv_over_from_partial(film: Path, data: bytes | None = None) -> None:
    """Radarr's upgrade: the new file is written as ``<name>.partial`` beside the film, then renamed over."""
    part = film.with_name(film.name + ".partial")
    part.write_bytes(data if data is not None else new_content(film))
    subprocess.run(["mv", "-f", str(part), str(film)], check=True, timeout=30)


def mv_over_from_elsewhere(film: Path, data: bytes | None = None) -> None:
    """A download client finished elsewhere on the same filesystem; the file is moved over the film."""
    src = staging_dir(film) / film.name
    src.write_bytes(data if data is not None else new_content(film))
    subprocess.run(["mv", "-f", str(src), str(film)], check=True, timeout=30)


def temp_then_rename(film: Path, data: bytes | None = None) -> None:
    """An atomic writer: mkstemp in the same folder (hidden name), write, fsync, ``os.replace``."""
    fd, tmp = tempfile.mkstemp(dir=film.parent, prefix=f".{film.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data if data is not None else new_content(film))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, film)


def hardlink_swap(film: Path, data: bytes | None = None) -> None:
    """``ln new tmp && mv tmp film``: a file that already exists elsewhere is linked in, then renamed over."""
    src = staging_dir(film) / "seeded.bin"
    src.write_bytes(data if data is not None else new_content(film))
    tmp = film.with_name(film.name + ".tmp")
    subprocess.run(["ln", str(src), str(tmp)], check=True, timeout=30)
    subprocess.run(["mv", "-f", str(tmp), str(film)], check=True, timeout=30)


def touch(film: Path) -> None:
    """``touch film``: only the mtime moves, which upstream's cache check treats as a new film."""
    subprocess.run(["touch", str(film)], check=True, timeout=30)


def rsync_over(film: Path, data: bytes | None = None) -> None:
    """``rsync -a`` from a sender copy: hidden temp ``.name.XXXXXX``, mtime set to the sender's, rename.

    Runs the real rsync when installed; otherwise performs exactly those steps.
    """
    src = staging_dir(film) / film.name
    src.write_bytes(data if data is not None else new_content(film))
    sender_mtime = time.time() - 3600.0  # rsync -a preserves the sender's (older) mtime
    os.utime(src, (sender_mtime, sender_mtime))
    rsync = shutil.which("rsync")
    if rsync is not None:
        subprocess.run([rsync, "-a", "--whole-file", str(src), str(film)], check=True, timeout=30)
        return
    fd, tmp = tempfile.mkstemp(dir=film.parent, prefix=f".{film.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(src.read_bytes())
    os.utime(tmp, (sender_mtime, sender_mtime))
    os.rename(tmp, film)


REPLACEMENTS: dict[str, Callable[[Path], None]] = {
    "in_place": replace_in_place,
    "truncate_write": truncate_and_write,
    "cp_over": cp_over,
    "mv_partial": mv_over_from_partial,
    "mv_elsewhere": mv_over_from_elsewhere,
    "temp_rename": temp_then_rename,
    "hardlink_swap": hardlink_swap,
    "touch": touch,
    "rsync": rsync_over,
}


def slow_copy(
    dest: Path, size: int, *, chunk: int = 64 * 1024, seed: int = 7, pause: float = 0.0,
    stop: threading.Event | None = None,
) -> int:
    """Write ``size`` bytes over ``dest`` in ``chunk`` pieces with a flush after each (and ``pause``
    seconds between them), like a copy from a slow source; returns the number of writes. ``stop`` ends
    the copy early."""
    block = film_bytes(chunk, seed)
    writes = 0
    with open(dest, "wb") as f:
        for _ in range(0, size, chunk):
            if stop is not None and stop.is_set():
                break
            f.write(block)
            f.flush()
            writes += 1
            if pause:
                time.sleep(pause)
    return writes
