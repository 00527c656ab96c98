"""The memo of a film's last judgement: what a warm rescan may skip, and the proof that it may.

A rescan judges every film: it reads the stamps sidecar and the cache header, maybe the checkpoint, and
checks that the work dir can be read and written. Most films have not changed since the last look. The
registry is a cache of the filesystem, so it remembers, per film, the stat identity (``st_dev``,
``st_ino``, ``st_size``, ``st_mtime_ns``, ``st_ctime_ns``) of every input its last judgement read (the
film; the work dir and its checkpoint, cache, sidecar and, where it was a witness, proxy; each subtitle)
and skips the next judgement while every one of them is the same. Anything that writes, truncates,
replaces, renames, creates, deletes, chmods or chowns a file changes its ``st_ctime`` (which no program
can set), its inode or its presence; a few ``stat`` calls cost less than reading one file.

What keeps the memo faithful:

* the stats are taken *before* the judgement reads anything, so a change made while it reads shows as a
  difference at the next rescan;
* a judgement with an input changed within ``RACY_S`` of it is not remembered: timestamps are only as
  fine as the filesystem's clock tick, and a second write in the tick of the one read could leave every
  field equal (git's "racily clean" entries);
* a memo is trusted for ``TTL_S`` at most: on a filesystem that does not keep ``st_ctime`` (some FUSE
  mounts report the mtime), an in-place rewrite that restored the mtime is still found, within the hour;
* only a judgement that found nothing to do is remembered, and the inputs that are not files (the
  subtitle list, the in-memory baseline, a read-only remount of the work dir's filesystem) are compared
  too; a judgement that had to look beyond these files (a recorded subtitle searched for in the folder)
  is not remembered.

A file absent at the judgement is not looked for again by name: an entry created in (or renamed into) a
folder changes the folder's mtime and ctime, so the work dir's own identity covers it (and saves the
failed ``lstat`` a work dir without our sidecar would cost at every rescan).

Memory: the stats are packed into one ``bytes`` per film (40 bytes a file); the path strings are the ones
the film's path objects already hold.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from cinecut.workdir import CACHE_SUFFIX, CHECKPOINT_NAME, PROXY_SUFFIX, STAMPS_NAME, WORK_DIR_SUFFIX

if TYPE_CHECKING:
    from cinecut.stamps import InputStamps
    from cinecutd.registry import FilmState

#: Inputs changed this recently (seconds, wall clock) are not remembered: a later write in the same
#: timestamp tick could be invisible. Generous for a NAS whose clock differs a little from ours.
RACY_S: float = 2.0
#: The longest a memo is trusted (seconds): the net under a filesystem that does not keep ``st_ctime``.
TTL_S: float = 3600.0

_ONE: Final = struct.Struct("=QQqqq")
_ABSENT: Final = b"\0" * _ONE.size
_CUT: Final = len(WORK_DIR_SUFFIX)


class _Unstable(Exception):
    """An input could not be stat'ed (other than absent): nothing to remember, nothing to trust."""


