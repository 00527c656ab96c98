"""Radarr/Sonarr "Connect": the webhook receiver and `cinecutd arr-hook`, against a real daemon.

Events are hints: each makes the daemon look at the named paths at once, through the same handling as an
inotify event, so an event never decides what is deleted. The payloads below have the shapes Radarr and
Sonarr send (``eventType``, ``instanceName``, ``applicationUrl``, ``movie``/``movieFile``/``deletedFiles``,
``renamedMovieFiles[].previousPath``; Sonarr's ``series``/``episodeFile``/``renamedEpisodeFiles``), posted
by a real HTTP client. Libraries polled every 60 s show that the hint, not the poll, caught the change.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from cinecut.workdir import WorkDir
from tests.harness.checks import video_invalidated, warm
from tests.harness.films import make_film_with_work_dir
from tests.harness.mutate import mv_over_from_partial, new_content, replace_in_place
from tests.harness.runner import Daemon, DaemonRunner, Library, daemon_command
from tests.harness.waiting import stays, wait_for

TOKEN = "s3cret-token-0123456789abcdef"
POLL_S = 60.0  # far longer than any wait below: what is caught in seconds was caught by the hint
CAUGHT_S = 5.0


@pytest.fixture
def runner(tmp_path: Path):
    with DaemonRunner(tmp_path) as r:
        yield r


def start(runner: DaemonRunner, libraries: list[Library], *, webhook: dict[str, Any] | None = None,
          maps: dict[str, Path] | None = None) -> Daemon:
    """A daemon with ``[webhook]`` (listening on a free loopback port) and ``[[path_map]]`` tables."""
    cfg = runner.config(libraries)
    w = {"listen": "127.0.0.1:0", "token": TOKEN, **(webhook or {})}
    extra = ["", "[webhook]", *(f"{k} = {json.dumps(v)}" for k, v in w.items())]
    for src, dest in (maps or {}).items():
        extra += ["", "[[path_map]]", f"from = {json.dumps(src)}", f"to = {json.dumps(str(dest))}"]
    cfg.write_text(cfg.read_text() + "\n".join(extra) + "\n")
    return runner.daemon(cfg).start()


def port_of(d: Daemon) -> int:
    return int(wait_for(lambda: d.status().get("webhook", {}).get("listen"), what="webhook listening")
               .rsplit(":", 1)[1])


def post(port: int, body: Any, *, token: str | None = TOKEN, how: str = "basic", path: str = "/",
         headers: dict[str, str] | None = None, method: str = "POST") -> tuple[int, dict[str, Any]]:
    """One request from a real HTTP client; (status, JSON answer)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    h = {"Content-Type": "application/json", **(headers or {})}
    if token is not None and how == "basic":  # Radarr's Username/Password fields
        h["Authorization"] = "Basic " + base64.b64encode(f"radarr:{token}".encode()).decode()
    elif token is not None and how == "bearer":
        h["Authorization"] = f"Bearer {token}"
    elif token is not None and how == "query":
        path = f"{path}?token={token}"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        conn.request(method, path, body=data if method == "POST" else None, headers=h)
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    try:
        answer = json.loads(raw) if raw else {}
    except ValueError:
        answer = {"raw": raw.decode(errors="replace")}
    return resp.status, answer


def radarr(event: str, **fields: Any) -> dict[str, Any]:
    return {"eventType": event, "instanceName": "Radarr", "applicationUrl": "http://radarr:7878", **fields}


def movie(folder: str, title: str = "Heat") -> dict[str, Any]:
    return {"id": 1, "title": title, "year": 1995, "folderPath": folder, "tmdbId": 949, "imdbId": "tt0113277"}


def movie_file(path: str, size: int = 65536) -> dict[str, Any]:
    return {"id": 7, "relativePath": path.rsplit("/", 1)[1], "path": path, "quality": "Bluray-1080p",
            "qualityVersion": 1, "releaseGroup": "GRP", "sceneName": "Heat.1995.1080p", "size": size,
            "dateAdded": "2026-12-05T06:00:00Z"}


