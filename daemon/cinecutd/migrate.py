"""Moving a work dir after its film was renamed or moved with unchanged content.

The expensive results (the SceneDescription cache above all) follow the film: the work dir is renamed to
the new stem, the cache and proxy get the new names, and the absolute paths upstream stores (cache
``source_file`` and ``frame_path``, checkpoint ``source_file``/``proxy_path``/manifest paths) are rewritten.

Crash safety: a journal (``cinecut_migration.json``) is written durably into the work dir BEFORE it is
renamed, travels with it, and is removed last. Every step is idempotent, so a daemon killed anywhere
resumes the migration from the journal at its next reconcile.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from cinecut import faults, safefs
from cinecut.checkpoint import read_checkpoint_at, save_checkpoint_at
from cinecut.inference.cache import MAX_CACHE_BYTES, decode_cache, encode_cache
from cinecut.locks import work_dir_lock
from cinecut.models import KeyframeRecord
from cinecut.stamps import read_stamps_at, write_stamps_at
from cinecut.workdir import (
    CACHE_SUFFIX,
    CACHE_TMP_SUFFIX,
    PARTIAL_SUFFIX,
    PROXY_SUFFIX,
    WORK_DIR_SUFFIX,
    WorkDir,
    stem_of_work_dir,
)

JOURNAL_NAME: Final = "cinecut_migration.json"


class MigrationError(Exception):
    """The work dir could not be moved (the reason says why); nothing was lost."""


@dataclass(slots=True)
class MigrationReport:
    old_film: str
    new_film: str
    old_work_dir: str
    new_work_dir: str
    moved_dir: bool = False
    renamed: list[str] = field(default_factory=list)
    rewritten: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


def _stem_derived(stem: str) -> tuple[str, ...]:
    """The names inside a work dir that upstream derives from the film's stem (all others are fixed)."""
    return (f"{stem}{PROXY_SUFFIX}", f"{stem}{CACHE_SUFFIX}", f"{stem}{PARTIAL_SUFFIX}")


def _real_parent(p: Path) -> Path:
    """``p`` with its folders resolved (upstream stores realpaths); the last component is kept."""
    return Path(os.path.realpath(p.parent)) / p.name


def _rewrite(path: str | None, old_wd: Path, new_wd: Path, old_film: Path, new_film: Path) -> str | None:
    """Map an absolute path that pointed into the old work dir (or at the old film) to the new one.

    Only what derives from the stem changes: the film itself, the work dir's own name, and directly inside
    it the proxy, cache and partial names. A fixed name a stem happens to prefix (``T`` and
    ``TRAILER_MANIFEST.json``) keeps its name. A path stored in realpath form (upstream resolves the film's
    path) is answered in realpath form.
    """
    if path is None:
        return None
    p = Path(path)
    forms = [(old_wd, new_wd, old_film, new_film)]
    real = (_real_parent(old_wd), _real_parent(new_wd), _real_parent(old_film), _real_parent(new_film))
    if real != forms[0]:
        forms.append(real)
    for o_wd, n_wd, o_film, n_film in forms:
        if p == o_film:
            return str(n_film)
        if p == o_wd:
            return str(n_wd)
        if p.is_relative_to(o_wd):
            rel = p.relative_to(o_wd)
            if len(rel.parts) == 1:
                derived = _stem_derived(old_film.stem)
                if rel.parts[0] in derived:
                    return str(n_wd / _stem_derived(new_film.stem)[derived.index(rel.parts[0])])
            return str(n_wd / rel)
    return path


