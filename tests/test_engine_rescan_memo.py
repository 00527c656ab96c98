"""Warm rescans in-process: a film whose every input is, by stat, what its last judgement read is not
judged again (no work-dir file is opened), a folder whose own stat identity is what its last listing saw
is not listed again, and no change of any input hides behind those shortcuts.

Each change below is made with no event posted, so the rescan is the only thing that can find it, and
most are made so that size and mtime stay what they were (restored with ``os.utime``): only the ctime, the
inode or the presence of a file tells. The racy-timestamp margin is made small here (the library is built
moments before), and the test waits, by polling the files' ctimes, until it has passed.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cinecut.inference.cache import CacheState
from cinecut.stamps import read_stamps
from cinecut.workdir import CHECKPOINT_NAME, STAMPS_NAME, WORK_DIR_SUFFIX
from cinecutd import judged
from tests.harness.checks import subtitles_invalidated, video_invalidated, warm
from tests.harness.films import Film, build_work_dir, make_film
from tests.harness.inprocess import unstarted_engine
from tests.harness.mutate import new_content

MARGIN_S = 0.05

_opened: list[str] | None = None
_listed: list[str] | None = None


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "open" and _opened is not None and isinstance(args[0], str | bytes):
        _opened.append(os.fsdecode(args[0]))
    elif event == "os.scandir" and _listed is not None and isinstance(args[0], str | bytes | os.PathLike):
        _listed.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


def opened_during(fn: Any) -> list[str]:
    """Paths opened (by ``open`` or ``os.open``) while ``fn`` runs."""
    global _opened
    _opened = []
    try:
        fn()
        return list(_opened)
    finally:
        _opened = None


def in_work_dirs(paths: list[str]) -> list[str]:
    return [p for p in paths if WORK_DIR_SUFFIX in p]


@pytest.fixture
def small_margin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(judged, "RACY_S", MARGIN_S)


def wait_until_settled(root: Path, timeout: float = 10.0) -> None:
    """Poll until ``root`` and everything under it last changed more than the racy margin ago."""
    deadline = time.monotonic() + timeout
    while True:
        newest = max(os.lstat(os.path.join(d, n)).st_ctime_ns for d, ds, fs in os.walk(root) for n in ["", *ds, *fs])
        if time.time_ns() - newest > 2 * MARGIN_S * 1e9:
            return
        assert time.monotonic() < deadline, "files keep changing"
        time.sleep(0.01)


class Library:
    """Films with our sidecar, films upstream left (no sidecar), a film with no work dir; judged twice so
    that every film's last judgement is remembered."""

    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path / "films"
        self.ours = [self._film(f"Ours {i} (2001)", i, record=True) for i in range(4)]
        self.upstream = [self._film(f"Upstream {i} (2002)", 10 + i, record=False) for i in range(3)]
        self.bare = make_film(self.root, "Bare (2003)", trailer=None, size=2048, seed=30)
        self.engine = unstarted_engine(tmp_path, self.root)

    def _film(self, stem: str, seed: int, *, record: bool) -> Film:
        film = make_film(self.root, stem, trailer=None, size=2048, seed=seed)
        build_work_dir(film, frames=2, record_stamps=record)
        return film

    def warm_up(self) -> None:
        self.engine.reconcile("startup")
        wait_until_settled(self.root)
        self.engine.reconcile("remembered")

    def rescan(self) -> list[str]:
        return in_work_dirs(opened_during(lambda: self.engine.reconcile("requested")))

    def judged(self, film: Film) -> list[dict[str, Any]]:
        return [r for r in self.engine.reg.recent if r["film"] == str(film.path)]


@pytest.fixture
def lib(tmp_path: Path, small_margin: None) -> Iterator[Library]:
    library = Library(tmp_path)
    library.warm_up()
    yield library


def rewrite_in_place(path: Path, edit: Any) -> None:
    """Change a file's bytes without changing its size, inode or mtime (only its ctime moves)."""
    st = os.stat(path)
    data = path.read_bytes()
    new = edit(data)
    assert new != data and len(new) == len(data)
    with open(path, "r+b") as f:
        f.write(new)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)


# ------------------------------------------------------------------------------------------ the shortcut