def registered(d: Daemon, film: Path) -> bool:
    try:
        return d.film_status(film)["film"] == str(film)
    except Exception:
        return False


def clean_log(d: Daemon) -> bool:
    text = d.log_text()
    return "Traceback" not in text and "Exception in thread" not in text


# --------------------------------------------------------------------------------------------- Test event


def test_radarr_test_event_is_answered_with_every_way_of_sending_the_token(runner: DaemonRunner) -> None:
    lib = runner.library("films")
    film = make_film_with_work_dir(lib / "Heat (1995)")
    d = start(runner, [Library(lib)])
    port = port_of(d)
    for how in ("basic", "bearer", "query"):
        status, answer = post(port, radarr("Test", movie=movie("/movies/Test Movie")), how=how)
        assert (status, answer["ok"]) == (200, True), (how, answer)
    assert post(port, radarr("Test"), token=None)[0] == 401
    assert post(port, radarr("Test"), token=TOKEN[:-1] + "x")[0] == 401
    assert post(port, radarr("Test"), token=TOKEN + "x", how="bearer")[0] == 401
    assert warm(film)
    assert d.status()["webhook"]["responses"]["401"] == 3


# --------------------------------------------------------------------------------------------- polled roots


def test_a_rename_on_a_polled_root_is_followed_within_seconds(runner: DaemonRunner) -> None:
    """Radarr renames the film (and its subtitle) on a NAS polled every minute; its Rename event, in the
    container's paths, has the work dir follow the film at once: results kept, nothing recomputed."""
    lib = runner.library("nas")
    film = make_film_with_work_dir(lib / "Heat (1995)", "Heat.1995.1080p")
    d = start(runner, [Library(lib, watch="poll", poll_interval=POLL_S)], maps={"/movies": lib})
    port = port_of(d)
    new = film.path.with_name("Heat (1995) Bluray-1080p.mkv")
    os.rename(film.path, new)
    for sub in film.subtitles:
        os.rename(sub, new.with_name(new.stem + sub.name[len(film.stem):]))
    assert stays(lambda: registered(d, film.path), 0.5), "the poll caught it: the test proves nothing"
    t0 = time.monotonic()
    status, answer = post(port, radarr(
        "Rename", movie=movie("/movies/Heat (1995)"),
        renamedMovieFiles=[{**movie_file(f"/movies/Heat (1995)/{new.name}"),
                            "previousRelativePath": film.path.name,
                            "previousPath": f"/movies/Heat (1995)/{film.path.name}"}]))
    assert status == 202, answer
    wait_for(lambda: registered(d, new) and not registered(d, film.path), timeout=CAUGHT_S, what="rename followed")
    moved = WorkDir.for_film(new)
    wait_for(lambda: moved.checkpoint_path.exists() and not film.wd.path.exists(), timeout=CAUGHT_S,
             what="work dir moved along")
    assert time.monotonic() - t0 < CAUGHT_S < POLL_S
    renamed = type(film)(new, tuple(new.parent.glob(new.stem + "*.srt")))
    wait_for(lambda: warm(renamed), timeout=CAUGHT_S, what="results kept under the new name")
    assert d.counter("invalidations") == 0
    assert d.status()["hints"]["accepted"] == 1
    # The same event again (Radarr retries, or the poll reports the move later): costs a stat, changes nothing.
    assert post(port, radarr("Rename", movie=movie("/movies/Heat (1995)"),
                             renamedMovieFiles=[{**movie_file(f"/movies/Heat (1995)/{new.name}"),
                                                 "previousPath": f"/movies/Heat (1995)/{film.path.name}"}]))[0] == 202
    assert stays(lambda: warm(renamed) and registered(d, new), 1.0)
    assert d.counter("invalidations") == 0
    assert clean_log(d)


