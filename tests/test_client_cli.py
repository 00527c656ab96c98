"""The `cinecutd` client commands against a real control socket, run as the installed entry point."""

from __future__ import annotations

import grp
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from cinecutd import render
from cinecutd.client import DaemonNotRunning, resolve_socket
from cinecutd.config import CONFIG_ENV, DEFAULT_SOCKET
from cinecutd.control import ControlError, ControlServer, Router

CINECUTD = Path(sys.executable).parent / "cinecutd"

STATUS: dict[str, Any] = {
    "daemon": {"pid": 4242, "version": "0.1.0", "uptime_s": 7384, "started_at": "2024-05-01T10:00:00+00:00"},
    "roots": [
        {"path": "/srv/media/films", "watch": "inotify", "state": "watching", "films": 10230},
        {"path": "/mnt/nas/films", "watch": "poll", "state": "poll-fallback", "films": 4},
    ],
    "films": {"total": 10234, "warm": 9876, "cold": 321, "stale_fixed": 17, "orphaned": 3, "conflicts": 1,
              "copying": 2},
    "conflicts": [{"work_dir": "/srv/media/films/Heat/Heat_cinecut_work",
                   "films": ["/srv/media/films/Heat/Heat.mkv", "/srv/media/films/Heat/Heat.mp4"]}],
    "orphans": [{"work_dir": "/srv/media/films/Gone/Gone_cinecut_work", "bytes": 1_610_612_736}],
    "pending": [{"film": "/srv/media/films/Locked/Locked.mkv", "reason": "video changed; work dir locked",
                 "since": 1714557600.5}],
    "recent_invalidations": [
        {"film": "/srv/media/films/Alien (1979)/Alien (1979).mkv", "reason": "video replaced",
         "stages": ["proxy", "subtitles", "keyframes"], "files_removed": 1843, "bytes_reclaimed": 734_003_200,
         "latency_ms": 3.7, "at": 1714557700.0},
    ],
    "counters": {"events": 123456, "revalidations": 5432, "invalidations": 77, "bytes_reclaimed": 9_999_000_000,
                 "rescans": 12},
    "prewarm": {"enabled": True, "state": "running", "next_window": "2024-05-02T01:00:00",
                "current": {"film": "/srv/media/films/New (2024)/New (2024).mkv", "done": 120, "total": 2000,
                            "fps": 3.25, "eta_s": 590},
                "queue": ["/srv/media/films/B/B.mkv", "/srv/media/films/C/C.mkv"],
                "failures": [{"film": "/srv/media/films/Bad/Bad.mkv", "reason": "worker crashed (SIGSEGV)",
                              "at": 1714550000}]},
}

FILM: dict[str, Any] = {
    "film": "/srv/media/films/Heat (1995)/Heat (1995).mkv",
    "work_dir": "/srv/media/films/Heat (1995)/Heat (1995)_cinecut_work",
    "stamp": {"mtime": 1714557600.123456, "size": 12_345_678_901},
    "cache": {"state": "valid", "path": "/srv/media/films/Heat (1995)/Heat (1995)_cinecut_work/"
                                        "Heat (1995).scenedesc.msgpack", "records": 2345},
    "stages_complete": ["proxy", "subtitles", "keyframes"],
    "checkpoint": "ok",
    "subtitles": ["/srv/media/films/Heat (1995)/Heat (1995).en.srt"],
    "last_event": {"kind": "moved", "at": 1714557600},
    "pending": None,
    "prewarm": {"state": "done"},
}


