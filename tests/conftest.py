"""Shared fixtures: the tiny generated LLaVA model and synthetic films are built once per test session."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The in-process engine fixtures (`root`, `make_engine`); a module defining its own takes precedence.
pytest_plugins = ("tests.harness.inprocess",)


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory):
    """A random-weight LLaVA-1.5 pair (text GGUF + mmproj GGUF), generated, never downloaded."""
    from cinecut.demo.tinymodel import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="session")
def synthetic_film_template(tmp_path_factory: pytest.TempPathFactory):
    """A short synthetic film with real scene cuts and an SRT sidecar, made once with ffmpeg."""
    from cinecut.demo.film import make_synthetic_film

    return make_synthetic_film(tmp_path_factory.mktemp("film-template") / "Demo Film (2024).mkv")


@pytest.fixture(scope="session")
def deb_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The .deb CI built (CINECUT_DEB), else one built now with packaging/build-deb.sh (once per session)."""
    given = os.environ.get("CINECUT_DEB")
    if given:
        assert Path(given).is_file(), f"CINECUT_DEB={given} does not exist"
        return Path(given)
    if shutil.which("dpkg-buildpackage") is None:
        pytest.skip("dpkg-buildpackage missing: apt install dpkg-dev debhelper dh-python pybuild-plugin-pyproject")
    out = tmp_path_factory.mktemp("deb")
    r = subprocess.run([str(REPO / "packaging" / "build-deb.sh"), str(out)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    return Path(r.stdout.strip().splitlines()[-1])