def test_an_upgrade_on_a_polled_root_is_invalidated_within_seconds(runner: DaemonRunner) -> None:
    """Radarr's upgrade writes ``<name>.partial`` and renames it over the film; its Download event with
    ``isUpgrade`` and ``deletedFiles`` gets the stale results removed long before the next poll."""
    lib = runner.library("nas")
    film = make_film_with_work_dir(lib / "Heat (1995)", "Heat (1995)")
    d = start(runner, [Library(lib, watch="poll", poll_interval=POLL_S)], maps={"/movies": lib})
    port = port_of(d)
    mv_over_from_partial(film.path, new_content(film.path, seed=5, size=70000))
    assert stays(lambda: not video_invalidated(film), 0.5)
    container = f"/movies/Heat (1995)/{film.path.name}"
    t0 = time.monotonic()
    status, answer = post(port, radarr("Download", movie=movie("/movies/Heat (1995)"),
                                       movieFile=movie_file(container, 70000), isUpgrade=True,
                                       downloadClient="qBittorrent", downloadId="ABC",
                                       deletedFiles=[movie_file(container)]))
    assert status == 202 and answer["result"]["paths"] == 1, answer  # the same path named twice: looked at once
    wait_for(lambda: video_invalidated(film), timeout=CAUGHT_S, what="upgrade invalidated")
    assert time.monotonic() - t0 < CAUGHT_S
    assert clean_log(d)


def test_sonarr_series_folder_rename_and_episode_delete(runner: DaemonRunner) -> None:
    """Sonarr renames a series folder and its episode files (``renamedEpisodeFiles``): every episode's work
    dir travels with it. An EpisodeFileDelete for a file that is gone leaves an orphan, as inotify would."""
    lib = runner.library("tv")
    old_dir = lib / "Show (2020)" / "Season 01"
    eps = [make_film_with_work_dir(old_dir, f"Show.S01E0{i}", subtitles=()) for i in (1, 2)]
    d = start(runner, [Library(lib, watch="poll", poll_interval=POLL_S)], maps={"/tv": lib})
    port = port_of(d)
    os.rename(lib / "Show (2020)", lib / "The Show (2020)")
    new_dir = lib / "The Show (2020)" / "Season 01"
    renamed = []
    for ep in eps:
        new = new_dir / f"The Show - {ep.stem[-6:]}.mkv"
        os.rename(new_dir / ep.path.name, new)
        renamed.append(new)
    payload = {"eventType": "Rename", "instanceName": "Sonarr", "applicationUrl": "",
               "series": {"id": 3, "title": "The Show", "path": "/tv/The Show (2020)", "tvdbId": 1, "type": "standard"},
               "renamedEpisodeFiles": [
                   {"id": i, "relativePath": f"Season 01/{new.name}", "path": f"/tv/The Show (2020)/Season 01/{new.name}",
                    "quality": "HDTV-720p", "size": 65536,
                    "previousRelativePath": f"Season 01/{ep.path.name}",
                    "previousPath": f"/tv/Show (2020)/Season 01/{ep.path.name}"}
                   for i, (ep, new) in enumerate(zip(eps, renamed, strict=True))]}
    assert post(port, payload, how="bearer")[0] == 202
    for new in renamed:
        wait_for(lambda new=new: registered(d, new) and WorkDir.for_film(new).checkpoint_path.exists(),
                 timeout=CAUGHT_S, what=f"{new.name} followed with its work dir")
    assert d.counter("invalidations") == 0
    gone = renamed[0]
    gone.unlink()
    status, _ = post(port, {"eventType": "EpisodeFileDelete", "instanceName": "Sonarr", "applicationUrl": "",
                            "series": {"id": 3, "path": "/tv/The Show (2020)"}, "deleteReason": "manual",
                            "episodeFile": {"id": 0, "relativePath": f"Season 01/{gone.name}",
                                            "path": f"/tv/The Show (2020)/Season 01/{gone.name}"}})
    assert status == 202
    wait_for(lambda: not registered(d, gone), timeout=CAUGHT_S, what="deleted episode forgotten")
    orphans = [o["work_dir"] for o in d.status()["orphans"]]
    assert str(WorkDir.for_film(gone).path) in orphans
    assert WorkDir.for_film(gone).cache_path.exists(), "an orphan is kept, never deleted by an event"


