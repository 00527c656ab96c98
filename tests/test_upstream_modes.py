"""Upstream's file modes: 0600 checkpoint and cache owned by whoever ran CineCut, 0755 directories.

Work dirs are written by upstream's own calls (``tempfile.mkstemp`` + ``os.replace``, umask 022) as another
user. A rewrite must keep owner, group and mode, so upstream can still read what we wrote; where the
checkpoint cannot be read at all, upstream must be unable to resume its stale stages, and every failure
is reported with path and errno (never dropped).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import upstream_reader
from upstream_user import OTHER_GID, OTHER_UID, chown_tree, run_as, upstream_resume_reuses

from cinecut.problems import STALE_CHECKPOINT_NAME
from cinecut.revalidate import revalidate
from cinecut.stages import Input, InvalidationReport, invalidate
from cinecut.workdir import CHECKPOINT_NAME, STAMPS_NAME, WorkDir
from tests.harness.films import make_film

ROOT = os.geteuid() == 0
NOBODY = 65534
root_only = pytest.mark.skipif(not ROOT, reason="switching to another uid needs root")


@pytest.fixture
def lib() -> Iterator[Path]:
    """A library folder other users can traverse (pytest's tmp dirs are private to root)."""
    base = Path(tempfile.mkdtemp(prefix="cinecut-modes-", dir="/tmp"))
    base.chmod(0o755)
    try:
        yield base / "films"
    finally:
        for root, dirs, _ in os.walk(base):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o755)
        shutil.rmtree(base, ignore_errors=True)


def _upstream_work_dir(lib: Path, owner: tuple[int, int] | None) -> tuple[Path, Path]:
    """A film whose library belongs to ``owner`` (None: this process), analysed by upstream as that owner."""
    film = make_film(lib / "Heat (1995)", "Heat (1995)").path
    if owner is None:
        old = os.umask(0o022)
        try:
            wd = upstream_reader.run_pipeline(film)
        finally:
            os.umask(old)
    else:
        chown_tree(lib, *owner)
        wd = run_as(*owner, upstream_reader.run_pipeline, film)
    st = os.stat(wd / CHECKPOINT_NAME)
    assert stat.S_IMODE(st.st_mode) == 0o600 and stat.S_IMODE(os.stat(wd).st_mode) == 0o755
    return film, wd


def _replace(film: Path) -> None:
    tmp = film.with_name(film.name + ".part")
    tmp.write_bytes(os.urandom(70_000))
    os.replace(tmp, film)


@root_only
def test_rewrite_keeps_owner_group_and_mode_of_upstream_files(lib: Path) -> None:
    film, wd = _upstream_work_dir(lib, (OTHER_UID, OTHER_GID))
    before = os.stat(wd / CHECKPOINT_NAME)
    rep = invalidate(wd, [Input.SUBTITLE], reason="subtitle edited")
    assert rep.stages_reset and not rep.problems, rep
    after = os.stat(wd / CHECKPOINT_NAME)
    assert after.st_ino != before.st_ino  # really rewritten
    assert (after.st_uid, after.st_gid, stat.S_IMODE(after.st_mode)) == (OTHER_UID, OTHER_GID, 0o600)
    # upstream, as the owner, reads what we wrote
    ckpt = run_as(OTHER_UID, OTHER_GID, upstream_reader.load_checkpoint_strict, wd)
    assert ckpt.stages_complete == ["proxy"]

    _replace(film)
    res = revalidate(film, [])
    assert res.report is not None and "proxy" in res.report.stages_reset
    ck = os.stat(wd / CHECKPOINT_NAME)
    assert (ck.st_uid, ck.st_gid, stat.S_IMODE(ck.st_mode)) == (OTHER_UID, OTHER_GID, 0o600)
    side = os.stat(wd / STAMPS_NAME)  # a new file in the owner's work dir belongs to that owner
    assert (side.st_uid, side.st_gid) == (OTHER_UID, OTHER_GID)
    assert run_as(OTHER_UID, OTHER_GID, upstream_resume_reuses, wd) == []


def _invalidate_as_service(wd: Path, as_root: bool) -> InvalidationReport:
    """The video changed; the service (``nobody`` here, or this unprivileged process) invalidates."""
    if as_root:
        return run_as(NOBODY, NOBODY, invalidate, wd, [Input.VIDEO])
    return invalidate(wd, [Input.VIDEO])


def _lock_out(wd: Path, as_root: bool, *, dir_writable: bool) -> None:
    """What the service sees of an upstream work dir it may not read: the other owner's 0600 files (as
    root), or this process's own files made unreadable (unprivileged)."""
    if not as_root:
        (wd / CHECKPOINT_NAME).chmod(0o000)
        (wd / "Heat (1995).scenedesc.msgpack").chmod(0o000)
    if dir_writable:
        for d in (wd, wd / "keyframes"):
            d.chmod(0o777)
    elif not as_root:
        for d in (wd, wd / "keyframes"):
            d.chmod(0o555)


