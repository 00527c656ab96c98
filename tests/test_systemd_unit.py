"""The unit file, its hardening score, sysusers/tmpfiles, the library drop-in, and sd_notify.

Runs on any Linux with systemd's tools installed (systemd need not be PID 1): the unit is checked
with `systemd-analyze verify` and `systemd-analyze security --offline=yes`, sysusers/tmpfiles are
applied to a scratch root, and the notifier talks to a real datagram socket standing in for the
service manager. Booting the service itself is test_systemd_e2e.py.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cinecutd.dropin import DropinError, quote_path, render_dropin
from cinecutd.sdnotify import Notifier, clean_status

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "cinecut-cache.service"
SYSUSERS = REPO / "packaging" / "sysusers.d" / "cinecut.conf"
TMPFILES = REPO / "packaging" / "tmpfiles.d" / "cinecut.conf"
MAX_EXPOSURE = 1.5

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze not installed (apt install systemd)")


def directives(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment, in order (systemd allows repeated keys)."""
    out, section = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def values(key: str, section: str = "Service") -> list[str]:
    return [v for s, k, v in directives(UNIT.read_text()) if s == section and k == key]


def one(key: str, section: str = "Service") -> str:
    (value,) = values(key, section)
    return value


def runnable_copy(dest: Path, dropin: str | None = None) -> Path:
    """The unit with ExecStart pointing at this checkout's cinecutd, so verify can check it here."""
    cinecutd = Path(sys.executable).with_name("cinecutd")
    assert cinecutd.exists(), f"{cinecutd} missing: install the project (pip install -e .)"
    text = UNIT.read_text().replace("ExecStart=/usr/bin/cinecutd ", f"ExecStart={cinecutd} ")
    unit = dest / UNIT.name
    unit.write_text(text)
    if dropin is not None:
        (dest / f"{UNIT.name}.d").mkdir()
        (dest / f"{UNIT.name}.d" / "libraries.conf").write_text(dropin)
    return unit


