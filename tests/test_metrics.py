"""Prometheus metrics of a real daemon: scraped over HTTP, read from the node_exporter textfile, and the
shipped Grafana dashboard checked against what the exporter really emits.

The daemon is a real ``cinecutd run`` on a real library; scrapes go through urllib to the configured
loopback port and are parsed with prometheus_client's own parser, as Prometheus would read them.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness.checks import video_invalidated, warm
from tests.harness.films import make_film_with_work_dir
from tests.harness.mutate import new_content
from tests.harness.runner import Daemon, DaemonRunner, Library, render_config
from tests.harness.waiting import wait_for

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "packaging" / "grafana" / "cinecut-dashboard.json"

#: What the issue asks for, by the name each is exported under.
PROMISED = {
    "cinecut_build_info",
    "cinecut_films",  # by cache state
    "cinecut_invalidations_total",
    "cinecut_reclaimed_bytes_total",
    "cinecut_invalidation_latency_seconds_bucket",
    "cinecut_rescan_duration_seconds_count",  # rescans
    "cinecut_rescan_duration_seconds_sum",
    "cinecut_films_pending",
    "cinecut_deferred_total",
    "cinecut_inotify_overflows_total",
    "cinecut_prewarm_queue_length",
    "cinecut_prewarm_frames_described_total",
    "cinecut_prewarm_frames_per_second",
    "cinecut_prewarm_jobs_total",
    "cinecut_prewarm_last_success_timestamp_seconds",
    "cinecut_prewarm_gpu_yields_total",
}


def _config(runner: DaemonRunner, lib: Path, *, metrics: dict[str, object], prewarm: bool = True) -> Path:
    """A daemon config with ``[metrics]``; with pre-warm enabled but its window shut (no worker runs)."""
    text = render_config([Library(lib)], socket=runner.socket,
                         daemon={"state_dir": str(runner.base / "state")})
    if prewarm:
        model = runner.base / "model.gguf"
        model.write_bytes(b"GGUF" + bytes(64))
        hour = (datetime.now().hour + 12) % 24
        text += ("\n[prewarm]\nenabled = true\n"
                 f'window = "{hour:02d}:00-{hour:02d}:01"\n'
                 f"model = {json.dumps(str(model))}\nmmproj = {json.dumps(str(model))}\n")
    text += "\n[metrics]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in metrics.items())
    cfg = runner.base / "cinecutd.toml"
    cfg.write_text(text)
    return cfg


def _url(d: Daemon) -> str:
    listening = wait_for(lambda: d.logs("metrics_listening"), what="the metrics endpoint")
    return f"http://{listening[0]['listen']}/metrics"


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return resp.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample as {(name, sorted labels): value}, parsed by prometheus_client."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text)[(name, tuple(sorted(labels.items())))]


def names(text: str) -> set[str]:
    return {name for name, _ in samples(text)}


def _no_path_in_labels(text: str, *secrets: str) -> None:
    for (name, labels), _ in samples(text).items():
        for key, val in labels:
            assert "/" not in val or key == "version", f"{name}{{{key}={val!r}}} looks like a path"
            for secret in secrets:
                assert secret not in val, f"{name}{{{key}={val!r}}} names a film"
    for secret in secrets:
        assert secret not in text, f"{secret!r} appears in the exposition"


@pytest.fixture
def runner(tmp_path: Path):
    with DaemonRunner(tmp_path) as r:
        yield r


def test_http_metrics_are_complete_film_free_and_move_after_a_real_invalidation(runner: DaemonRunner) -> None:
    lib = runner.library()
    film = make_film_with_work_dir(lib / "Our Wedding (2019)", "Our Wedding (2019)")
    assert warm(film)
    cfg = _config(runner, lib, metrics={"listen": "127.0.0.1:0", "interval": 1})
    d = runner.daemon(cfg).start()
    url = _url(d)
    first = scrape(url)
    assert names(first) >= PROMISED, PROMISED - names(first)
    assert all(n.startswith(("cinecut_", "cinecut:")) for n in names(first))
    assert value(first, "cinecut_films", cache="valid") == 1
    assert value(first, "cinecut_invalidations_total") == 0
    assert value(first, "cinecut_rescan_duration_seconds_count") >= 1  # the startup reconcile
    assert value(first, "cinecut_build_info", version=d.status()["daemon"]["version"]) == 1
    _no_path_in_labels(first, "Our Wedding", str(lib))

    tmp = film.path.with_name(".incoming.mkv")
    tmp.write_bytes(new_content(film.path))
    os.rename(tmp, film.path)  # how Radarr upgrades a film
    wait_for(lambda: video_invalidated(film), what="the invalidation")

    def moved() -> str | None:
        text = scrape(url)
        return text if value(text, "cinecut_invalidations_total") == 1 else None

    after = wait_for(moved, timeout=10, what="the counters to move")
    assert value(after, "cinecut_reclaimed_bytes_total") > 0
    assert value(after, "cinecut_invalidation_latency_seconds_count") == 1
    assert value(after, "cinecut_invalidation_latency_seconds_bucket", le="+Inf") == 1
    assert 0 < value(after, "cinecut_invalidation_latency_seconds_sum") < 5
    assert value(after, "cinecut_films", cache="valid") == 0
    assert value(after, "cinecut_events_total") > value(first, "cinecut_events_total")
    _no_path_in_labels(after, "Our Wedding", str(lib))


def test_the_textfile_is_replaced_atomically_world_readable_and_parses(runner: DaemonRunner) -> None:
    lib = runner.library()
    make_film_with_work_dir(lib / "Heat (1995)")
    out = runner.base / "node-exporter"
    out.mkdir()
    prom = out / "cinecut.prom"
    d = runner.daemon(_config(runner, lib, metrics={"textfile": str(prom), "interval": 1})).start()
    wait_for(prom.exists, what="the textfile")
    inodes: set[int] = set()
    reads = 0
    deadline = time.monotonic() + 3.5  # three rewrites or more
    while time.monotonic() < deadline:
        try:
            fd = os.open(prom, os.O_RDONLY)
        except FileNotFoundError:
            pytest.fail("the textfile vanished between two writes")
        with os.fdopen(fd, "rb") as f:
            inodes.add(os.fstat(f.fileno()).st_ino)
            text = f.read().decode()
        reads += 1
        assert text.endswith("\n") and "cinecut_build_info" in text, "a half-written textfile was seen"
        assert names(text) >= PROMISED
        # node_exporter ignores anything but *.prom: never a second, partial *.prom beside ours
        assert [p.name for p in out.iterdir() if p.name.endswith(".prom")] == ["cinecut.prom"]
    assert len(inodes) >= 2, "each write must be a new file renamed over the old one"
    assert prom.stat().st_mode & 0o777 == 0o644  # node_exporter reads it as another user
    assert reads > 10
    assert value(prom.read_text(), "cinecut_films", cache="valid") == 1
    _no_path_in_labels(prom.read_text(), "Heat", str(lib))
    rc, _ = d.stop()
    assert rc == 0
    assert "cinecut_build_info" in prom.read_text()  # the last write on the way out is complete too


def test_a_textfile_folder_that_is_not_writable_is_reported_and_the_daemon_goes_on(runner: DaemonRunner) -> None:
    lib = runner.library()
    film = make_film_with_work_dir(lib / "Heat (1995)")
    missing = runner.base / "no-such-dir" / "cinecut.prom"
    d = runner.daemon(_config(runner, lib, metrics={"textfile": str(missing), "interval": 1})).start()
    failed = wait_for(lambda: d.logs("metrics_textfile_failed"), what="the textfile warning")
    assert failed[0]["path"] == str(missing) and "systemd-dropin" in failed[0]["remedy"]
    tmp = film.path.with_name(".incoming.mkv")
    tmp.write_bytes(new_content(film.path))
    os.rename(tmp, film.path)
    wait_for(lambda: video_invalidated(film), what="the invalidation")
    assert len(d.logs("metrics_textfile_failed")) == 1  # once, not every interval
    assert d.running


# ----------------------------------------------------------------------------------------- the dashboard

_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
                 "bool", "offset", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not functions, keywords,
    label names (inside ``{}`` and grouping clauses), durations or numbers."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    e = re.sub(r"\{[^}]*\}", "", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)  # ranges
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    found = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        word = m.group(0)
        rest = e[m.end():].lstrip()
        if rest.startswith("(") or word.lower() in _PROMQL_WORDS:
            continue
        if m.start() > 0 and (e[m.start() - 1].isdigit() or e[m.start() - 1] == "."):
            continue  # 1e3, 0.5
        found.add(word)
    return found


def test_promql_name_extraction() -> None:
    assert promql_metric_names(
        'histogram_quantile(0.99, sum by (le) (rate(cinecut_x_bucket{cache="valid"}[1h]))) / on(job) '
        "cinecut_y or vector(0)") == {"cinecut_x_bucket", "cinecut_y"}


def test_the_dashboard_references_only_metrics_the_daemon_exports(runner: DaemonRunner) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10
    referenced = set().union(*(promql_metric_names(e) for e in exprs))
    lib = runner.library()
    make_film_with_work_dir(lib / "Heat (1995)")
    d = runner.daemon(_config(runner, lib, metrics={"listen": "127.0.0.1:0", "interval": 1})).start()
    exported = names(scrape(_url(d)))
    assert referenced, exprs
    assert referenced <= exported, f"the dashboard asks for metrics nobody exports: {referenced - exported}"
    # and it covers what the issue asked to see
    for wanted in ("cinecut_films", "cinecut_invalidations_total", "cinecut_invalidation_latency_seconds_bucket",
                   "cinecut_prewarm_queue_length", "cinecut_prewarm_gpu_yields_total"):
        assert wanted in referenced


def test_scrapes_from_many_threads_while_the_daemon_works(runner: DaemonRunner) -> None:
    """Scrapes read a published snapshot, never the engine's registry: concurrent scrapes during a
    rescan all parse, and the daemon keeps answering."""
    lib = runner.library()
    for i in range(20):
        make_film_with_work_dir(lib / f"Film {i}", f"Film {i}")
    d = runner.daemon(_config(runner, lib, metrics={"listen": "127.0.0.1:0", "interval": 1})).start()
    url = _url(d)
    errors: list[BaseException] = []

    def hammer() -> None:
        try:
            for _ in range(15):
                assert value(scrape(url), "cinecut_films", cache="valid") == 20
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    d.request("rescan", timeout=30)
    for t in threads:
        t.join(60)
    assert not errors, errors[0]
    assert d.status()["films"]["total"] == 20


def test_the_dropin_grants_the_textfile_folder_and_loopback_only(runner: DaemonRunner, tmp_path: Path) -> None:
    """``cinecutd systemd-dropin`` (the real CLI) makes the textfile's folder writable and, for ``listen``,
    gives the unit the host's loopback and nothing more; systemd accepts the result and the hardening
    score stays within bounds."""
    import shutil
    import subprocess

    from test_systemd_unit import MAX_EXPOSURE, UNIT, analyze, directives, exposure, runnable_copy

    from tests.harness.runner import daemon_command

    lib = runner.library()

    def dropin(metrics: dict[str, object]) -> str:
        cfg = _config(runner, lib, metrics=metrics, prewarm=False)
        r = subprocess.run([*daemon_command(), "systemd-dropin", "--config", str(cfg)], capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        return r.stdout

    plain = dropin({})
    assert "PrivateNetwork" not in plain and "node-exporter" not in plain
    text = dropin({"textfile": "/var/lib/prometheus/node-exporter/cinecut.prom", "listen": "127.0.0.1:9817"})
    found = directives(text)
    assert ("Service", "ReadWritePaths", '"-/var/lib/prometheus/node-exporter"') in found
    assert ("Service", "PrivateNetwork", "no") in found
    assert ("Service", "IPAddressAllow", "localhost") in found
    assert not any(d[1] == "IPAddressDeny" for d in found)  # the unit's IPAddressDeny=any stays
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    (tmp_path / "verify").mkdir()
    unit = runnable_copy(tmp_path / "verify", text)
    r = analyze("verify", unit.name, cwd=unit.parent)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr
    merged = tmp_path / "score"
    merged.mkdir()
    (merged / UNIT.name).write_text(UNIT.read_text() + "\n" + text)
    assert exposure(merged) <= MAX_EXPOSURE