def _stat(path: str, pack: Callable[..., bytes] = _ONE.pack) -> bytes:
    """A subtitle is read through symlinks (as the judgement stamps it)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return _ABSENT
    except OSError as exc:
        raise _Unstable from exc
    return pack(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class Mounts:
    """Whether a filesystem is mounted read-only, asked once per device per rescan (a remount changes
    what a work dir's access check finds without changing any file)."""

    def __init__(self) -> None:
        self._ro: dict[int, bytes] = {}

    def readonly(self, dev: int, path: str) -> bytes:
        ro = self._ro.get(dev)
        if ro is None:
            try:
                ro = b"\1" if os.statvfs(path).f_flag & os.ST_RDONLY else b"\0"
            except OSError:
                ro = b"?"  # unknown: never equal to a memo taken when it was known
            self._ro[dev] = ro
        return ro


def _current(st: os.stat_result, work_dir: str, subtitles: tuple[str, ...], mounts: Mounts,
             with_proxy: bool, was: bytes | None = None, pack: Callable[..., bytes] = _ONE.pack) -> bytes:
    """Film, work dir, its files (checkpoint, cache, sidecar, maybe proxy), the subtitles: 40 bytes
    each; then, with a work dir, its filesystem's read-only flag (one byte). The hot path of a rescan.

    ``was``: the memo's identities. A file absent then is not looked for again while the work dir's own
    identity holds: an entry created in (or renamed into) a folder changes the folder's mtime and ctime."""
    ids = pack(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    try:
        w = os.lstat(work_dir)
    except FileNotFoundError:
        ids += _ABSENT
        for sub in subtitles:
            ids += _stat(sub)
        return ids
    except OSError as exc:
        raise _Unstable from exc
    ids += pack(w.st_dev, w.st_ino, w.st_size, w.st_mtime_ns, w.st_ctime_ns)
    base = work_dir + "/"
    stem = base + work_dir[work_dir.rfind("/") + 1 : -_CUT]
    files = (base + CHECKPOINT_NAME, stem + CACHE_SUFFIX, base + STAMPS_NAME)
    n = _ONE.size
    for k, path in enumerate((*files, stem + PROXY_SUFFIX) if with_proxy else files, 2):
        if was is not None and was[k * n : (k + 1) * n] == _ABSENT:
            ids += _ABSENT  # compared through the work dir's identity (the second entry)
            continue
        try:
            f = os.lstat(path)
        except FileNotFoundError:
            ids += _ABSENT
            continue
        except OSError as exc:
            raise _Unstable from exc
        ids += pack(f.st_dev, f.st_ino, f.st_size, f.st_mtime_ns, f.st_ctime_ns)
    for sub in subtitles:
        ids += _stat(sub)
    return ids + mounts.readonly(w.st_dev, work_dir)


@dataclass(slots=True)
class Judged:
    """The stat identity of a film's inputs, taken before a judgement read them; kept on the film's state
    (:func:`remember`) when the judgement found nothing to do, and trusted while nothing moves."""

    ids: bytes
    taken_ns: int  # wall clock, to compare with the inputs' times
    at: float  # monotonic, for the TTL
    with_proxy: bool
    subtitles: tuple[Path, ...]
    baseline: InputStamps | None
    # The paths as strings (the very strings the path objects hold): film, work dir, then the subtitles.
    film: str
    work_dir: str
    subtitle_paths: tuple[str, ...]

    def recent(self) -> bool:
        """An input changed within ``RACY_S`` of the snapshot (or carries a time from the future)."""
        horizon = self.taken_ns - int(RACY_S * 1e9)
        n = _ONE.size
        for i in range(0, len(self.ids) - len(self.ids) % n, n):
            chunk = self.ids[i : i + n]
            if chunk != _ABSENT:
                if _ONE.unpack(chunk)[4] >= horizon:  # the ctime: when the file last changed, by any means
                    return True
        return False


def snapshot(state: FilmState, st: os.stat_result, mounts: Mounts) -> Judged | None:
    """The inputs' stat identity now, before the judgement reads them (``st``: the film's, just taken);
    None when one cannot be stat'ed."""
    taken, at = time.time_ns(), time.monotonic()
    work_dir = os.fspath(state.work_dir)
    subs = tuple(os.fspath(s) for s in state.subtitles)
    try:
        ids = _current(st, work_dir, subs, mounts, True)
    except _Unstable:
        return None
    return Judged(ids, taken, at, True, state.subtitles, state.baseline, os.fspath(state.film), work_dir, subs)


def remember(inputs: Judged | None, *, proxy_witness: bool) -> Judged | None:
    """The memo of a judgement that found nothing to do, or None when its inputs were too fresh to trust.

    ``proxy_witness``: the proxy was (or may have been) read; without it, the proxy is left out, so a
    pipeline rewriting it does not cost a judgement."""
    if inputs is None or inputs.recent():
        return None
    n = _ONE.size
    if proxy_witness or inputs.ids[n : 2 * n] == _ABSENT:
        return inputs  # the proxy read, or no work dir (no proxy entry)
    inputs.ids = inputs.ids[: 5 * n] + inputs.ids[6 * n :]  # film, work dir, checkpoint, cache, sidecar, [proxy]
    inputs.with_proxy = False
    return inputs


def unchanged(memo: Judged, state: FilmState, mounts: Mounts) -> bool:
    """Every input of the remembered judgement is, by stat, what it read: the judgement would repeat."""
    if state.subtitles is not memo.subtitles and state.subtitles != memo.subtitles:
        return False
    if state.baseline is not memo.baseline and state.baseline != memo.baseline:
        return False
    if time.monotonic() - memo.at > TTL_S:
        return False
    try:
        st = os.stat(memo.film)
        return _current(st, memo.work_dir, memo.subtitle_paths, mounts, memo.with_proxy, memo.ids) == memo.ids
    except (OSError, _Unstable):
        return False


__all__ = ["Judged", "Mounts", "remember", "snapshot", "unchanged"]