# --------------------------------------------------------------------------------------------- hints, not commands


def test_forged_and_stale_events_never_cost_results(runner: DaemonRunner, tmp_path: Path) -> None:
    """A delete of a film that exists, a rename to a path that does not exist, an upgrade of an unchanged
    film, and a path reached through a symlinked folder: each costs at most a stat, never a result."""
    lib = runner.library("films")
    film = make_film_with_work_dir(lib / "Heat (1995)")
    outside = tmp_path / "elsewhere"
    victim = make_film_with_work_dir(outside, "Victim")
    (lib / "link").symlink_to(outside)
    d = start(runner, [Library(lib)], maps={"/movies": lib})
    port = port_of(d)
    container = f"/movies/Heat (1995)/{film.path.name}"
    forged = [
        radarr("MovieFileDelete", movie=movie("/movies/Heat (1995)"), movieFile=movie_file(container),
               deleteReason="manual"),
        radarr("MovieDelete", movie=movie("/movies/Heat (1995)"), deletedFiles=True),
        radarr("Rename", movie=movie("/movies/Heat (1995)"),
               renamedMovieFiles=[{**movie_file("/movies/Heat (1995)/Nowhere.mkv"), "previousPath": container}]),
        radarr("Download", movie=movie("/movies/Heat (1995)"), movieFile=movie_file(container), isUpgrade=True,
               deletedFiles=[movie_file(container)]),
    ]
    for payload in forged * 3:  # duplicated too
        assert post(port, payload)[0] == 202
    # Through the symlinked folder (never watched): the film there changed, yet the hint must not reach it.
    replace_in_place(victim.path, new_content(victim.path, seed=9))
    assert post(port, radarr("Download", movieFile=movie_file(f"/movies/link/{victim.path.name}")))[0] == 202
    wait_for(lambda: d.status()["hints"]["pending"] == 0 and d.counter("hints") == 13, what="hints applied")
    assert d.counter("hints_refused_symlink") >= 1
    assert stays(lambda: warm(film) and registered(d, film.path), 1.0)
    assert victim.wd.cache_path.exists() and not registered(d, victim.path)
    assert d.counter("invalidations") == 0 and d.status()["films"]["orphaned"] == 0
    assert d.counter("hints_ignored") == 3  # the rename to nowhere, each time
    assert clean_log(d)


# --------------------------------------------------------------------------------------------- refusals


