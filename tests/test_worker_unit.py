"""``cinecut-worker.service``: the GPU host's unit keeps the coordinator's hardening standard, with a
network for Redis that reaches private and loopback addresses only."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "cinecut-worker.service"
MAX_EXPOSURE = 2.0

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze not installed (apt install systemd)")


def directives(text: str) -> list[tuple[str, str, str]]:
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


def values(key: str) -> list[str]:
    return [v for s, k, v in directives(UNIT.read_text()) if s == "Service" and k == key]


def runnable_copy(dest: Path, text: str | None = None) -> Path:
    cinecut = Path(sys.executable).with_name("cinecut")
    assert cinecut.exists(), f"{cinecut} missing: install the project (pip install -e .)"
    text = (text or UNIT.read_text()).replace("ExecStart=/usr/bin/cinecut ", f"ExecStart={cinecut} ")
    unit = dest / UNIT.name
    unit.write_text(text)
    return unit


def exposure(unit_dir: Path) -> float:
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", UNIT.name], cwd=unit_dir,
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout)
    assert m, r.stdout + r.stderr
    return float(m.group(1))


def test_worker_unit_runs_cinecut_worker_and_reaches_only_private_networks() -> None:
    (start,) = values("ExecStart")
    assert start.split()[:2] == ["/usr/bin/cinecut", "worker"]
    assert values("IPAddressDeny") == ["any"]
    (allowed,) = values("IPAddressAllow")
    assert "any" not in allowed.split() and "0.0.0.0/0" not in allowed
    assert values("CapabilityBoundingSet") == [""] and values("NoNewPrivileges") == ["yes"]
    assert values("ProtectSystem") == ["strict"]


@needs_analyze
def test_worker_unit_verifies_and_its_exposure_is_at_most_2(tmp_path: Path) -> None:
    unit = runnable_copy(tmp_path)
    r = subprocess.run(["systemd-analyze", "verify", unit.name], cwd=tmp_path, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    score = exposure(tmp_path)
    print(f"systemd-analyze security --offline=yes cinecut-worker.service: {score}")
    assert score <= MAX_EXPOSURE


@needs_analyze
def test_exposure_check_notices_a_weaker_worker_unit(tmp_path: Path) -> None:
    weak = "\n".join(ln for ln in UNIT.read_text().splitlines()
                     if not ln.startswith(("Protect", "Private", "SystemCall", "Restrict", "IPAddress")))
    runnable_copy(tmp_path, weak)
    assert exposure(tmp_path) > MAX_EXPOSURE


@needs_analyze
def test_coordinator_dropin_opens_the_network_for_redis_only(tmp_path: Path) -> None:
    lib = tmp_path / "films"
    lib.mkdir()
    cfg = tmp_path / "cinecutd.toml"
    cfg.write_text(f'[[library]]\npath = "{lib}"\n[prewarm]\nenabled = true\n'
                   '[queue]\nredis = "redis://192.168.77.5:6379/0"\n')
    r = subprocess.run([str(Path(sys.executable).with_name("cinecutd")), "systemd-dropin", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "IPAddressAllow=192.168.77.5\n" in r.stdout and "PrivateNetwork=no" in r.stdout
    assert "IPAddressAllow=any" not in r.stdout
    main = REPO / "cinecut-cache.service"
    cinecutd = Path(sys.executable).with_name("cinecutd")
    (tmp_path / "u").mkdir()
    (tmp_path / "u" / main.name).write_text(main.read_text().replace("ExecStart=/usr/bin/cinecutd ",
                                                                     f"ExecStart={cinecutd} "))
    (tmp_path / "u" / f"{main.name}.d").mkdir()
    (tmp_path / "u" / f"{main.name}.d" / "libraries.conf").write_text(r.stdout)
    v = subprocess.run(["systemd-analyze", "verify", main.name], cwd=tmp_path / "u", capture_output=True, text=True,
                       timeout=60)
    assert v.returncode == 0, v.stderr
    s = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", main.name],
                       cwd=tmp_path / "u", capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", s.stdout)
    assert m and float(m.group(1)) <= 1.5, s.stdout[-500:]
