"""The Debian package and the install scripts: what the .deb contains and promises.

Installing and running it under systemd is test_systemd_e2e.py; this checks the built artifact
itself (files, conffiles, dependencies, maintainer scripts) against the source tree, so a module,
a unit change or a dependency that the package forgets is caught without booting anything.
"""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGING = REPO / "packaging"
SCRIPTS = [PACKAGING / "install.sh", PACKAGING / "cinecut-prewarm-addon", PACKAGING / "build-deb.sh",
           PACKAGING / "debian" / "postrm"]


@pytest.fixture(scope="session")
def unpacked(deb_package, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("unpacked")
    subprocess.run(["dpkg-deb", "-x", str(deb_package), str(root)], check=True)
    subprocess.run(["dpkg-deb", "-e", str(deb_package), str(root / "DEBIAN")], check=True)
    return root


def field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True,
                          check=True).stdout.strip()


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_package_name_and_version_follow_pyproject(deb_package):
    version = pyproject()["project"]["version"]
    assert deb_package.name == f"cinecut-cache_{version}_all.deb"
    assert field(deb_package, "Version") == version
    changelog = (PACKAGING / "debian" / "changelog").read_text().splitlines()[0]
    assert changelog.startswith(f"cinecut-cache ({version})")


def test_every_module_of_the_source_tree_is_packaged(unpacked):
    site = unpacked / "usr/lib/python3/dist-packages"
    for top, src in (("cinecut", REPO / "cinecut"), ("cinecutd", REPO / "daemon" / "cinecutd")):
        expected = {p.relative_to(src) for p in src.rglob("*.py") if "__pycache__" not in p.parts}
        packaged = {p.relative_to(site / top) for p in (site / top).rglob("*.py")}
        assert expected and expected == packaged, expected ^ packaged


def test_service_files_are_the_upstream_ones(unpacked):
    assert (unpacked / "lib/systemd/system/cinecut-cache.service").read_text() == \
        (REPO / "cinecut-cache.service").read_text()
    assert (unpacked / "lib/systemd/system/cinecut-worker.service").read_text() == \
        (REPO / "cinecut-worker.service").read_text()
    assert (unpacked / "usr/lib/sysusers.d/cinecut.conf").read_text() == \
        (PACKAGING / "sysusers.d/cinecut.conf").read_text()
    assert (unpacked / "usr/lib/tmpfiles.d/cinecut.conf").read_text() == \
        (PACKAGING / "tmpfiles.d/cinecut.conf").read_text()
    assert (unpacked / "etc/cinecut/cinecutd.toml").read_text() == (PACKAGING / "cinecutd.toml").read_text()
    assert (unpacked / "DEBIAN/conffiles").read_text().split() == ["/etc/cinecut/cinecutd.toml"]
    # the unit's Documentation= points at an uncompressed README
    assert (unpacked / "usr/share/doc/cinecut-cache/README.md").is_file()


def test_commands_are_installed_where_the_unit_and_docs_expect_them(unpacked):
    unit = (unpacked / "lib/systemd/system/cinecut-cache.service").read_text()
    exec_start = re.search(r"^ExecStart=(\S+)", unit, re.M).group(1)
    for tool in (exec_start, "/usr/bin/cinecut", "/usr/sbin/cinecut-prewarm-addon"):
        path = unpacked / tool.lstrip("/")
        assert path.is_file() and os.access(path, os.X_OK), tool
    assert (unpacked / "usr/bin/cinecutd").read_text().startswith("#! /usr/bin/python3") or \
        (unpacked / "usr/bin/cinecutd").read_text().startswith("#!/usr/bin/python3")


def test_depends_on_debian_packages_only(deb_package):
    depends = {re.split(r"[ (]", d.strip())[0] for d in field(deb_package, "Depends").split(",")}
    assert {"ffmpeg", "python3-msgpack", "python3-watchdog", "python3-structlog", "python3-rich",
            "python3-systemd", "python3-pydantic", "python3-prometheus-client"} <= depends
    # not in Debian 12: these come with cinecut-prewarm-addon, never as a dependency
    assert not depends & {"python3-pysubs2", "python3-llama-cpp", "python3-nvidia-ml-py", "python3-gguf"}
    declared = {re.split(r"[<>=!~ ;\[]", d)[0].lower() for d in pyproject()["project"]["dependencies"]}
    debian_names = {"msgpack", "watchdog", "structlog", "rich", "systemd-python", "pydantic", "prometheus_client"}
    assert declared - debian_names <= {"pysubs2"}, "a new runtime dependency needs a Debian package"


def test_maintainer_scripts_create_the_user_before_its_runtime_dir_and_do_not_enable(unpacked):
    postinst = (unpacked / "DEBIAN/postinst").read_text()
    assert postinst.index("systemd-sysusers") < postinst.index("systemd-tmpfiles")
    assert "cinecut.conf" in postinst
    # enablement is left to the admin: only a unit that was enabled before is re-enabled
    # (one guarded enable per unit: the service and the remote worker)
    assert postinst.count("deb-systemd-helper enable") == 2
    guarded = r"was-enabled[^\n]*\n(?:[^\n]*\n){0,2}[^\n]*deb-systemd-helper enable"
    assert len(re.findall(guarded, postinst)) == 2
    postrm = (unpacked / "DEBIAN/postrm").read_text()
    assert "rm -rf /var/lib/cinecut /var/cache/cinecut /opt/cinecut-cache/prewarm" in postrm
    assert '[ "$1" = purge ]' in postrm


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_parse(script):
    shell = "bash" if script.read_text().startswith("#!/usr/bin/env bash") else "sh"
    r = subprocess.run([shell, "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    if script.parent == PACKAGING:
        assert os.access(script, os.X_OK)


@pytest.mark.parametrize("script", [PACKAGING / "install.sh", PACKAGING / "cinecut-prewarm-addon"],
                         ids=lambda p: p.name)
def test_scripts_refuse_bad_options_clearly(script):
    r = subprocess.run([str(script), "--frobnicate"], capture_output=True, text=True)
    assert r.returncode != 0 and "unknown option --frobnicate" in r.stderr
    r = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "sudo" in r.stdout
