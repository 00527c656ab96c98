"""revalidate(): every way a film's inputs change, seen on a real upstream-shaped work dir."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import upstream_reader as up

from cinecut import safefs
from cinecut.checkpoint import read_checkpoint
from cinecut.inference.cache import load_cache
from cinecut.locks import LockBusy, work_dir_lock
from cinecut.revalidate import revalidate
from cinecut.stamp import SourceStamp
from cinecut.stamps import current_stamps, read_stamps, write_stamps_at
from cinecut.workdir import WorkDir, subtitle_sidecars

PAST = 1_600_000_000.25


def tree(root: Path) -> dict[str, tuple[int, int, str]]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink() and p.name != "cinecut.lock":
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_ino, st.st_mtime_ns, hashlib.sha1(p.read_bytes()).hexdigest())
    return out


@pytest.fixture
def film(tmp_path: Path) -> Path:
    folder = tmp_path / "lib" / "Heat (1995)"
    folder.mkdir(parents=True)
    f = folder / "Heat (1995).mkv"
    f.write_bytes(b"original film" * 50)
    os.utime(f, (PAST, PAST))
    (folder / "Heat (1995).en.srt").write_text("1\n00:00:01,000 --> 00:00:02,000\nHi.\n")
    os.utime(folder / "Heat (1995).en.srt", (PAST, PAST))
    up.run_pipeline(f, subtitle=False)
    for p in WorkDir.for_film(f).path.rglob("*"):  # the pipeline ran after the film was written
        os.utime(p, (PAST + 100, PAST + 100))
    return f


def check(film: Path):
    return revalidate(film, subtitle_sidecars(film))


def completed(film: Path) -> list[str]:
    ckpt = read_checkpoint(WorkDir.for_film(film)).checkpoint
    assert ckpt is not None
    return ckpt.stages_complete


def record(film: Path) -> None:
    """Our sidecar, as our pipeline's commit mark writes it after computing the stages."""
    with safefs.work_dir_fd(WorkDir.for_film(film).path) as fd:
        write_stamps_at(fd, current_stamps(film, subtitle_sidecars(film)))


def test_first_sight_of_a_valid_work_dir_changes_and_writes_nothing(film: Path) -> None:
    """Upstream's cache proves its stages; nothing changed, so nothing is written, not even a lock file."""
    wd = WorkDir.for_film(film)
    names = sorted(p.name for p in wd.path.rglob("*"))
    before = tree(wd.path)
    r = check(film)
    assert r.exists and r.film_present and r.changed == [] and r.report is None
    assert r.cache is not None and r.cache.stamp == SourceStamp.of(film)
    assert r.verification == "cache"
    assert tree(wd.path) == before and sorted(p.name for p in wd.path.rglob("*")) == names
    assert read_stamps(wd.path) is None and not wd.lock_path.exists()
    assert load_cache(film, wd.path) is not None
    record(film)
    again = tree(wd.path)
    assert check(film).changed == []
    assert tree(wd.path) == again  # a verified, unchanged work dir is not rewritten at all


def test_replaced_film(film: Path) -> None:
    wd = WorkDir.for_film(film)
    check(film)
    new = film.with_name("incoming.part")
    new.write_bytes(b"a different cut!" * 50)
    os.replace(new, film)  # Radarr-style upgrade: rename over the old file
    r = check(film)
    assert r.changed == ["video"]
    assert r.report is not None and "Heat (1995).scenedesc.msgpack" in r.report.files_removed
    assert completed(film) == []
    assert not wd.cache_path.exists() and not wd.proxy_path.exists()
    assert read_stamps(wd.path).video == SourceStamp.of(film)  # type: ignore[union-attr]
    assert check(film).changed == []  # settled


def test_touched_film(film: Path) -> None:
    check(film)
    os.utime(film)
    r = check(film)
    assert r.changed == ["video"]
    assert completed(film) == []