def test_a_warm_rescan_of_unchanged_films_opens_no_work_dir_file(lib: Library) -> None:
    opened = lib.rescan()
    assert opened == [], opened[:5]
    films = lib.engine.reg.films
    for film in lib.ours + lib.upstream:
        assert films[film.path].cache is CacheState.VALID
        assert warm(film) or film in lib.upstream
    assert films[lib.bare.path].cache is CacheState.MISSING


def test_inputs_changed_within_the_racy_margin_are_not_trusted(tmp_path: Path) -> None:
    """Built moments ago, with the real margin: every rescan judges in full (a write in the same clock
    tick as the one read could leave every stat field equal)."""
    library = Library(tmp_path)
    library.engine.reconcile("startup")
    assert library.rescan(), "a film changed within the margin is judged in full"


def test_a_memo_is_trusted_for_a_bounded_time(lib: Library, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(judged, "TTL_S", 0.0)
    assert lib.rescan(), "past its time a memo is not trusted (filesystems that do not keep ctime)"


# ------------------------------------------------------------------------------------------ nothing hides


def test_a_sidecar_rewritten_in_place_with_its_mtime_restored_is_judged_again(lib: Library) -> None:
    film = lib.ours[1]
    pattern = re.compile(rb'("video": \{"mtime": [0-9.e+]+, "size": )2048\}')
    rewrite_in_place(film.wd.path / STAMPS_NAME, lambda b: pattern.sub(rb"\g<1>2049}", b, count=1))
    lib.rescan()
    assert video_invalidated(film), "the sidecar now records another film: everything is reset"
    assert all(warm(f) for f in lib.ours if f is not film)


def test_a_checkpoint_rewritten_in_place_with_its_mtime_restored_is_judged_again(tmp_path: Path,
                                                                                  small_margin: None) -> None:
    """Upstream's work dir (no sidecar): its subtitle is newer than its checkpoint, whose stages do not
    include ``subtitles`` yet; then the same bytes count gains ``subtitles``, mtime kept."""
    library = Library(tmp_path)
    film = library.upstream[0]
    ckpt = film.wd.path / CHECKPOINT_NAME
    blank = b" " * len(b'"subtitles",')
    original = ckpt.read_bytes()
    assert b'"subtitles",' in original
    ckpt.write_bytes(original.replace(b'"subtitles",', blank, 1))
    sub_mtime = os.stat(film.subtitles[0]).st_mtime_ns
    os.utime(ckpt, ns=(sub_mtime - 10**11, sub_mtime - 10**11))
    library.warm_up()
    assert not library.judged(film), "no subtitle stage to be stale yet"
    assert library.rescan() == []
    rewrite_in_place(ckpt, lambda b: b.replace(blank, b'"subtitles",', 1))
    library.rescan()
    records = library.judged(film)
    assert records and "subtitle" in records[0]["reason"], records
    assert subtitles_invalidated(film)


def test_a_subtitle_replaced_under_its_name_is_judged_again(lib: Library) -> None:
    film = lib.ours[2]
    sub = film.subtitles[0]
    st = os.stat(sub)
    tmp = sub.with_name(f".{sub.name}.tmp")
    tmp.write_text("1\n00:00:01,000 --> 00:00:02,000\nAnother line.\n")
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    os.replace(tmp, sub)
    lib.rescan()
    assert subtitles_invalidated(film)
    assert all(warm(f) for f in lib.ours if f is not film)


def test_a_deleted_cache_is_noticed(lib: Library) -> None:
    film = lib.upstream[1]
    os.unlink(film.wd.cache_path)
    lib.rescan()
    assert lib.engine.reg.films[film.path].cache is CacheState.MISSING


def test_a_film_replaced_by_a_file_of_the_same_size_and_mtime_is_judged_again(lib: Library) -> None:
    """Same stamp, new inode: its stages stay (upstream's rule), and the record follows the new file."""
    film = lib.ours[3]
    st = os.stat(film.path)
    tmp = film.path.with_name(f".{film.path.name}.tmp")
    tmp.write_bytes(new_content(film.path, seed=7, size=st.st_size))
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(tmp, film.path)
    new_ino = os.stat(film.path).st_ino
    assert new_ino != st.st_ino
    lib.rescan()
    rec = read_stamps(film.wd.path)
    assert rec is not None and rec.inode == new_ino


def test_a_file_appearing_in_a_work_dir_is_noticed(tmp_path: Path, small_margin: None) -> None:
    """A file absent at the last judgement is not looked for by name again; its arrival (here a cache
    put back by rename) still shows, through the work dir's own identity."""
    library = Library(tmp_path)
    film = library.ours[2]
    aside = tmp_path / "cache.aside"
    os.rename(film.wd.cache_path, aside)
    library.warm_up()
    assert library.engine.reg.films[film.path].cache is CacheState.MISSING
    assert library.rescan() == []
    os.rename(aside, film.wd.cache_path)
    library.rescan()
    assert library.engine.reg.films[film.path].cache is CacheState.VALID


def test_a_work_dir_appearing_for_a_film_without_one_is_noticed(lib: Library) -> None:
    build_work_dir(lib.bare, frames=2, record_stamps=False)
    lib.rescan()
    state = lib.engine.reg.films[lib.bare.path]
    assert state.has_work_dir and state.cache is CacheState.VALID


def test_a_work_dir_made_read_only_is_noticed(lib: Library) -> None:
    """A mode change moves only the work dir's ctime: the film is judged in full again (its work dir's
    files read), and a user the mode binds sees it blocked (root writes anywhere: not blocked, but still
    judged, which is what the memo must not hide)."""
    film = lib.ours[0]
    os.chmod(film.wd.path, 0o555)
    try:
        opened = lib.rescan()
        wd = str(film.wd.path)
        assert any(p == wd or p.startswith(wd + os.sep) for p in opened), opened
        assert (film.path in lib.engine.health.blocked) == (os.geteuid() != 0)
    finally:
        os.chmod(film.wd.path, 0o755)


# ------------------------------------------------------------------------------------------ listings


def listed_during(fn: Any) -> list[str]:
    """Folders listed (``os.scandir``) while ``fn`` runs."""
    global _listed
    _listed = []
    try:
        fn()
        return list(_listed)
    finally:
        _listed = None


def rescan_lists(lib: Library) -> list[str]:
    return listed_during(lambda: lib.engine.reconcile("requested"))


def test_a_warm_rescan_does_not_list_a_folder_that_has_not_changed(lib: Library) -> None:
    assert str(lib.root) not in rescan_lists(lib)
    assert set(lib.engine.reg.films) == {f.path for f in [*lib.ours, *lib.upstream, lib.bare]}


def test_a_film_added_or_removed_without_an_event_is_found(lib: Library) -> None:
    new = make_film(lib.root, "New (2004)", trailer=None, size=2048, seed=40)
    assert str(lib.root) in rescan_lists(lib)
    assert new.path in lib.engine.reg.films
    os.unlink(lib.bare.path)
    lib.engine.reconcile("requested")
    assert lib.bare.path not in lib.engine.reg.films


def test_a_folder_changed_within_the_racy_margin_is_listed_again(lib: Library) -> None:
    os.unlink(lib.bare.path)
    lib.engine.reconcile("requested")
    assert lib.bare.path not in lib.engine.reg.films
    # Its ctime is not older than the margin yet: not remembered, so the next rescan lists it again.
    listed = rescan_lists(lib)
    if time.time_ns() - os.stat(lib.root).st_ctime_ns < MARGIN_S * 1e9:
        assert str(lib.root) in listed
    wait_until_settled(lib.root)
    lib.engine.reconcile("requested")  # listed, and remembered now
    assert str(lib.root) not in rescan_lists(lib)


def test_a_folder_with_a_symlinked_film_is_listed_every_time(lib: Library, tmp_path: Path) -> None:
    """Its target can vanish without the folder changing: such a listing is never remembered."""
    target = make_film(tmp_path / "elsewhere", "Linked (2005)", trailer=None, size=2048, seed=50)
    link = lib.root / "Linked (2005).mkv"
    os.symlink(target.path, link)
    wait_until_settled(lib.root)
    lib.engine.reconcile("requested")
    assert link in lib.engine.reg.films
    assert str(lib.root) in rescan_lists(lib)
    os.unlink(target.path)
    assert str(lib.root) in rescan_lists(lib)
    assert link not in lib.engine.reg.films


def test_a_listing_is_trusted_for_a_bounded_time(lib: Library, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(judged, "TTL_S", 0.0)
    assert str(lib.root) in rescan_lists(lib)