class FakeDaemon:
    """The daemon's side of the protocol, with canned answers; records what the client asked."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def router(self) -> Router:
        def status(film: str | None = None) -> dict[str, Any]:
            self.calls.append(("status", {"film": film}))
            if film is None:
                return STATUS
            if not film.endswith(".mkv"):
                raise ControlError("not_found", f"{film} is not a film under a watched library")
            return {**FILM, "film": film}

        def gc(apply: bool = False) -> dict[str, Any]:
            self.calls.append(("gc", {"apply": apply}))
            orphan = {"work_dir": STATUS["orphans"][0]["work_dir"], "bytes": 1_610_612_736,
                      "reclaimable": ["Gone.scenedesc.msgpack", "Gone_proxy.mp4", "keyframes"],
                      "kept": ["TRAILER_MANIFEST.json"], "removed_dir": False, "error": None}
            locked = {"work_dir": "/srv/media/films/Busy/Busy_cinecut_work", "bytes": 0, "reclaimable": [],
                      "kept": [], "removed_dir": False, "error": "work dir locked by a running pipeline"}
            return {"applied": apply, "orphans": [orphan, locked] if apply else [orphan]}

        def prewarm(film: str, now: bool = False, retry: bool = False) -> dict[str, Any]:
            self.calls.append(("prewarm", {"film": film, "now": now, "retry": retry}))
            return {"message": f"queued {film} at position 1"}

        def simple(name: str) -> Any:
            def fn() -> dict[str, Any]:
                self.calls.append((name, {}))
                if name == "rescan":
                    return {"reason": "requested", "films": 10234, "orphans": 3, "conflicts": 1,
                            "duration_s": 0.4123}
                return {"message": f"{name} done"}
            return fn

        return Router({"status": status, "gc": gc, "prewarm": prewarm, "rescan": simple("rescan"),
                       "pause": simple("pause"), "resume": simple("resume")})


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[FakeDaemon, Path]]:
    fake = FakeDaemon()
    path = tmp_path / "cinecutd.sock"
    with ControlServer(path, fake.router()):
        yield fake, path


def cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
        prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != CONFIG_ENV}
    return subprocess.run([*prefix, str(CINECUTD), *args], capture_output=True, text=True, timeout=30,
                          env={**base, **(env or {})}, cwd=cwd)


# --------------------------------------------------------------------------------------------- commands


def test_status_summary_shows_the_key_numbers(daemon: tuple[FakeDaemon, Path]) -> None:
    _, sock = daemon
    proc = cli("status", "--socket", str(sock))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for needle in ("pid 4242", "0.1.0", "up 2h 03m", "/srv/media/films", "/mnt/nas/films", "poll-fallback",
                   "10230", "10234 total", "9876 warm", "321 cold", "17 stale-fixed", "3 orphaned",
                   "1 same-stem conflicts", "2 copying", "Heat.mp4", "Gone_cinecut_work", "1.5 GiB",
                   "Locked.mkv", "work dir locked", "Alien (1979).mkv", "video replaced", "proxy, subtitles",
                   "1843", "700.0 MiB", "3.7 ms", "events 123456", "revalidations 5432", "invalidations 77",
                   "rescans 12", "running", "120/2000 frames (6 %)", "3.25 fps", "ETA 9m 50s",
                   "queue (2)", "worker crashed (SIGSEGV)"):
        assert needle in out, f"{needle!r} missing from:\n{out}"
    assert proc.stderr == ""


def test_status_json_is_the_raw_result(daemon: tuple[FakeDaemon, Path]) -> None:
    fake, sock = daemon
    proc = cli("status", "--socket", str(sock), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == STATUS
    assert fake.calls == [("status", {"film": None})]


def test_status_of_one_film(daemon: tuple[FakeDaemon, Path], tmp_path: Path) -> None:
    fake, sock = daemon
    proc = cli("status", "--socket", str(sock), FILM["film"])
    assert proc.returncode == 0, proc.stderr
    for needle in ("Heat (1995)_cinecut_work", "12345678901 bytes", "11.5 GiB", "1714557600.123456", "valid",
                   "2345 records", "proxy, subtitles, keyframes", "Heat (1995).en.srt", "moved at", "none"):
        assert needle in proc.stdout, f"{needle!r} missing from:\n{proc.stdout}"
    # a relative path is sent absolute; --json gives the detail as sent by the daemon
    (tmp_path / "Local.mkv").write_bytes(b"")
    proc = cli("status", "--socket", str(sock), "--json", "Local.mkv", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["film"] == str(tmp_path / "Local.mkv")
    assert fake.calls[-1] == ("status", {"film": str(tmp_path / "Local.mkv")})


def test_daemon_error_exits_1_with_its_message(daemon: tuple[FakeDaemon, Path]) -> None:
    _, sock = daemon
    proc = cli("status", "--socket", str(sock), "/srv/notes.txt")
    assert proc.returncode == 1
    assert proc.stderr == "cinecutd: /srv/notes.txt is not a film under a watched library (not_found)\n"
    assert proc.stdout == ""


def test_gc_rescan_prewarm_pause_resume(daemon: tuple[FakeDaemon, Path]) -> None:
    fake, sock = daemon
    proc = cli("gc", "--socket", str(sock))
    assert proc.returncode == 0, proc.stderr
    assert "Gone_cinecut_work" in proc.stdout and "Dry run: 1.5 GiB could be reclaimed" in proc.stdout
    proc = cli("gc", "--apply", "--socket", str(sock))
    assert "Deleted the regenerable data of 1 orphaned work dir(s): 1.5 GiB reclaimed; 1 failed" in proc.stdout
    assert "error: work dir locked by a running pipeline" in proc.stdout
    proc = cli("prewarm", "/srv/media/films/X/X.mkv", "--now", "--retry", "--socket", str(sock))
    assert proc.returncode == 0 and proc.stdout == "queued /srv/media/films/X/X.mkv at position 1\n"
    for cmd, expected in (("rescan", "Rescanned: 10234 films, 3 orphaned work dirs, 1 same-stem conflicts in "
                                     "412.3 ms\n"), ("pause", "pause done\n"), ("resume", "resume done\n")):
        proc = cli(cmd, "--socket", str(sock))
        assert (proc.returncode, proc.stdout) == (0, expected), proc.stderr
    assert fake.calls == [("gc", {"apply": False}), ("gc", {"apply": True}),
                          ("prewarm", {"film": "/srv/media/films/X/X.mkv", "now": True, "retry": True}),
                          ("rescan", {}), ("pause", {}), ("resume", {})]


# --------------------------------------------------------------------------------------------- socket


def test_not_running_exits_3(tmp_path: Path) -> None:
    missing = tmp_path / "nothing.sock"
    proc = cli("status", "--socket", str(missing))
    assert proc.returncode == 3
    assert proc.stderr.startswith(f"cinecutd: cinecutd is not running (no daemon listening on {missing})")
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()
    proc = cli("rescan", "--socket", str(stale))
    assert proc.returncode == 3 and str(stale) in proc.stderr


def test_socket_comes_from_the_config(daemon: tuple[FakeDaemon, Path], tmp_path: Path) -> None:
    _, sock = daemon
    cfg = tmp_path / "d.toml"
    cfg.write_text(f'[[library]]\npath = "/srv/films"\n[control]\nsocket = "{sock}"\n')
    proc = cli("status", "--config", str(cfg), "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["films"]["total"] == 10234
    proc = cli("status", "--json", env={CONFIG_ENV: str(cfg)})
    assert proc.returncode == 0 and json.loads(proc.stdout)["films"]["total"] == 10234
    bad = tmp_path / "bad.toml"
    bad.write_text('[[library]]\npath = "/srv/films"\n[control]\nsocket = 5\n')
    proc = cli("status", "--config", str(bad))
    assert proc.returncode == 78
    assert proc.stderr == f"cinecutd: {bad}: control.socket: must be a string, got 5\n"
    proc = cli("status", "--config", str(cfg), "--socket", str(sock))
    assert proc.returncode == 2 and "not allowed with argument" in proc.stderr


def test_socket_resolution_falls_back_to_the_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_socket("/x.sock", "/ignored.toml").path == Path("/x.sock")
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "absent.toml"))
    choice = resolve_socket(None, None)
    assert choice.path == DEFAULT_SOCKET and choice.warning is None
    (tmp_path / "broken.toml").write_text("[control\n")
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "broken.toml"))
    choice = resolve_socket(None, None)
    assert choice.path == DEFAULT_SOCKET and choice.warning and "invalid TOML" in choice.warning
    with pytest.raises(Exception, match="invalid TOML"):
        resolve_socket(None, tmp_path / "broken.toml")  # an explicit --config must be valid
    with pytest.raises(DaemonNotRunning):
        from cinecutd.client import request
        request(tmp_path / "none.sock", "ping")


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory an unprivileged user can traverse (pytest's tmp dirs are private to root)."""
    d = Path(tempfile.mkdtemp(prefix="cinecutd-test-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _as_nobody() -> tuple[str, ...]:
    if os.geteuid() != 0:
        pytest.skip("needs root to run the client as an unprivileged user")
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    prefix = (setpriv, "--reuid=nobody", "--regid=65534", "--clear-groups")
    probe = subprocess.run([*prefix, sys.executable, "-c", "import cinecutd.cli"], capture_output=True,
                           timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"the project is not readable by nobody here: {probe.stderr.decode()[-200:]}")
    return prefix


def test_permission_denied_exits_4_and_names_the_group(public_dir: Path) -> None:
    prefix = _as_nobody()
    fake = FakeDaemon()
    sock = public_dir / "cinecutd.sock"
    with ControlServer(sock, fake.router(), mode=0o660):
        assert oct(sock.stat().st_mode & 0o777) == "0o660"
        proc = cli("status", "--socket", str(sock), prefix=prefix)
        assert proc.returncode == 4, proc.stderr
        assert f"permission denied on {sock}" in proc.stderr
        assert "'cinecut' group" in proc.stderr and "usermod -aG cinecut" in proc.stderr
        assert fake.calls == []  # nothing reached the daemon
        # the same socket answers its owner
        assert cli("status", "--socket", str(sock), "--json").returncode == 0
    # a socket owned by another group names that group
    other = next((g for g in grp.getgrall() if g.gr_gid not in (0, 65534) and "nobody" not in g.gr_mem), None)
    if other is not None:
        with ControlServer(sock, fake.router(), group=other.gr_name):
            assert sock.stat().st_gid == other.gr_gid
            proc = cli("rescan", "--socket", str(sock), prefix=prefix)
            assert proc.returncode == 4 and f"usermod -aG {other.gr_name} $USER" in proc.stderr


def test_unreadable_config_falls_back_to_the_default_socket(public_dir: Path) -> None:
    prefix = _as_nobody()
    if os.path.lexists(DEFAULT_SOCKET):
        pytest.skip(f"a daemon socket exists at {DEFAULT_SOCKET} on this machine")
    cfg = public_dir / "private.toml"
    cfg.write_text(f'[[library]]\npath = "/srv/films"\n[control]\nsocket = "{public_dir / "other.sock"}"\n')
    cfg.chmod(0o600)
    proc = cli("status", env={CONFIG_ENV: str(cfg)}, prefix=prefix)
    assert proc.returncode == 3
    assert f"no daemon listening on {DEFAULT_SOCKET}" in proc.stderr
    assert "config" not in proc.stderr  # a group member cannot read root's config: no noise about it


# --------------------------------------------------------------------------------------------- drop-in


def test_systemd_dropin_run_as_and_the_hint_without_it(tmp_path: Path) -> None:
    """--run-as runs the service as the account whose 0600 files it must read; without it, libraries
    owned by another account get a note naming --run-as (the drop-in itself is unchanged)."""
    import grp
    import pwd

    lib = tmp_path / "films"
    lib.mkdir()
    cfg = tmp_path / "d.toml"
    cfg.write_text(f'[[library]]\npath = "{lib}"\n')
    nobody = pwd.getpwnam("nobody")
    proc = cli("systemd-dropin", "--config", str(cfg), "--run-as", "nobody")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "User=nobody" in lines and f"SupplementaryGroups={grp.getgrgid(nobody.pw_gid).gr_name}" in lines
    assert "PrivateUsers=no" in lines
    assert cli("systemd-dropin", "--config", str(cfg), "--run-as", "root").returncode == 2
    assert "no such user" in cli("systemd-dropin", "--config", str(cfg), "--run-as", "no-such-user-x").stderr
    if os.geteuid() == 0:
        os.chown(lib, nobody.pw_uid, nobody.pw_gid)
        proc = cli("systemd-dropin", "--config", str(cfg))
        assert proc.returncode == 0 and "User=" not in proc.stdout
        assert "--run-as nobody" in proc.stderr


def test_systemd_dropin_prints_and_writes(tmp_path: Path) -> None:
    cfg = tmp_path / "d.toml"
    cfg.write_text('[[library]]\npath = "/srv/media/films"\n[[library]]\npath = "/mnt/nas/films"\n')
    proc = cli("systemd-dropin", "--config", str(cfg))
    assert proc.returncode == 0, proc.stderr
    assert "/srv/media/films" in proc.stdout and "/mnt/nas/films" in proc.stdout
    target = tmp_path / "cinecut-cache.service.d"
    proc = cli("systemd-dropin", "--config", str(cfg), "--write", "--dir", str(target))
    assert proc.returncode == 0, proc.stderr
    written = target / "libraries.conf"
    assert written.read_text() == cli("systemd-dropin", "--config", str(cfg)).stdout
    assert oct(written.stat().st_mode & 0o777) == "0o644"
    assert "daemon-reload" in proc.stdout
    assert os.listdir(target) == ["libraries.conf"]
    proc = cli("systemd-dropin", "--config", str(tmp_path / "missing.toml"))
    assert proc.returncode == 78 and "no such file" in proc.stderr
    # the default target is the unit's drop-in directory
    from cinecutd import cli as cli_module
    from cinecutd.dropin import DROPIN_PATH
    assert str(cli_module.DROPIN_DIR / cli_module.DROPIN_NAME) == str(DROPIN_PATH)
    # a library path a unit file cannot hold is refused, and nothing is written
    odd = tmp_path / "odd.toml"
    odd.write_text('[[library]]\npath = "/srv/fi\\tlms"\n')
    proc = cli("systemd-dropin", "--config", str(odd), "--write", "--dir", str(tmp_path / "none"))
    assert proc.returncode == 78 and "control characters" in proc.stderr
    assert not (tmp_path / "none").exists()


# --------------------------------------------------------------------------------------------- render


def rendered(fn: Any, result: Any) -> str:
    buf = io.StringIO()
    fn(result, Console(file=buf, width=160, color_system=None))
    return buf.getvalue()


def test_rendering_survives_missing_and_mistyped_keys() -> None:
    assert "cinecutd ?" in rendered(render.render_status, {})
    assert "none" in rendered(render.render_film, {})
    weird = {"daemon": [], "roots": [None, 3, {"films": "many"}], "films": "lots", "conflicts": {"a": 1},
             "orphans": [{"bytes": "big"}], "pending": [{"since": "yesterday"}], "counters": {"x": None},
             "recent_invalidations": [{"latency_ms": float("nan"), "at": 1e300, "stages": "proxy"}],
             "prewarm": {"current": {"done": 5, "total": 0}, "queue": "B", "failures": [7]}}
    out = rendered(render.render_status, weird)
    assert "many" in out and "yesterday" in out
    out = rendered(render.render_film, {"stamp": {"mtime": "x"}, "cache": [], "last_event": 5,
                                        "subtitles": "a.srt", "stages_complete": {"proxy": True}})
    assert "a.srt" in out
    assert "No orphaned work dirs." in rendered(render.render_gc, {"applied": True, "orphans": None})
    rendered(render.render_gc, {"applied": True, "orphans": [None, {"error": 3, "kept": "x"}]})


def test_file_names_cannot_inject_markup_or_escapes() -> None:
    film = "/srv/[bold red]Evil[/] \x1b[2J\x07\udcff.mkv"
    out = rendered(render.render_status, {"recent_invalidations": [{"film": film, "reason": "r"}]})
    assert "[bold red]Evil[/]" in out and "\\x1b[2J\\x07" in out and "\x1b" not in out
    out.encode("utf-8")  # lone surrogates were replaced, the output is printable


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3), max_leaves=8)
status_keys = st.sampled_from([*STATUS, "pid", "film", "cache", "stamp", "done", "fps"])


@settings(max_examples=50, deadline=None)
@given(st.dictionaries(status_keys, json_values, max_size=6))
def test_rendering_never_crashes_on_arbitrary_answers(result: dict[str, Any]) -> None:
    for fn in (render.render_status, render.render_film, render.render_gc):
        rendered(fn, result)
    render.render_generic("rescan", result, Console(file=io.StringIO(), width=100))
    render.render_rescan(result, Console(file=io.StringIO(), width=100))