@pytest.mark.parametrize("edit", ["added", "changed", "removed"])
def test_subtitle_edits_reset_subtitle_stages_but_keep_the_proxy(film: Path, edit: str) -> None:
    wd = WorkDir.for_film(film)
    srt = film.with_name("Heat (1995).en.srt")
    if edit == "added":
        srt.unlink()
    record(film)
    if edit == "added":
        srt.write_text("1\n00:00:01,000 --> 00:00:02,000\nNew.\n")
    elif edit == "changed":
        srt.write_text("1\n00:00:05,000 --> 00:00:06,000\nEdited line.\n")
    else:
        srt.unlink()
    r = check(film)
    assert r.changed == ["subtitle"]
    assert completed(film) == ["proxy"]
    assert wd.proxy_path.exists() and not wd.cache_path.exists() and not wd.timestamps_path.exists()
    ckpt = read_checkpoint(wd).checkpoint
    assert ckpt is not None and ckpt.proxy_path == str(wd.proxy_path) and ckpt.keyframe_count is None
    assert check(film).changed == []


def test_first_sight_with_stale_cache(film: Path) -> None:
    wd = WorkDir.for_film(film)
    os.utime(film, (PAST + 5, PAST + 5))  # changed before we ever saw it; no sidecar yet
    r = check(film)
    assert r.changed == ["video"]
    assert any("cache" in reason for reason in r.reasons)
    assert not wd.cache_path.exists() and completed(film) == []


def test_first_sight_with_proxy_older_than_film(film: Path) -> None:
    wd = WorkDir.for_film(film)
    wd.cache_path.unlink()  # no cache to compare with: only the proxy's age can tell
    os.utime(film, (PAST + 200, PAST + 200))
    r = check(film)
    assert r.changed == ["video"]
    assert any("proxy" in reason for reason in r.reasons)
    assert not wd.proxy_path.exists() and completed(film) == []


def test_first_sight_with_proxy_newer_than_film_is_unverified_not_certified(film: Path) -> None:
    """No cache, no record, and a proxy ffprobe cannot compare: reported, neither certified nor deleted."""
    wd = WorkDir.for_film(film)
    wd.cache_path.unlink()
    before = tree(wd.path)
    r = check(film)
    assert r.changed == [] and "proxy" in completed(film)
    assert r.verification == "unverified" and r.evidence
    assert tree(wd.path) == before and read_stamps(wd.path) is None and not wd.lock_path.exists()


def test_vanished_film_is_reported_never_invalidated(film: Path) -> None:
    wd = WorkDir.for_film(film)
    check(film)
    before = tree(wd.path)
    film.unlink()
    r = check(film)
    assert r.exists and not r.film_present and r.changed == [] and r.report is None
    assert tree(wd.path) == before


def test_missing_work_dir(tmp_path: Path) -> None:
    f = tmp_path / "New.mkv"
    f.write_bytes(b"x")
    r = revalidate(f)
    assert not r.exists and r.film_present and r.changed == []
    assert not WorkDir.for_film(f).path.exists()  # revalidation never creates a work dir


def test_symlinked_work_dir_is_refused(film: Path, tmp_path: Path) -> None:
    wd = WorkDir.for_film(film)
    real = tmp_path / "elsewhere"
    wd.path.rename(real)
    wd.path.symlink_to(real)
    os.utime(film)  # a change that would otherwise wipe the work dir
    before = tree(real)
    r = check(film)
    assert r.refused and r.report is None and r.changed == []
    assert tree(real) == before
    assert not (real / "cinecut_stamps.json").exists() and not (real / "cinecut.lock").exists()


def test_lock_held_raises_lock_busy_and_changes_nothing(film: Path) -> None:
    wd = WorkDir.for_film(film)
    check(film)
    os.utime(film)
    pipeline = work_dir_lock(wd, purpose="pipeline")
    assert pipeline.try_acquire()
    before = tree(wd.path)
    with pytest.raises(LockBusy):
        check(film)
    with pytest.raises(LockBusy):
        revalidate(film, subtitle_sidecars(film), lock_timeout=0.1)
    assert tree(wd.path) == before
    pipeline.release()
    assert check(film).changed == ["video"]
