"""`cinecutd status` shows what the pre-warm achieves: the last job's frames/s, films per night, nights left."""

from __future__ import annotations

import json
from datetime import time as dtime
from pathlib import Path

import pytest
from test_prewarm_daemon import JOB_S, Setup, cli, pw, runner, s  # noqa: F401 (fixtures)

from cinecutd.config import Window
from cinecutd.prewarm.throughput import Throughput, estimate, window_hours
from tests.harness.waiting import wait_for


def test_window_hours_and_the_nights_a_queue_needs() -> None:
    assert window_hours(Window.parse("01:00-06:00")) == 5
    assert window_hours(Window.parse("22:30-06:00")) == 7.5  # across midnight
    assert window_hours(Window(dtime(6), dtime(5, 59))) == pytest.approx(23 + 59 / 60)
    assert window_hours(Window.parse("always")) == 24
    # 0.5 frames/s over a 5 h window is 9,000 frames: 7.5 films of 1,200 keyframes; 20 films need 3 nights.
    assert estimate(fps=0.5, frames_per_film=1200, films_left=20, hours_per_night=5) == {
        "films_per_night": 7.5, "nights_needed": 3}  # fmt: skip
    assert estimate(fps=0.5, frames_per_film=1200, films_left=0, hours_per_night=5)["nights_needed"] == 0
    assert estimate(fps=0.0, frames_per_film=1200, films_left=3, hours_per_night=5)["nights_needed"] is None
    t = Throughput()
    assert (
        t.status(films_left=4, window=Window.parse("01:00-06:00"))["nights_needed"] is None
    )  # nothing measured
    t.record("/films/A.mkv", 0.5, 1000, 1.0)
    t.record("/films/B.mkv", 0.25, 1400, 2.0)
    t.record("/films/C.mkv", 0.0, 1400, 3.0)  # a cache hit computes nothing: not a measurement
    got = t.status(films_left=4, window=Window.parse("01:00-06:00"))
    assert (got["last_fps"], got["last_film"], got["frames_per_film"]) == (0.25, "/films/B.mkv", 1200)
    assert (got["films_per_night"], got["nights_needed"]) == (3.75, 2)


def test_status_shows_the_last_jobs_speed_and_the_nights_the_queue_needs(s: Setup, tmp_path: Path) -> None:  # noqa: F811
    d = s.start()
    first = s.drop("Alpha (2001)", slow=False)
    wait_for(lambda: pw(d)["completed"] == 1, JOB_S, what="the first pre-warm")
    done = d.logs("prewarm_done")[-1]
    d.request("pause")
    second = s.drop("Beta (2002)", slow=False)
    wait_for(lambda: pw(d)["queue"] == [str(second)], 20, what="the second film queued")
    r = cli("cinecutd", "status", "--json", "--socket", str(d.socket))
    assert r.returncode == 0, r.stderr
    t = json.loads(r.stdout)["prewarm"]["throughput"]
    assert t["last_film"] == str(first) and t["last_fps"] == pytest.approx(done["fps"], abs=1e-3)
    assert t["last_fps"] > 0 and t["frames_per_film"] == done["frames"]
    assert (t["films_left"], t["window_hours"], t["nights_needed"]) == (1, 24, 1)
    assert t["films_per_night"] == pytest.approx(t["last_fps"] * 24 * 3600 / done["frames"], rel=0.01)
    human = cli("cinecutd", "status", "--socket", str(d.socket))
    assert human.returncode == 0, human.stderr
    assert f"throughput: {t['last_fps']:.2f} frames/s (last job: {first})" in human.stdout
    assert "1 films left: 1 night" in human.stdout
    # The default `parallel = 0` reached the worker: it chose its batch size and logged the KV cache.
    started = next(r for r in d.logs("prewarm_started") if r["film"] == str(first))
    assert "parallel = auto: 16 sequences (CPU inference: " in Path(started["log"]).read_text()