def test_unreadable_checkpoint_goes_aside_and_stale_artifacts_go(lib: Path) -> None:
    """The service cannot read the checkpoint but may write the work dir (a group-writable library):
    upstream must start fresh instead of resuming on the old film's proxy and keyframes."""
    film, wd = _upstream_work_dir(lib, (OTHER_UID, OTHER_GID) if ROOT else None)
    original = (wd / CHECKPOINT_NAME).read_bytes()
    _lock_out(wd, ROOT, dir_writable=True)
    _replace(film)
    rep = _invalidate_as_service(wd, ROOT)
    assert rep.checkpoint == "moved-aside", rep
    (problem,) = [p for p in rep.problems if p.path == str(wd / CHECKPOINT_NAME)]
    assert problem.errno == errno.EACCES and "moved it aside" in problem.action
    assert not rep.errors  # nothing stale is left that upstream could resume
    assert not (wd / CHECKPOINT_NAME).exists() and (wd / STALE_CHECKPOINT_NAME).exists()
    if ROOT:
        assert (wd / STALE_CHECKPOINT_NAME).read_bytes() == original
    assert not (wd / "Heat (1995)_proxy.mp4").exists() and not (wd / "keyframe_timestamps.json").exists()
    assert not list((wd / "keyframes").glob("frame_*.jpg"))
    assert (wd / "TRAILER_MANIFEST.json").exists()  # user data stays
    owner = (OTHER_UID, OTHER_GID) if ROOT else None
    reuses = run_as(*owner, upstream_resume_reuses, wd) if owner else upstream_resume_reuses(wd)
    assert reuses == []


def test_unwritable_work_dir_with_unreadable_checkpoint_reports_every_failure(lib: Path) -> None:
    """Nothing can be done (0755 directories of another user): every failure is in the report, with its
    path and errno, so the daemon can show the film as blocked."""
    film, wd = _upstream_work_dir(lib, (OTHER_UID, OTHER_GID) if ROOT else None)
    # a lock file anyone may lock (left by a `cinecut analyze` of the owner); without one, the service
    # cannot even take the lock, and the daemon reports that instead (test_daemon_blocked)
    lock = str(wd / "cinecut.lock")
    if ROOT:
        run_as(OTHER_UID, OTHER_GID, lambda: os.close(os.open(lock, os.O_CREAT | os.O_WRONLY, 0o666)), umask=0)
    else:
        os.close(os.open(lock, os.O_CREAT | os.O_WRONLY, 0o666))
        os.chmod(lock, 0o666)
    _lock_out(wd, ROOT, dir_writable=False)
    try:
        _replace(film)
        rep = _invalidate_as_service(wd, ROOT)
    finally:
        if not ROOT:
            for d in (wd, wd / "keyframes"):
                d.chmod(0o755)
    assert rep.errors and rep.checkpoint != "moved-aside"
    by_path = {p.path: p for p in rep.problems}
    ck = by_path[str(wd / CHECKPOINT_NAME)]
    assert ck.errno == errno.EACCES and "nor move it aside" in ck.reason
    assert by_path[str(wd / "Heat (1995)_proxy.mp4")].errno == errno.EACCES
    assert (wd / "Heat (1995)_proxy.mp4").exists()  # nothing could be deleted, and the report says so


def test_new_files_follow_the_umask_and_rewrites_keep_the_mode(lib: Path) -> None:
    """Our own new files take 0666 & ~umask (the service's UMask=0007 gives 0660), not a fixed 0644."""
    from cinecut import safefs

    wd = lib / "w"
    wd.mkdir(parents=True)
    old = os.umask(0o007)
    try:
        with safefs.work_dir_fd(wd) as fd:
            safefs.atomic_write(fd, "new.json", b"{}", tmp_suffix=".x.tmp")
            os.chmod(wd / "new.json", 0o640)
            safefs.atomic_write(fd, "new.json", b"{ }", tmp_suffix=".x.tmp")
            safefs.atomic_write(fd, "other.json", b"{}", tmp_suffix=".x.tmp")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(wd / "new.json").st_mode) == 0o640
    assert stat.S_IMODE(os.stat(wd / "other.json").st_mode) == 0o660
    assert WorkDir  # the module is the contract's


def _revalidate_summary(film: Path) -> tuple[list[str], list[str], bool]:
    res = revalidate(film, [])
    rep = res.report
    return (rep.errors if rep else [], [p.path for p in rep.problems] if rep else [],
            (WorkDir.for_film(film).path / STAMPS_NAME).exists())


def test_an_invalidation_that_met_errors_is_not_recorded_as_verified(lib: Path) -> None:
    """Frames that could not be deleted are stale results left behind (upstream extracts only missing
    frames, so it would reuse them): the stamps sidecar must not record the new film as verified, and
    applying the invalidation again (what the daemon's retry does) finishes the job."""
    film, wd = _upstream_work_dir(lib, (OTHER_UID, OTHER_GID) if ROOT else None)
    for name in (CHECKPOINT_NAME, "Heat (1995).scenedesc.msgpack"):
        (wd / name).chmod(0o644)
    wd.chmod(0o777)
    (wd / "keyframes").chmod(0o555)
    _replace(film)
    as_service = (lambda: run_as(NOBODY, NOBODY, _revalidate_summary, film)) if ROOT else (
        lambda: _revalidate_summary(film))
    try:
        errors, paths, recorded = as_service()
        assert errors and any(p.startswith(str(wd / "keyframes") + "/frame_") for p in paths), paths
        assert not recorded
        (wd / "keyframes").chmod(0o777)  # fixed: the retry applies the invalidation again
        again = run_as(NOBODY, NOBODY, invalidate, wd, ["video"]) if ROOT else invalidate(wd, ["video"])
    finally:
        if (wd / "keyframes").exists():
            (wd / "keyframes").chmod(0o755)
    assert not again.errors and any(f.startswith("keyframes/frame_") for f in again.files_removed)
    assert not list((wd / "keyframes").glob("frame_*.jpg"))