def migrate_work_dir(old_film: Path, new_film: Path, *, moved_with_folder: bool = False,
                     src_dir: Path | None = None) -> MigrationReport:
    """Move ``old_film``'s work dir to ``new_film``'s and rewrite every stored path.

    ``moved_with_folder``: the film's whole folder was moved, so the work dir is already at its new place
    (same name); only the stored paths are rewritten, under the same journal as a full move.
    ``src_dir``: the work dir sits at a parking place (:func:`park_work_dir`) instead of ``old_film``'s
    name; its stored paths still speak of ``old_film``'s.

    Raises LockBusy if a pipeline holds the work dir, MigrationError if the destination work dir already
    exists (another film's results are never overwritten) or the move crosses filesystems.
    """
    old, new = WorkDir.for_film(old_film), WorkDir.for_film(new_film)
    report = MigrationReport(str(old.film), str(new.film), str(old.path), str(new.path))
    if moved_with_folder and old.path != new.path:
        if old.path.name != new.path.name or os.path.lexists(old.path):
            raise MigrationError(f"{new.path} did not travel with its folder from {old.path.parent}")
        with safefs.work_dir_fd(new.path) as fd:
            lock = work_dir_lock(new, purpose="migrate", dir_fd=fd)
            lock.acquire(0.0)
            try:
                journal = {"old_film": str(old.film), "new_film": str(new.film)}
                safefs.atomic_write(fd, JOURNAL_NAME, json.dumps(journal).encode(), tmp_suffix=".journal.tmp")
            finally:
                lock.release()
        report.moved_dir = True
    elif old.path != new.path or src_dir is not None:
        src = Path(src_dir) if src_dir is not None else old.path
        if os.path.lexists(new.path):
            raise MigrationError(f"{new.path} already exists; keeping both work dirs")
        with safefs.work_dir_fd(src) as fd:
            lock = work_dir_lock(WorkDir(old.film, src), purpose="migrate", dir_fd=fd)
            lock.acquire(0.0)
            try:
                journal = {"old_film": str(old.film), "new_film": str(new.film)}
                if src_dir is not None:
                    journal["src_dir"] = str(src)
                safefs.atomic_write(fd, JOURNAL_NAME, json.dumps(journal).encode(), tmp_suffix=".journal.tmp")
                faults.point("migrate.before_rename")
                try:
                    os.rename(src, new.path)
                except OSError as exc:
                    safefs.unlink_regular(fd, JOURNAL_NAME)
                    if exc.errno == errno.EXDEV:
                        raise MigrationError(f"{src} and {new.path} are on different filesystems") from exc
                    raise
                parent = os.open(new.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    os.fsync(parent)
                finally:
                    os.close(parent)
                report.moved_dir = True
                faults.point("migrate.after_rename")
            finally:
                lock.release()
    _finish(old, new, report)
    return report


def resume_migration(work_dir: Path, *, within: Callable[[Path], bool] | None = None) -> MigrationReport | None:
    """Finish a migration interrupted by a crash (journal present); None if there is none to finish.

    A journal is only trusted to describe the directory it sits in: it must name that directory as the
    work dir moved from or to, and (``within``) its films must lie inside the libraries. Anything else (a
    corrupt or planted journal) is ignored: nothing is moved or rewritten on its word.
    """
    try:
        with safefs.work_dir_fd(work_dir) as fd:
            data = safefs.read_bounded(fd, JOURNAL_NAME, 1 << 16)
        journal = json.loads(data)
        old_film, new_film = journal["old_film"], journal["new_film"]
        src_dir = journal.get("src_dir")
        if not isinstance(old_film, str) or not isinstance(new_film, str) or "\0" in old_film + new_film:
            return None
        if src_dir is not None and (not isinstance(src_dir, str) or "\0" in src_dir):
            return None
        old_film, new_film = Path(old_film), Path(new_film)
    except (OSError, ValueError, KeyError, TypeError, RecursionError, AttributeError):
        return None
    if not (old_film.is_absolute() and new_film.is_absolute()):
        return None
    old, new = WorkDir.for_film(old_film), WorkDir.for_film(new_film)
    if within is not None and not (within(old.film) and within(new.film)):
        return None
    if src_dir is not None and Path(work_dir) == Path(src_dir) and is_parked_name(Path(src_dir).name) \
            and Path(src_dir).parent == old.path.parent:
        # Crashed before a parked work dir was handed back: redo the move from the parking place.
        with safefs.work_dir_fd(work_dir) as fd:
            safefs.unlink_regular(fd, JOURNAL_NAME)
        return migrate_work_dir(old.film, new.film, src_dir=Path(work_dir))
    if Path(work_dir) not in (old.path, new.path):
        return None
    report = MigrationReport(str(old.film), str(new.film), str(old.path), str(new.path))
    if Path(work_dir) == old.path and old.path != new.path:
        # Crashed before the rename: the film has moved on, so redo the whole move.
        with safefs.work_dir_fd(old.path) as fd:
            safefs.unlink_regular(fd, JOURNAL_NAME)
        return migrate_work_dir(old.film, new.film)
    _finish(old, new, report)
    return report


PARKED_PREFIX: Final = ".cinecut-parked-"


def is_parked_name(name: str) -> bool:
    """A parking place of :func:`park_work_dir` (hidden, so no film ever claims it by name)."""
    return name.startswith(PARKED_PREFIX) and name.endswith(WORK_DIR_SUFFIX)


def park_work_dir(work_dir: Path, identity: tuple[int, int]) -> Path:
    """Move a work dir out of the way of a film that took its name, keeping everything in it.

    The results belong to another file (``identity``: its device and inode), which left the name, maybe for
    a name the scan ignores (``mv A.mkv .swap``). They wait under a hidden name in the same folder until
    their file reappears, and are an orphan meanwhile. One ``rename`` under the work dir's lock: nothing
    is rewritten, so a crash leaves either the old place or the parked one. Raises LockBusy while a
    pipeline holds it.
    """
    base = f"{PARKED_PREFIX}{identity[0]:x}-{identity[1]:x}"
    for n in range(1000):
        parked = work_dir.parent / f"{base}{'-' + str(n) if n else ''}{WORK_DIR_SUFFIX}"
        if not os.path.lexists(parked):
            break
    else:
        raise MigrationError(f"no free parking place beside {work_dir}")
    with safefs.work_dir_fd(work_dir) as fd:
        lock = work_dir_lock(WorkDir(work_dir.parent / stem_of_work_dir(work_dir.name), work_dir),
                             purpose="park", dir_fd=fd)
        lock.acquire(0.0)
        try:
            os.rename(work_dir, parked)
            parent = os.open(work_dir.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(parent)
            finally:
                os.close(parent)
        finally:
            lock.release()
    return parked


def _finish(old: WorkDir, new: WorkDir, report: MigrationReport) -> None:
    """Steps after the directory rename: rename artifacts, rewrite paths, update stamps, drop the journal."""
    with safefs.work_dir_fd(new.path) as fd:
        lock = work_dir_lock(new, purpose="migrate", dir_fd=fd)
        lock.acquire(0.0)
        try:
            _rename_cache(fd, old, new, report)
            faults.point("migrate.after_cache")
            if old.proxy_name != new.proxy_name and safefs.lstat_in(fd, old.proxy_name) is not None:
                if safefs.lstat_in(fd, new.proxy_name) is None:
                    os.rename(old.proxy_name, new.proxy_name, src_dir_fd=fd, dst_dir_fd=fd)
                    report.renamed.append(new.proxy_name)
            if old.partial_name != new.partial_name and safefs.unlink_regular(fd, old.partial_name) is not None:
                report.dropped.append(old.partial_name)
            _rewrite_checkpoint(fd, old, new, report)
            faults.point("migrate.after_checkpoint")
            recorded = read_stamps_at(fd)
            if recorded is not None and recorded.source_file != str(new.film):
                write_stamps_at(fd, dataclasses.replace(recorded, source_file=str(new.film)))
            safefs.unlink_regular(fd, JOURNAL_NAME)
            os.fsync(fd)
        finally:
            lock.release()


def _rename_cache(fd: int, old: WorkDir, new: WorkDir, report: MigrationReport) -> None:
    """Write the cache under the new name with rewritten paths, then drop the old one."""
    source_name = old.cache_name if safefs.lstat_in(fd, old.cache_name) is not None else new.cache_name
    try:
        data = safefs.read_bounded(fd, source_name, MAX_CACHE_BYTES)
        meta, results = decode_cache(data)
    except FileNotFoundError:
        return
    except (OSError, ValueError):
        return  # a corrupt cache is not worth carrying; revalidation will report it
    moved = [
        (KeyframeRecord(r.timestamp_s, _rewrite(r.frame_path, old.path, new.path, old.film, new.film) or "", r.source), d)
        for r, d in results
    ]
    if meta.source_file != str(new.film) or moved != results or source_name != new.cache_name:
        payload = encode_cache(moved, str(new.film), meta.stamp)
        safefs.atomic_write(fd, new.cache_name, payload, tmp_suffix=CACHE_TMP_SUFFIX)
        report.rewritten.append(new.cache_name)
    if source_name != new.cache_name:
        safefs.unlink_regular(fd, source_name)


def _rewrite_checkpoint(fd: int, old: WorkDir, new: WorkDir, report: MigrationReport) -> None:
    ckpt = read_checkpoint_at(fd).checkpoint
    if ckpt is None:
        return
    changed = False
    for name in ("source_file", "proxy_path", "manifest_path", "assembly_manifest_path"):
        value = getattr(ckpt, name)
        new_value = _rewrite(value, old.path, new.path, old.film, new.film)
        if new_value != value:
            setattr(ckpt, name, new_value)
            changed = True
    if changed:
        save_checkpoint_at(ckpt, fd)
        report.rewritten.append("pipeline_checkpoint.json")