def analyze(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", *args], cwd=cwd, capture_output=True, text=True, timeout=60)


# --- the unit ---------------------------------------------------------------------------------

def test_unit_declares_the_service_contract():
    assert one("Type") == "notify"
    assert one("NotifyAccess") == "main"  # the pre-warm worker cannot send READY/WATCHDOG
    assert one("ExecStart") == "/usr/bin/cinecutd run --config /etc/cinecut/cinecutd.toml"
    assert one("ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one("Restart") == "on-failure"
    assert one("RestartPreventExitStatus") == "78"
    assert re.fullmatch(r"\d+s", one("WatchdogSec"))
    assert (one("User"), one("Group")) == ("cinecut", "cinecut")
    assert one("RuntimeDirectory") == one("StateDirectory") == one("ConfigurationDirectory") == "cinecut"
    assert one("RuntimeDirectoryPreserve") == "yes"
    assert one("KillMode") == "mixed"
    assert one("WantedBy", "Install") == "multi-user.target"


def test_unit_is_a_good_neighbour_and_allows_only_the_gpu_devices():
    assert int(one("Nice")) >= 10
    assert one("IOSchedulingClass") == "best-effort" and int(one("IOSchedulingPriority")) == 7
    assert one("CPUSchedulingPolicy") == "batch"
    assert one("DevicePolicy") == "closed"
    assert values("DeviceAllow") == ["char-nvidia-frontend rw", "char-nvidia-uvm rw", "char-nvidia-caps rw"]
    assert not values("PrivateDevices")  # would hide /dev/nvidia*
    assert one("MemoryDenyWriteExecute") == "yes"
    text = UNIT.read_text()
    # the decision about W^X and CUDA is documented with its sources
    assert "ggml-org/llama.cpp#13135" in text and "CUDA_CACHE_PATH" in text


@needs_analyze
def test_systemd_analyze_verify_is_clean(tmp_path):
    unit = runnable_copy(tmp_path, render_dropin(["/srv/media/Films 4K", "/home/alice/Videos"]))
    r = analyze("verify", unit.name, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "", r.stderr  # warnings (unknown keys, bad values) count as failures


@needs_analyze
def test_verify_would_catch_a_broken_dropin(tmp_path):
    unit = runnable_copy(tmp_path, "[Service]\nReadWritePaths=-/srv/x\nReadWritePath=/srv/typo\n")
    r = analyze("verify", unit.name, cwd=tmp_path)
    assert "ReadWritePath" in r.stderr


def exposure(unit_dir: Path) -> float:
    r = analyze("security", "--offline=yes", "--no-pager", UNIT.name, cwd=unit_dir)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout)
    assert m, r.stdout + r.stderr
    return float(m.group(1))


@needs_analyze
def test_hardening_exposure_is_at_most_1_5(tmp_path):
    shutil.copy(UNIT, tmp_path / UNIT.name)
    score = exposure(tmp_path)
    print(f"systemd-analyze security --offline=yes: {score}")
    assert score <= MAX_EXPOSURE


@needs_analyze
def test_the_score_is_sensitive_to_hardening(tmp_path):
    """Guards the check above: dropping the sandboxing must raise the measured exposure."""
    text = UNIT.read_text()
    for key in ("ProtectSystem", "PrivateNetwork", "CapabilityBoundingSet", "SystemCallFilter",
                "RestrictAddressFamilies", "PrivateUsers"):
        text = re.sub(rf"^{key}=.*$", "", text, flags=re.M)
    (tmp_path / UNIT.name).write_text(text)
    assert exposure(tmp_path) > MAX_EXPOSURE


@needs_analyze
def test_exposure_with_the_run_as_dropin_stays_at_most_1_5(tmp_path):
    """The documented install runs the service as the library owner (``systemd-dropin --run-as``): that
    drop-in (User=, SupplementaryGroups=, PrivateUsers=no) is scored merged into the unit, since
    offline analysis reads one file; it adds no capability."""
    from cinecutd.dropin import RunAs

    dropin = render_dropin(["/srv/media/films"], run_as=RunAs("alice", "alice"))
    (tmp_path / UNIT.name).write_text(UNIT.read_text() + "\n" + dropin)
    score = exposure(tmp_path)
    print(f"systemd-analyze security --offline=yes, with the run-as drop-in: {score}")
    assert score <= MAX_EXPOSURE
    assert ("Service", "CapabilityBoundingSet", "") in directives(UNIT.read_text())
    assert not any(d[1].endswith("Capabilities") and d[2] for d in directives(dropin))


def test_run_as_dropin_runs_as_the_owner_and_keeps_the_socket_group():
    from cinecutd.dropin import RunAs

    entries = [d[1:] for d in directives(render_dropin(["/srv/films"], run_as=RunAs("alice", "users")))
               if d[0] == "Service"]
    assert ("User", "alice") in entries and ("SupplementaryGroups", "users") in entries
    assert ("PrivateUsers", "no") in entries and not any(k == "Group" for k, _ in entries)


def test_run_as_refuses_root_and_unknown_users():
    from cinecutd.dropin import run_as_user

    with pytest.raises(DropinError, match="never needs root"):
        run_as_user("root")
    with pytest.raises(DropinError, match="no such user"):
        run_as_user("no-such-user-cinecut-test")


# --- sysusers.d / tmpfiles.d ------------------------------------------------------------------

@needs_analyze
def test_sysusers_creates_the_cinecut_user_and_group(tmp_path):
    (tmp_path / "etc").mkdir()
    subprocess.run(["systemd-sysusers", f"--root={tmp_path}", str(SYSUSERS)], check=True, capture_output=True)
    passwd = {line.split(":")[0]: line.split(":") for line in (tmp_path / "etc/passwd").read_text().splitlines()}
    group = {line.split(":")[0]: line.split(":") for line in (tmp_path / "etc/group").read_text().splitlines()}
    user = passwd["cinecut"]
    assert int(user[2]) < 1000  # a system user
    assert user[3] == group["cinecut"][2]
    assert user[5] == "/var/lib/cinecut"
    assert user[6].endswith("nologin")


@pytest.mark.skipif(os.geteuid() != 0, reason="systemd-tmpfiles must chown to cinecut: needs root")
@needs_analyze
def test_tmpfiles_creates_the_runtime_dir_and_gpu_lock(tmp_path):
    (tmp_path / "etc").mkdir()
    subprocess.run(["systemd-sysusers", f"--root={tmp_path}", str(SYSUSERS)], check=True, capture_output=True)
    uid = int(next(line for line in (tmp_path / "etc/passwd").read_text().splitlines()
                   if line.startswith("cinecut:")).split(":")[2])
    subprocess.run(["systemd-tmpfiles", f"--root={tmp_path}", "--create", str(TMPFILES)],
                   check=True, capture_output=True)
    run = tmp_path / "run" / "cinecut"
    st = run.stat()
    assert (st.st_mode & 0o7777, st.st_uid) == (0o1770, uid)
    for name in ("gpu.lock", "gpu.lock.want"):
        st = (run / name).stat()
        assert (st.st_mode & 0o777, st.st_uid, st.st_size) == (0o660, uid, 0)


# --- the library drop-in ----------------------------------------------------------------------

def test_dropin_grants_each_library_root_and_tolerates_unmounted_disks():
    text = render_dropin(["/srv/media/films", "/srv/media/Films 4K/", "/srv/media/films/nested"],
                         source="/etc/cinecut/cinecutd.toml")
    entries = [d for d in directives(text) if d[0] == "Service"]
    assert entries == [
        ("Service", "ReadWritePaths", '"-/srv/media/Films 4K"'),
        ("Service", "ReadWritePaths", '"-/srv/media/films"'),
    ]
    assert "from /etc/cinecut/cinecutd.toml" in text


def test_dropin_escapes_systemd_specials():
    assert quote_path(Path('/srv/100% "best": films'), "-") == r'"-/srv/100%% \"best\": films"'
    assert quote_path(Path("/srv/back\\slash")) == r'"/srv/back\\slash"'


def test_dropin_for_libraries_under_home_uses_a_tmpfs_home_and_binds():
    text = render_dropin(["/home/alice/Videos", "/srv/films"], read_only=["/home/alice/models", "/opt/m"])
    entries = [d[1:] for d in directives(text) if d[0] == "Service"]
    assert ("ProtectHome", "tmpfs") in entries
    assert ("BindPaths", '"-/home/alice/Videos"') in entries
    assert ("BindReadOnlyPaths", '"-/home/alice/models"') in entries
    assert ("ReadWritePaths", '"-/srv/films"') in entries
    assert not any("/opt/m" in v for _, v in entries)  # readable already; no line needed


@pytest.mark.parametrize(("path", "why"), [
    ("relative/films", "absolute"),
    ("/srv/line\nbreak", "control characters"),
    (os.fsdecode(b"/srv/caf\xe9"), "UTF-8"),
    ("/", "whole file system"),
])
def test_dropin_refuses_paths_a_unit_file_cannot_hold(path, why):
    with pytest.raises(DropinError, match=why):
        render_dropin([path])


def test_dropin_needs_at_least_one_library():
    with pytest.raises(DropinError, match=r"\[\[library\]\]"):
        render_dropin([])


# --- sd_notify --------------------------------------------------------------------------------

@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    """A datagram socket in the role of systemd's notification socket."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def recv(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def test_ready_status_stopping_watchdog_reach_the_manager(notify_socket):
    n = Notifier()
    assert n.enabled
    assert n.ready("watching 2 films in 1 root")
    assert recv(notify_socket) == "READY=1\nSTATUS=watching 2 films in 1 root"
    assert n.status("pre-warm: Heat (1995) 412/1,530 frames, 2.1 fps")
    assert recv(notify_socket) == "STATUS=pre-warm: Heat (1995) 412/1,530 frames, 2.1 fps"
    assert n.watchdog()
    assert recv(notify_socket) == "WATCHDOG=1"
    assert n.extend_timeout(30)
    assert recv(notify_socket) == "EXTEND_TIMEOUT_USEC=30000000"
    assert n.stopping()
    assert recv(notify_socket) == "STOPPING=1\nSTATUS=stopping"


def test_reloading_carries_monotonic_usec(notify_socket):
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert Notifier().reloading()
    lines = recv(notify_socket).split("\n")
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert lines[0] == "RELOADING=1"
    key, _, usec = lines[1].partition("=")
    assert key == "MONOTONIC_USEC" and before <= int(usec) <= after
    assert lines[2] == "STATUS=reloading configuration"


def test_a_film_name_cannot_inject_notify_assignments(notify_socket):
    evil = os.fsdecode(b"pre-warm: Evil\nREADY=1\nWATCHDOG=1 \xff.mkv")
    assert Notifier().status(evil)
    msg = recv(notify_socket)
    assert "\n" not in msg
    assert msg == "STATUS=pre-warm: Evil READY=1 WATCHDOG=1 \\xff.mkv"
    assert len(clean_status("x" * 5000)) == 512


def test_without_a_manager_every_call_is_a_harmless_no_op(monkeypatch, tmp_path):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier()
    assert not n.enabled
    assert [n.ready("x"), n.status("x"), n.reloading(), n.stopping(), n.watchdog()] == [False] * 5
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))  # manager went away
    n = Notifier()
    assert n.enabled and n.ready("x") is False and n.watchdog() is False


@pytest.mark.parametrize(("env", "expected"), [
    ({"WATCHDOG_USEC": "60000000"}, 30.0),
    ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "{pid}"}, 1.5),
    ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
    ({"WATCHDOG_USEC": "soon"}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({}, None),
])
def test_watchdog_interval_is_half_of_watchdogsec(env, expected):
    env = {k: v.format(pid=os.getpid()) for k, v in env.items()}
    assert Notifier(env).watchdog_interval() == expected
