"""Films that pass through names the scan ignores keep their results: swaps and rotations of names.

``mv A.mkv .swap; mv B.mkv A.mkv; mv .swap B.mkv`` swaps two films through a hidden name. The hidden name
is no film, so the first rename looks like a deletion, and the second lands B on a name whose work dir
holds A's results. Nothing of either film may be deleted: the daemon follows the file by its inode
through the name it cannot see, parks the results a name no longer owns instead of judging them against
the film that took the name, and hands them back when their file reappears. The same holds through an
in-progress name (``.part``), a non-film extension, across folders, for a three-way rotation, and whether
the daemon sees each step before the next or the whole sequence at once.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cinecut.workdir import TRAILER_MANIFEST_NAME, is_work_dir_name
from tests.harness.checks import warm
from tests.harness.films import Film, lock_held, make_film_with_work_dir
from tests.harness.runner import DaemonRunner, Library
from tests.harness.waiting import stays, wait_for


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[DaemonRunner]:
    with DaemonRunner(tmp_path) as r:
        yield r


def _made_for(film: Path) -> str | None:
    """Which film's pipeline run wrote the results now in ``film``'s work dir (its manifest says)."""
    try:
        return json.loads((Film(film).wd.path / TRAILER_MANIFEST_NAME).read_text())["film"]
    except (OSError, ValueError):
        return None


SUB = ".en.srt"


def _films(folders: list[Path], stems: list[str]) -> list[Film]:
    return [make_film_with_work_dir(folder, stem, subtitles=(SUB,), trailer=None, seed=i, size=(64 + 8 * i) * 1024)
            for i, (folder, stem) in enumerate(zip(folders, stems, strict=True))]


def _at(path: Path) -> Film:
    """The film now at ``path``, with the subtitle that travelled with it."""
    return Film(path, (path.with_name(path.stem + SUB),))


def _mv(d: object, src: Path, dest: Path, paced: bool) -> None:
    """Paced: wait until the daemon saw the rename before going on (a person at a shell); otherwise the
    renames come back to back (a script), all queued before the daemon looks."""
    n = d.counter("events") if paced else 0  # type: ignore[attr-defined]
    os.rename(src, dest)
    if paced:
        wait_for(lambda: d.counter("events") > n, what="the rename seen")  # type: ignore[attr-defined]
        time.sleep(0.05)


def _rotate(d: object, names: list[Path], temp: Path, paced: bool) -> None:
    """names[0] -> temp, names[1] -> names[0], ..., temp -> names[-1]; each film's subtitle follows it
    (through a hidden name of its own), as a tool renaming a film with its sidecars does."""
    def sub(p: Path) -> Path:
        return p.with_name(p.stem + SUB)

    hidden_sub = temp.with_name(".subtitle-in-transit" + SUB)
    _mv(d, names[0], temp, paced)
    _mv(d, sub(names[0]), hidden_sub, paced)
    for src, dest in zip(names[1:], names, strict=False):
        _mv(d, src, dest, paced)
        _mv(d, sub(src), sub(dest), paced)
    _mv(d, temp, names[-1], paced)
    _mv(d, hidden_sub, sub(names[-1]), paced)


def _no_leftovers(folders: list[Path]) -> list[str]:
    """Work dirs that belong to no film (parked or orphaned results not handed back)."""
    out = []
    for folder in set(folders):
        films = {p.stem for p in folder.iterdir() if p.suffix == ".mkv"}
        out += [p.name for p in folder.iterdir() if is_work_dir_name(p.name) and p.name[:-13] not in films]
    return out


TEMPS = [".swap", "{a}.part", "{a}.tmp", "swap.bak"]


@pytest.mark.parametrize("paced", [True, False], ids=["paced", "burst"])
@pytest.mark.parametrize("temp", TEMPS)
@pytest.mark.parametrize("layout", ["one_folder", "two_folders", "two_roots"])
def test_swap_through_an_ignored_name_keeps_both_results(runner: DaemonRunner, temp: str, paced: bool,
                                                          layout: str) -> None:
    lib, other = runner.library("films"), runner.library("films-4k")
    folders = {"one_folder": [lib / "Pair"] * 2, "two_folders": [lib / "Alpha (2001)", lib / "Beta (2002)"],
               "two_roots": [lib / "Alpha (2001)", other / "Beta (2002)"]}[layout]
    a, b = _films(folders, ["Alpha (2001)", "Beta (2002)"])
    d = runner.start([Library(lib), Library(other)])

    _rotate(d, [a.path, b.path], a.path.with_name(temp.format(a=a.path.name)), paced)

    # The file that was Alpha is now at Beta's name, with Alpha's results; and the other way round.
    a, b = _at(a.path), _at(b.path)
    wait_for(lambda: warm(b) and warm(a) and _made_for(b.path) == "Alpha (2001)" and _made_for(a.path) == "Beta (2002)",
             what="both results followed their files")
    st = wait_for(lambda: (s := d.status())["films"]["orphaned"] == 0 and not s["pending"] and s,
                  what="nothing left parked")
    assert st["counters"].get("invalidations", 0) == 0, st["recent_invalidations"]
    assert _no_leftovers(folders) == []
    d.request("rescan", timeout=60)
    assert stays(lambda: warm(a) and warm(b), 0.5)
    assert d.counter("invalidations") == 0


@pytest.mark.parametrize("paced", [True, False], ids=["paced", "burst"])
@pytest.mark.parametrize("first", [0, 1, 2])
def test_three_way_rotation_through_a_hidden_name(runner: DaemonRunner, paced: bool, first: int) -> None:
    lib = runner.library("films")
    stems = ["Alpha (2001)", "Beta (2002)", "Gamma (2003)"]
    films = _films([lib / "Trio"] * 3, stems)
    order = films[first:] + films[:first]
    d = runner.start([Library(lib)])

    _rotate(d, [f.path for f in order], lib / "Trio" / ".rotating", paced)

    # order[i+1]'s file now sits at order[i]'s name; order[0]'s file at order[-1]'s name.
    expect = {order[i].path: order[i + 1].stem for i in range(len(order) - 1)} | {order[-1].path: order[0].stem}
    wait_for(lambda: all(warm(_at(p)) and _made_for(p) == s for p, s in expect.items()),
             what="every film's results followed its file")
    st = wait_for(lambda: (s := d.status())["films"]["orphaned"] == 0 and not s["pending"] and s,
                  what="nothing left parked")
    assert st["counters"].get("invalidations", 0) == 0, st["recent_invalidations"]
    assert _no_leftovers([lib / "Trio"]) == []


def test_name_taken_over_while_the_old_file_hides_then_deleted(runner: DaemonRunner) -> None:
    """The hidden file never comes back (deleted): its parked results are an orphan, reported and kept,
    and the film that took the name keeps its own results."""
    lib = runner.library("films")
    a, b = _films([lib / "Pair"] * 2, ["Alpha (2001)", "Beta (2002)"])
    d = runner.start([Library(lib)])
    hidden = a.path.with_name(".swap")
    os.rename(a.path, hidden)
    os.rename(b.path, a.path)
    os.unlink(a.subtitles[0])
    os.rename(b.subtitles[0], a.subtitles[0])
    wait_for(lambda: warm(a) and _made_for(a.path) == "Beta (2002)", what="Beta's results at Alpha's name")
    hidden.unlink()
    st = wait_for(lambda: (s := d.status())["films"]["orphaned"] == 1 and s, what="the parked results reported")
    parked = Path(st["orphans"][0]["work_dir"])
    assert json.loads((parked / TRAILER_MANIFEST_NAME).read_text())["film"] == "Alpha (2001)"
    assert st["counters"].get("invalidations", 0) == 0
    assert stays(lambda: warm(a), 0.5)


@pytest.mark.parametrize("held", [0, 1], ids=["first_locked", "second_locked"])
@pytest.mark.parametrize("layout", ["two_folders", "two_roots"])
def test_swap_while_a_pipeline_holds_one_work_dir(runner: DaemonRunner, held: int, layout: str) -> None:
    """A pipeline holds one of the two work dirs through the whole swap: every park and move waits for
    the lock, and both results still end with their files."""
    lib, other = runner.library("films"), runner.library("films-4k")
    folders = {"two_folders": [lib / "Alpha (2001)", lib / "Beta (2002)"],
               "two_roots": [lib / "Alpha (2001)", other / "Beta (2002)"]}[layout]
    a, b = _films(folders, ["Alpha (2001)", "Beta (2002)"])
    d = runner.start([Library(lib), Library(other)])
    with lock_held((a, b)[held].wd.path):
        _rotate(d, [a.path, b.path], a.path.with_name(".swap"), False)
        wait_for(lambda: d.status()["pending"], what="the moves waiting for the lock")
    a, b = _at(a.path), _at(b.path)
    wait_for(lambda: warm(b) and warm(a) and _made_for(b.path) == "Alpha (2001)" and _made_for(a.path) == "Beta (2002)",
             what="both results followed their files")
    st = wait_for(lambda: (s := d.status())["films"]["orphaned"] == 0 and not s["pending"] and s,
                  what="nothing left parked")
    assert st["counters"].get("invalidations", 0) == 0, st["recent_invalidations"]
