"""Salvage end to end: a subtitle edited while ``cinecutd run`` watches; the invalidation salvages, the
pre-warm worker describes only the new keyframes, and ``cinecutd status`` says so.

Real daemon, real inotify, real worker with the tiny LLaVA; nothing mocked. The frames the worker
computed are read from its own report, the descriptions from the cache upstream loads.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from test_prewarm_daemon import JOB_S, Setup, cli, film_pw, pw, runner  # noqa: F401 - runner is a fixture
from test_salvage import by_key, retimed, write_srt

from cinecut.inference.cache import load_cache
from cinecut.inference.salvage import SALVAGE_NAME
from cinecut.workdir import WorkDir
from tests.harness.waiting import wait_for


@pytest.fixture
def s(runner, tiny_llava, synthetic_film_template) -> Iterator[Setup]:  # noqa: F811 - runner is the fixture
    setup = Setup(runner, tiny_llava, synthetic_film_template)
    yield setup
    setup.gate.release()


def test_a_subtitle_edited_under_the_daemon_is_salvaged_and_prewarm_describes_only_new_frames(s: Setup) -> None:
    d = s.start()
    film = s.drop()
    wait_for(lambda: pw(d)["completed"] == 1, JOB_S, what="the first pre-warm")
    wd = WorkDir.for_film(film)
    old = by_key(load_cache(film, wd) or [])
    assert old

    # Held back while the edit lands, so the waiting store can be seen in the status.
    assert d.request("pause")["paused"] is True
    write_srt(film.with_suffix(".srt"), retimed(s.template.events, (1, 4), 0.4))
    inv = wait_for(lambda: [r for r in d.logs("invalidated") if r.get("salvaged")], 20,
                   what="the subtitle edit invalidated with a salvage")
    assert inv[-1]["salvaged"] == f"salvaged {len(old)} of {len(old)} frames"
    assert not wd.cache_path.exists() and (wd.path / SALVAGE_NAME).is_file()
    assert d.film_status(film)["salvage"] == {"frames": len(old), "of": len(old)}
    human = cli("cinecutd", "status", str(film), "--socket", str(d.socket))
    assert human.returncode == 0, human.stderr
    assert f"{len(old)} descriptions of {len(old)} frames kept" in " ".join(human.stdout.split())

    d.request("resume")
    wait_for(lambda: pw(d)["completed"] == 2, JOB_S, what="the pre-warm after the edit")
    new = by_key(load_cache(film, wd) or [])
    assert new, "no valid cache after the second pre-warm"
    fresh, kept = set(new) - set(old), set(new) & set(old)
    assert fresh and kept
    last = film_pw(d, film)["last"]
    assert last["outcome"] == "done"
    assert (last["frames_computed"], last["frames_salvaged"], last["frames"]) == (len(fresh), len(kept), len(new))
    assert all(new[k] == old[k] for k in kept)
    logged = d.logs("prewarm_salvaged")
    assert [r["summary"] for r in logged] == [f"salvaged {len(kept)} of {len(new)} frames"]
    assert not (wd.path / SALVAGE_NAME).exists() and d.film_status(film)["salvage"] is None
    human = cli("cinecutd", "status", str(film), "--socket", str(d.socket))
    assert f"salvaged {len(kept)} of {len(new)} frames" in " ".join(human.stdout.split())
