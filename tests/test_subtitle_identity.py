"""A subtitle is its content, not its name: a change of which names pair with a film changes no input.

Renaming only the film (its subtitles keep the old stem), or only the subtitles, must keep every result;
only an edited, replaced or truly deleted subtitle resets the subtitle stages. The daemon tests wait past
the settle delay and the "subtitles still following" timer, where the old behaviour judged the gap.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cinecut.stamps import InputStamps, current_stamps, subtitles_unchanged
from tests.harness.checks import work_state
from tests.harness.films import ALL_STAGES, Film, make_film_with_work_dir
from tests.harness.runner import DaemonRunner, Library
from tests.harness.waiting import stays, wait_for

#: Longer than the settle delay (0.3 s) and the subtitle-follow timer (0.5 s) together, with margin.
PAST_SETTLE_S = 2.0
EDITED = "1\n00:00:07,000 --> 00:00:09,000\nA line the release group retimed.\n"


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[DaemonRunner]:
    with DaemonRunner(tmp_path) as r:
        yield r


def intact(film: Path) -> bool:
    """Every stage complete, the cache valid for the film, keyframes and proxy present."""
    s = work_state(film)
    return s.stages == tuple(ALL_STAGES) and s.cache_valid and s.proxy and s.keyframes > 0


def followed(old: Film, new: Path) -> bool:
    """The work dir moved to the new stem and its stored paths name the new film."""
    s = work_state(new)
    return not old.wd.path.exists() and s.checkpoint_source == str(new) and s.cache_source == str(new)


def subtitle_stages_reset(film: Path) -> bool:
    s = work_state(film)
    return s.stages == ("proxy",) and s.proxy and not s.cache_file and s.keyframes == 0


# ------------------------------------------------------------------------------------------------ core


def _stamps(film: Path, subs: list[Path]) -> InputStamps:
    return current_stamps(film, subs)


def test_a_recorded_subtitle_under_another_name_is_unchanged(tmp_path: Path) -> None:
    film = tmp_path / "Heat (1995).mkv"
    film.write_bytes(b"film")
    sub = tmp_path / "Heat (1995).en.srt"
    sub.write_text("1\n00:00:01,000 --> 00:00:02,000\nHi.\n")
    recorded = _stamps(film, [sub])
    moved = tmp_path / "Heat.1995.en.srt"
    os.rename(sub, moved)  # no longer pairs with the film by name
    assert subtitles_unchanged(recorded, _stamps(film, []), tmp_path) == (True, "")
    assert subtitles_unchanged(recorded, _stamps(film, [moved]), tmp_path)[0]
    moved.write_text(EDITED)
    same, why = subtitles_unchanged(recorded, _stamps(film, []), tmp_path)
    assert not same and ".en.srt" in why
    moved.unlink()
    assert not subtitles_unchanged(recorded, _stamps(film, []), tmp_path)[0]


def test_a_subtitle_with_content_the_record_lacks_is_a_change(tmp_path: Path) -> None:
    film = tmp_path / "Heat (1995).mkv"
    film.write_bytes(b"film")
    recorded = _stamps(film, [])
    sub = tmp_path / "Heat (1995).fr.srt"
    sub.write_text(EDITED)
    same, why = subtitles_unchanged(recorded, _stamps(film, [sub]), tmp_path)
    assert not same and "new subtitle" in why
    also = _stamps(film, [sub])  # recorded with it: the same content under another name is no change
    os.rename(sub, tmp_path / "Heat (1995).fre.srt")
    assert subtitles_unchanged(also, _stamps(film, [tmp_path / "Heat (1995).fre.srt"]), tmp_path)[0]


# ---------------------------------------------------------------------------------------------- daemon


@pytest.mark.parametrize("mode", ["inotify", "poll"])
def test_film_renamed_without_its_subtitle_keeps_results_until_the_subtitle_changes(
    runner: DaemonRunner, mode: str
) -> None:
    lib = runner.library()
    film = make_film_with_work_dir(lib / "Heat (1995)", "Heat (1995)", subtitles=(".en.srt",))
    d = runner.start([Library(lib, watch=mode)])
    new = film.path.with_name("Heat.1995.mkv")
    os.rename(film.path, new)  # the subtitle keeps the old stem
    wait_for(lambda: followed(film, new), what="work dir followed the film")
    assert stays(lambda: intact(new), PAST_SETTLE_S), work_state(new)

    sub = new.with_name("Heat.1995.en.srt")
    os.rename(film.subtitles[0], sub)  # later, the subtitle follows
    assert stays(lambda: intact(new), PAST_SETTLE_S), work_state(new)
    assert d.counter("invalidations") == 0

    sub.write_text(EDITED)  # a real change of an input
    wait_for(lambda: subtitle_stages_reset(new), what="subtitle stages reset")
    assert d.counter("invalidations") == 1


@pytest.mark.parametrize("mode", ["inotify", "poll"])
def test_subtitle_renamed_before_its_film_keeps_results(runner: DaemonRunner, mode: str) -> None:
    lib = runner.library()
    film = make_film_with_work_dir(lib / "Heat (1995)", "Heat (1995)", subtitles=(".en.srt",))
    d = runner.start([Library(lib, watch=mode)])
    sub = film.path.with_name("Heat.1995.en.srt")
    os.rename(film.subtitles[0], sub)  # the subtitle first: for a moment the film has none
    assert stays(lambda: intact(film.path), PAST_SETTLE_S), work_state(film.path)

    new = film.path.with_name("Heat.1995.mkv")
    os.rename(film.path, new)
    wait_for(lambda: followed(film, new), what="work dir followed the film")
    assert stays(lambda: intact(new), PAST_SETTLE_S), work_state(new)
    assert d.counter("invalidations") == 0

    sub.write_text(EDITED)
    wait_for(lambda: subtitle_stages_reset(new), what="subtitle stages reset")


def test_a_subtitle_truly_deleted_resets_the_subtitle_stages(runner: DaemonRunner) -> None:
    lib = runner.library()
    film = make_film_with_work_dir(lib / "Heat (1995)", "Heat (1995)", subtitles=(".en.srt",))
    runner.start([Library(lib)])
    film.subtitles[0].unlink()
    wait_for(lambda: subtitle_stages_reset(film.path), what="subtitle stages reset after the deletion")


def test_a_subtitle_deleted_from_a_work_dir_without_our_sidecar_is_noticed(runner: DaemonRunner) -> None:
    """Upstream's work dir, no sidecar of ours: the daemon remembers (in memory) what it first saw."""
    lib = runner.library()
    film = make_film_with_work_dir(lib / "Heat (1995)", "Heat (1995)", subtitles=(".en.srt",))
    film.wd.path.joinpath("cinecut_stamps.json").unlink()
    runner.start([Library(lib)])
    assert not film.wd.path.joinpath("cinecut_stamps.json").exists()
    film.subtitles[0].unlink()
    wait_for(lambda: subtitle_stages_reset(film.path), what="subtitle stages reset after the deletion")