def test_bad_requests_are_refused_with_a_clear_status_and_the_daemon_goes_on(runner: DaemonRunner) -> None:
    lib = runner.library("films")
    film = make_film_with_work_dir(lib / "Heat (1995)")
    d = start(runner, [Library(lib)], maps={"/movies": lib},
              webhook={"max_body_bytes": 4096, "max_requests_per_minute": 60, "threads": 3})
    port = port_of(d)
    ok = radarr("Download", movie=movie("/movies/Heat (1995)"),
                movieFile=movie_file(f"/movies/Heat (1995)/{film.path.name}"))
    assert post(port, ok, token="wrong-token-wrong-token")[0] == 401
    assert post(port, {**ok, "padding": "x" * 10_000})[0] == 413
    assert post(port, b'{"eventType": "Download", ')[0] == 400
    assert post(port, b"\xff\xfe not utf-8")[0] == 400
    assert post(port, b"[1, 2, 3]")[0] == 400
    assert post(port, b'{"eventType": NaN}')[0] == 400
    assert post(port, {"instanceName": "Radarr"})[0] == 400
    assert post(port, radarr("Download", movieFile="not an object", deletedFiles="nope"))[0] == 400
    assert post(port, ok, method="GET")[0] == 405
    status, answer = post(port, radarr("Download", movieFile=movie_file("/etc/passwd.mkv")))
    assert status == 422 and "path_map" in answer["message"], answer
    assert post(port, radarr("Download", movieFile=movie_file("/movies/../../etc/x.mkv")))[0] == 422
    assert post(port, radarr("Download", movieFile=movie_file("relative/Heat.mkv")))[0] == 422
    assert post(port, radarr("Download", movieFile=movie_file(str(lib))))[0] == 422  # unmapped host path: outside
    # A flood from 25 clients at once: bounded by the rate limit and the thread limit, refused with 429/503.
    statuses: list[int] = []
    lock = threading.Lock()

    def flood(n: int) -> None:
        for _ in range(n):
            try:
                s = post(port, ok)[0]
            except OSError:
                s = -1
            with lock:
                statuses.append(s)

    threads = [threading.Thread(target=flood, args=(20,)) for _ in range(25)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(statuses) == 500
    assert set(statuses) <= {202, 429, 503}, sorted(set(statuses))
    assert statuses.count(202) <= 61 and statuses.count(429) > 0
    # Unaffected: status answers, a real change is still acted on live, nothing died.
    assert d.request("ping")["pong"]
    replace_in_place(film.path)
    wait_for(lambda: video_invalidated(film), what="live invalidation after the flood")
    assert d.status()["webhook"]["state"] == "listening"
    assert d.status()["hints"]["pending"] == 0
    assert clean_log(d)


# --------------------------------------------------------------------------------------------- arr-hook


def arr_hook(d: Daemon | Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    sock = d.socket if isinstance(d, Daemon) else d
    base = {k: v for k, v in os.environ.items() if not k.lower().startswith(("radarr_", "sonarr_"))}
    return subprocess.run([*daemon_command(), "arr-hook", "--socket", str(sock)], env={**base, **env},
                          capture_output=True, text=True, timeout=30)


def test_arr_hook_forwards_radarr_and_sonarr_events(runner: DaemonRunner) -> None:
    """The custom script as Radarr runs it: Radarr_* variables (as .NET hands them over: lower case)."""
    lib = runner.library("nas")
    film = make_film_with_work_dir(lib / "Heat (1995)")
    other = make_film_with_work_dir(lib / "Ronin (1998)", "Ronin (1998)")
    d = start(runner, [Library(lib, watch="poll", poll_interval=POLL_S)], webhook={"listen": ""},
              maps={"/movies": lib})
    assert "webhook" not in d.status()
    r = arr_hook(d, {"Radarr_EventType": "Test"})
    assert r.returncode == 0 and "answers" in r.stdout, r
    r = arr_hook(d, {"radarr_eventtype": "Grab", "radarr_movie_title": "Heat"})
    assert r.returncode == 0, r
    # An upgrade, caught within seconds on a root polled every minute.
    mv_over_from_partial(film.path, new_content(film.path, seed=3))
    t0 = time.monotonic()
    r = arr_hook(d, {"radarr_eventtype": "Download", "radarr_isupgrade": "True",
                     "radarr_movie_path": "/movies/Heat (1995)",
                     "radarr_moviefile_path": f"/movies/Heat (1995)/{film.path.name}",
                     "radarr_deletedpaths": f"/movies/Heat (1995)/{film.path.name}"})
    assert r.returncode == 0, r
    wait_for(lambda: video_invalidated(film), timeout=CAUGHT_S, what="upgrade invalidated")
    assert time.monotonic() - t0 < CAUGHT_S
    # A rename, Radarr's |-separated lists.
    new = other.path.with_name("Ronin (1998) Remux.mkv")
    os.rename(other.path, new)
    r = arr_hook(d, {"Radarr_EventType": "Rename", "Radarr_Movie_Path": "/movies/Ronin (1998)",
                     "Radarr_MovieFile_Paths": f"/movies/Ronin (1998)/{new.name}",
                     "Radarr_MovieFile_PreviousPaths": f"/movies/Ronin (1998)/{other.path.name}"})
    assert r.returncode == 0, r
    wait_for(lambda: registered(d, new) and WorkDir.for_film(new).checkpoint_path.exists(), timeout=CAUGHT_S,
             what="rename followed")
    # Sonarr's names for the same things.
    r = arr_hook(d, {"Sonarr_EventType": "Download", "Sonarr_EpisodeFile_Path": "/tv/elsewhere/S01E01.mkv"})
    assert r.returncode == 1 and "not below any library root" in r.stderr, r
    assert d.counter("invalidations") == 1
    # The daemon down: a clear message, fast, non-zero; Radarr is not held up.
    d.stop()
    t0 = time.monotonic()
    r = arr_hook(d, {"Radarr_EventType": "Download", "Radarr_MovieFile_Path": "/movies/x.mkv"})
    assert r.returncode == 3 and "not running" in r.stderr, r
    assert time.monotonic() - t0 < 10
    r = arr_hook(d, {"Radarr_EventType": "Test"})
    assert r.returncode == 0 and "does not answer" in r.stderr, r
    assert arr_hook(d, {}).returncode == 2


def test_systemd_dropin_opens_the_network_only_for_the_webhook(runner: DaemonRunner) -> None:
    lib = runner.library("films")
    cfg = runner.config([Library(lib)])
    base = subprocess.run([*daemon_command(), "systemd-dropin", "--config", str(cfg)], capture_output=True,
                          text=True, timeout=30)
    assert base.returncode == 0 and "PrivateNetwork" not in base.stdout, base
    cfg.write_text(cfg.read_text() + f'\n[webhook]\nlisten = "172.17.0.1:8787"\ntoken = "{TOKEN}"\n'
                   'allow = ["172.17.0.0/16"]\n')
    r = subprocess.run([*daemon_command(), "systemd-dropin", "--config", str(cfg)], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r
    lines = r.stdout.splitlines()
    assert "PrivateNetwork=no" in lines
    assert "RestrictAddressFamilies=AF_UNIX AF_INET" in lines
    assert "IPAddressAllow=172.17.0.0/16" in lines


def test_the_hint_command_checks_its_arguments(runner: DaemonRunner) -> None:
    from cinecutd.client import DaemonError

    lib = runner.library("films")
    film = make_film_with_work_dir(lib / "Heat (1995)")
    d = start(runner, [Library(lib)], webhook={"listen": ""})
    for bad in ({"paths": "not a list"}, {"paths": [1, 2]}, {"moves": [["only one"]]}, {"moves": "x"}):
        with pytest.raises(DaemonError) as err:
            d.request("hint", event="Download", **bad)
        assert err.value.code == "bad_request", bad
    with pytest.raises(DaemonError) as err:
        d.request("hint", event="Download", paths=[str(lib)])  # the root itself is not a film
    assert err.value.code == "outside_libraries"
    with pytest.raises(DaemonError) as err:
        d.request("hint", event="Download", paths=["/x"] * 6000)
    assert err.value.code == "too_many_paths"
    assert d.request("hint", event="Download", paths=[str(film.path)])["queued"]
    assert d.request("ping")["pong"] and warm(film)


# --------------------------------------------------------------------------------------------- config


def test_path_map_is_longest_prefix_by_whole_components() -> None:
    from cinecutd.config import PathMapConfig
    from cinecutd.pathmap import PathMap, PathRefused

    m = PathMap([PathMapConfig(Path("/movies"), Path("/srv/films")),
                 PathMapConfig(Path("/movies/4k"), Path("/nas/4k"))])
    assert m("/movies/Heat/Heat.mkv") == "/srv/films/Heat/Heat.mkv"
    assert m("/movies/4k/Heat.mkv") == "/nas/4k/Heat.mkv"
    assert m("/movies/4kHDR/Heat.mkv") == "/srv/films/4kHDR/Heat.mkv"
    assert m("/movies2/Heat.mkv") == "/movies2/Heat.mkv"
    assert m("//movies/./Heat//x.mkv") == "/srv/films/Heat/x.mkv"
    assert m("/movies/../etc/passwd") == "/etc/passwd"  # no escaping a mapping with ".."
    assert m("/movies") == "/srv/films"
    for bad in ("movies/x.mkv", "", "/a\x00b", None, 5):
        with pytest.raises(PathRefused):
            m(bad)


@pytest.mark.parametrize(("text", "error"), [
    ('[webhook]\nlisten = "0.0.0.0:8787"\n', "webhook.token: is required when listen is not a loopback address"),
    ('[webhook]\nlisten = "localhost:8787"\n', 'webhook.listen: must be "IP:PORT"'),
    ('[webhook]\nlisten = "127.0.0.1:99999"\n', "webhook.listen: port must be 0 to 65535"),
    ('[webhook]\ntoken = "short"\n', "webhook.token: must be at least 16"),
    ('[webhook]\ntoken = "0123456789abcdef0"\ntoken_file = "/etc/t"\n', "webhook.token_file: give either"),
    ('[webhook]\nallow = ["nonsense"]\n', "webhook.allow: [0] must be an IP address or network"),
    ('[path_map]\nfrom = "/a"\nto = "/b"\n', "path_map: must be an array of tables"),
    ('[[path_map]]\nfrom = "/a"\n', "path_map[0].to: is required"),
    ('[[path_map]]\nfrom = "a"\nto = "/b"\n', "path_map[0].from: must be an absolute path"),
    ('[[path_map]]\nfrom = "/a/"\nto = "/b"\n[[path_map]]\nfrom = "/a"\nto = "/c"\n',
     'path_map[1].from: "/a" is already path_map[0].from'),
])
def test_webhook_and_path_map_config_errors(tmp_path: Path, text: str, error: str) -> None:
    from cinecutd.config import ConfigError, load_config

    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[[library]]\npath = "{tmp_path}"\n' + text)
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert error in str(err.value)


def test_a_token_file_readable_by_others_keeps_the_webhook_off(runner: DaemonRunner) -> None:
    lib = runner.library("films")
    token_file = runner.base / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o644)
    d = start(runner, [Library(lib)], webhook={"token": "", "token_file": str(token_file)})
    webhook = d.status()["webhook"]
    assert webhook["state"] == "failed" and "readable by others" in webhook["error"], webhook
    assert any("readable by others" in r.get("error", "") for r in d.logs("webhook_failed"))
    check = subprocess.run([*daemon_command(), "status", "--check", "--socket", str(d.socket)], capture_output=True,
                           text=True, timeout=30)
    assert check.returncode == 1 and "readable by others" in check.stdout, check
    token_file.chmod(0o600)
    d = runner.restart(d)
    status, _ = post(port_of(d), radarr("Test"), how="bearer")
    assert status == 200
    check = subprocess.run([*daemon_command(), "status", "--check", "--socket", str(d.socket)], capture_output=True,
                           text=True, timeout=30)
    assert check.returncode == 0 and check.stdout.strip() == "healthy", check


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
@pytest.mark.parametrize("listen", ["127.0.0.1:8787", "172.17.0.1:8787"])
def test_the_webhook_dropin_verifies_and_keeps_the_unit_hardened(tmp_path: Path, listen: str) -> None:
    from test_systemd_unit import MAX_EXPOSURE, UNIT, analyze, exposure, runnable_copy

    from cinecutd.config import parse_config
    from cinecutd.dropin import render_dropin
    from cinecutd.webhook import dropin_lines

    cfg = parse_config({"library": [{"path": "/srv/media/films"}],
                        "webhook": {"listen": listen, "token": TOKEN, "allow": [] if "127." in listen else
                                    ["172.17.0.0/16"]}}, tmp_path / "c.toml")
    dropin = render_dropin(["/srv/media/films"]) + "".join(f"{line}\n" for line in dropin_lines(cfg.webhook))
    verify_dir = tmp_path / "verify"
    verify_dir.mkdir()
    unit = runnable_copy(verify_dir, dropin)
    r = analyze("verify", unit.name, cwd=verify_dir)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr
    (tmp_path / UNIT.name).write_text(UNIT.read_text() + "\n" + dropin)
    score = exposure(tmp_path)
    print(f"systemd-analyze security --offline=yes with the webhook drop-in ({listen}): {score}")
    assert score <= MAX_EXPOSURE


def test_silent_and_trickling_clients_cannot_hold_the_webhook(runner: DaemonRunner) -> None:
    """Connections that never finish their request hold a thread for at most the request deadline; the
    connection beyond ``threads`` is answered 503 at once, and the control socket never waits."""
    import socket

    from cinecutd.webhook import REQUEST_DEADLINE_S

    lib = runner.library("films")
    d = start(runner, [Library(lib)], webhook={"threads": 2})
    port = port_of(d)
    silent = socket.create_connection(("127.0.0.1", port))
    trickle = socket.create_connection(("127.0.0.1", port))
    stop = threading.Event()

    def drip() -> None:
        for byte in b"POST / HTTP/1.1\r\nHost: x\r\n" * 100:
            if stop.wait(0.5):
                return
            try:
                trickle.send(bytes([byte]))
            except OSError:
                return

    dripper = threading.Thread(target=drip)
    dripper.start()
    try:
        t0 = time.monotonic()
        wait_for(lambda: post(port, radarr("Test"))[0] == 503, what="both threads held")
        assert d.request("ping", timeout=2)["pong"]
        wait_for(lambda: post(port, radarr("Test"))[0] == 200, timeout=REQUEST_DEADLINE_S + 10,
                 what="the held threads freed at the deadline")
        assert time.monotonic() - t0 < REQUEST_DEADLINE_S + 10
        silent.settimeout(5)
        assert silent.recv(1024) == b""  # cut off, without an answer it never asked for
    finally:
        stop.set()
        dripper.join()
        silent.close()
        trickle.close()
    assert clean_log(d)


def test_a_big_hint_is_applied_in_turns_and_a_big_folder_becomes_a_rescan(runner: DaemonRunner) -> None:
    from cinecutd.hints import FOLDER_RESCAN_FILMS, PATHS_PER_TURN
    from tests.harness.films import make_film

    lib = runner.library("films")
    film = make_film_with_work_dir(lib / "Heat (1995)")
    for i in range(FOLDER_RESCAN_FILMS + 1):
        make_film(lib / "All" / f"F{i}", f"F{i}", size=4096, subtitles=(), trailer=None)
    d = start(runner, [Library(lib, watch="poll", poll_interval=POLL_S)], webhook={"listen": ""})
    replace_in_place(film.path)
    gone = [f"{lib}/G/{i}.mkv" for i in range(20 * PATHS_PER_TURN)]
    assert d.request("hint", event="Download", paths=[*gone, str(film.path)])["queued"]
    wait_for(lambda: video_invalidated(film), timeout=CAUGHT_S, what="the last path of a big hint")
    wait_for(lambda: d.status()["hints"]["pending"] == 0, what="hint done")
    assert d.counter("hints") == 1 and d.counter("hint_events") == len(gone) + 1
    rescans = d.counter("rescans")
    assert d.request("hint", event="MovieDelete", paths=[str(lib / "All")])["queued"]
    wait_for(lambda: d.counter("hint_rescans") == 1 and d.counter("rescans") == rescans + 1, what="a rescan")
    assert d.counter("hint_events") == len(gone) + 1  # no burst of events for the big folder
    assert d.status()["films"]["total"] == FOLDER_RESCAN_FILMS + 2


def test_the_webhook_follows_a_reload(runner: DaemonRunner) -> None:
    lib = runner.library("films")
    d = start(runner, [Library(lib)], webhook={"listen": ""})
    assert "webhook" not in d.status()
    text = d.config.read_text().replace('listen = ""', 'listen = "127.0.0.1:0"')
    d.reload(text)
    port = port_of(d)
    assert post(port, radarr("Test"))[0] == 200
    d.reload(text.replace('listen = "127.0.0.1:0"', 'listen = ""'))
    wait_for(lambda: "webhook" not in d.status(), what="webhook off after reload")
    with pytest.raises(OSError):
        post(port, radarr("Test"))
