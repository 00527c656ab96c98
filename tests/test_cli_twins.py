"""``cinecut analyze`` on a same-stem twin: refused with a clear message, taken over only when asked.

``Heat.mkv`` and ``Heat.mp4`` in one folder share ``Heat_cinecut_work`` (upstream derives the work dir from
the stem alone). A run for the twin must never silently take the owner's results, and runs alternating
between the two must never flap. Real ffmpeg films, the real CLI, upstream's own reader.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import upstream_reader as up
from test_path_identity import cinecut, proxy_identity
from test_pipeline import analyzed_film, clone_film_dir

from cinecut.workdir import WorkDir

TWIN_EXIT = 77


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory, synthetic_film_template, tiny_llava) -> Path:
    return analyzed_film(tmp_path_factory, synthetic_film_template, tiny_llava)[0]


@pytest.fixture
def model_env(tiny_llava) -> dict[str, str]:
    return {"CINECUT_MODEL": str(tiny_llava.model_path), "CINECUT_MMPROJ": str(tiny_llava.mmproj_path)}


def work_dir_bytes(wd: WorkDir) -> dict[str, bytes]:
    """Every regular file of the work dir (keyframes included), by relative name."""
    out = {}
    for root, _dirs, files in os.walk(wd.path):
        for name in files:
            p = Path(root) / name
            if name != "cinecut.lock":
                out[str(p.relative_to(wd.path))] = p.read_bytes()
    return out


def test_a_twin_is_refused_and_taken_over_only_when_asked(
    analyzed: Path, model_env: dict[str, str], tmp_path: Path
) -> None:
    owner = clone_film_dir(analyzed, tmp_path / "lib" / "Demo Film (2024)")
    twin = owner.with_suffix(".mp4")
    shutil.copy2(owner, twin)  # same size and mtime: by upstream's rule the owner's cache "fits" it too
    wd = WorkDir.for_film(owner)
    assert WorkDir.for_film(twin).path == wd.path
    proxy = proxy_identity(wd)
    gpu = tmp_path / "gpu.lock"

    for _ in range(2):  # alternating runs: the owner's work dir never changes hands
        before = work_dir_bytes(wd)
        p = cinecut("analyze", twin, "--gpu-lock", gpu, env=model_env)
        assert p.returncode == TWIN_EXIT, (p.stdout, p.stderr)
        assert str(owner) in p.stderr and "--take-over" in p.stderr and "same stem" in p.stderr
        assert work_dir_bytes(wd) == before and proxy_identity(wd) == proxy
        q = cinecut("analyze", owner, "--gpu-lock", gpu, "--model", tmp_path / "x", "--mmproj", tmp_path / "x")
        assert q.returncode == 0 and "LLaVA inference skipped" in q.stdout, q.stderr
        assert up.load_checkpoint_strict(wd.path).source_file == str(owner)

    st = cinecut("status", twin)
    assert st.returncode == 0 and f"Owner:      {owner} (a same-stem twin" in st.stdout, st.stdout
    assert json.loads(cinecut("status", owner, "--json").stdout)["twin_owner"] is None

    p = cinecut("analyze", twin, "--take-over", "--gpu-lock", gpu, "--n-gpu-layers", "0", env=model_env)
    assert p.returncode == 0, p.stderr
    assert f"taken over from {owner}" in p.stdout
    ck = up.load_checkpoint_strict(wd.path)
    assert ck.source_file == str(twin) and ck.stages_complete == ["proxy", "subtitles", "keyframes"]
    assert up.unpack_cache_file(wd.cache_path)["metadata"]["source_file"] == str(twin)
    assert up.load_cache(twin, wd.path) is not None

    q = cinecut("analyze", owner, "--gpu-lock", gpu, env=model_env)  # now the owner is the twin
    assert q.returncode == TWIN_EXIT and str(twin) in q.stderr, (q.stdout, q.stderr)
    assert up.load_checkpoint_strict(wd.path).source_file == str(twin)


def test_a_record_of_a_film_that_is_gone_is_not_a_twin(analyzed: Path, tmp_path: Path) -> None:
    """``Heat.mkv`` replaced by ``Heat.mp4`` (an upgrade): the old film is gone, so nothing is refused."""
    owner = clone_film_dir(analyzed, tmp_path / "lib" / "Demo Film (2024)")
    upgrade = owner.with_suffix(".mp4")
    os.rename(owner, upgrade)
    p = cinecut("analyze", upgrade, "--gpu-lock", tmp_path / "gpu.lock", "--model", tmp_path / "x", "--mmproj", tmp_path / "x")
    assert p.returncode != TWIN_EXIT, p.stderr
