"""Shared fixtures: the tiny generated LLaVA model and synthetic films are built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


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
