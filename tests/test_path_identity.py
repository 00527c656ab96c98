"""Path identity: one film, many spellings, and never a result thrown away over a spelling.

Upstream resolves the film with ``realpath`` (typer ``resolve_path=True``), derives the work dir from that
path and starts fresh when ``checkpoint.source_file != str(video)``. A library reached through a symlinked
folder (``/srv/media -> /mnt/nas``) has two spellings for every film. What we write must be upstream's
spelling, and what we compare must compare the resolved paths of both sides: only content (stamps)
decides staleness. Real ffmpeg films through the real CLI, upstream's exact writers, a real daemon.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import upstream_reader as up
from test_pipeline import analyzed_film, clone_film_dir, copy_film

from cinecut import safefs
from cinecut.paths import film_identity, same_film_path
from cinecut.stamps import current_stamps, read_stamps, write_stamps_at
from cinecut.workdir import STAMPS_NAME, WorkDir, subtitle_sidecars
from tests.harness.checks import invalidations_of, video_invalidated, work_state
from tests.harness.films import ALL_STAGES, Film, make_film, make_film_with_work_dir
from tests.harness.mutate import replace_in_place
from tests.harness.runner import DaemonRunner, Library
from tests.harness.waiting import stays, wait_for

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 180


def cinecut(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("CINECUT_MODEL", "CINECUT_MMPROJ")}
    return subprocess.run(
        [sys.executable, "-m", "cinecut.cli", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={**base, **(env or {})},
        check=False,
    )


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory, synthetic_film_template, tiny_llava) -> Path:
    return analyzed_film(tmp_path_factory, synthetic_film_template, tiny_llava)[0]


@pytest.fixture
def model_env(tiny_llava) -> dict[str, str]:
    return {"CINECUT_MODEL": str(tiny_llava.model_path), "CINECUT_MMPROJ": str(tiny_llava.mmproj_path)}


def symlinked_library(tmp_path: Path) -> tuple[Path, Path]:
    """``nas`` (the real folder) and ``media -> nas``, as ``/srv/media -> /mnt/nas``."""
    real = Path(os.path.realpath(tmp_path)) / "nas"
    real.mkdir()
    alias = tmp_path / "media"
    alias.symlink_to(real, target_is_directory=True)
    return real, alias


def proxy_identity(wd: WorkDir) -> tuple[int, int]:
    st = os.stat(wd.proxy_path)
    return st.st_ino, st.st_mtime_ns


def as_upstream_left_it(film: Path, *, spelled: Path | None = None) -> WorkDir:
    """Rewrite a film's work dir exactly as an upstream run leaves it: all seven stages complete (with
    their manifests), the cache and checkpoint written by upstream's own code shape (``json.dump`` /
    ``msgpack`` through ``mkstemp`` + ``os.replace``: mode 0600), every path spelled ``spelled`` (default:
    the realpath, what upstream's CLI records) and no sidecar of ours."""
    real = Path(os.path.realpath(film))
    name = spelled if spelled is not None else real
    wd = WorkDir.for_film(real)
    kdir = Path(str(wd.keyframes_dir).replace(str(real.parent), str(name.parent), 1))
    results = up.load_cache(real, wd.path)
    assert results, "the cloned cache is valid"
    moved = [(dataclasses.replace(r, frame_path=str(kdir / Path(r.frame_path).name)), d) for r, d in results]
    up.save_cache(moved, name, wd.path)
    ck = up.load_checkpoint_strict(wd.path)
    ck.source_file = str(name)
    ck.proxy_path = str(name.parent / wd.path.name / wd.proxy_name)
    ck.stages_complete = list(ALL_STAGES)
    for attr, manifest in (("manifest_path", "TRAILER_MANIFEST.json"), ("assembly_manifest_path", "ASSEMBLY_MANIFEST.json")):
        (wd.path / manifest).write_text(json.dumps({"edited_by_user": True}))
        setattr(ck, attr, str(name.parent / wd.path.name / manifest))
    ck.structural_anchors = {"act1_end": 1.0, "act2_end": 2.0}
    up.save_checkpoint(ck, wd.path)
    (wd.path / STAMPS_NAME).unlink(missing_ok=True)
    assert stat.S_IMODE(os.stat(wd.checkpoint_path).st_mode) == 0o600
    return wd


def upstream_accepts(wd: WorkDir, given: Path) -> bool:
    """Upstream's start-of-run check, verbatim: ``checkpoint.source_file != str(video)`` with
    ``video = realpath(given)`` means "Stale checkpoint ... Starting fresh"."""
    video = Path(os.path.realpath(given))
    return up.load_checkpoint_strict(wd.path).source_file == str(video)


# ------------------------------------------------------------------------------------------ helpers


def test_film_identity_and_same_film_path(tmp_path: Path) -> None:
    real, alias = symlinked_library(tmp_path)
    (real / "Heat.mkv").write_bytes(b"film")
    (real / "Heat.mp4").write_bytes(b"twin")
    assert film_identity(alias / "Heat.mkv") == str(real / "Heat.mkv")
    assert same_film_path(alias / "Heat.mkv", str(real / "Heat.mkv"))
    assert same_film_path(str(alias / "Gone.mkv"), real / "Gone.mkv")  # a film gone: its folder still resolves
    assert not same_film_path(alias / "Heat.mkv", real / "Heat.mp4")
    assert not same_film_path(None, real / "Heat.mkv")
    link = real / "Linked.mkv"
    link.symlink_to(real / "Heat.mkv")
    assert WorkDir.for_film(alias / "Linked.mkv").path == real / "Heat_cinecut_work"  # upstream's location


# ------------------------------------------------------------------------------------ cinecut analyze


def test_analyze_through_a_symlinked_folder_keeps_upstreams_seven_stages_and_proxy(
    analyzed: Path, tmp_path: Path
) -> None:
    real, alias = symlinked_library(tmp_path)
    film = clone_film_dir(analyzed, real / "Demo Film (2024)")
    wd = as_upstream_left_it(film)
    before = up.load_checkpoint_strict(wd.path)
    proxy = proxy_identity(wd)
    through_link = alias / "Demo Film (2024)" / film.name

    absent = tmp_path / "absent.gguf"
    p = cinecut("analyze", through_link, "--model", absent, "--mmproj", absent, "--gpu-lock", tmp_path / "gpu.lock")
    assert p.returncode == 0, p.stderr
    assert "✓ proxy (already complete)" in p.stdout.splitlines()
    after = up.load_checkpoint_strict(wd.path)
    assert after.stages_complete == ALL_STAGES
    assert (after.manifest_path, after.assembly_manifest_path, after.structural_anchors) == (
        before.manifest_path,
        before.assembly_manifest_path,
        before.structural_anchors,
    )
    assert proxy_identity(wd) == proxy, "the proxy was re-encoded"
    assert upstream_accepts(wd, through_link) and upstream_accepts(wd, film)
    assert up.load_cache(film, wd.path) is not None
    rec = read_stamps(wd.path)
    assert rec is not None and rec.source_file == str(film)


def test_an_abspath_spelled_record_of_ours_is_kept_and_respelled_for_upstream(analyzed: Path, tmp_path: Path) -> None:
    """What an older version of ours wrote when run through the symlink: every path spelled through it."""
    real, alias = symlinked_library(tmp_path)
    film = clone_film_dir(analyzed, real / "Demo Film (2024)")
    through_link = alias / "Demo Film (2024)" / film.name
    wd = as_upstream_left_it(film, spelled=through_link)
    with safefs.work_dir_fd(wd.path) as fd:  # our older sidecar, spelled the same way
        now = current_stamps(film, subtitle_sidecars(film))
        write_stamps_at(fd, dataclasses.replace(now, source_file=str(through_link)))
    assert not upstream_accepts(wd, through_link)  # upstream would start over on this record
    proxy = proxy_identity(wd)

    absent = tmp_path / "absent.gguf"
    p = cinecut("analyze", through_link, "--model", absent, "--mmproj", absent, "--gpu-lock", tmp_path / "gpu.lock")
    assert p.returncode == 0, p.stderr
    after = up.load_checkpoint_strict(wd.path)
    assert after.stages_complete == ALL_STAGES and proxy_identity(wd) == proxy
    assert upstream_accepts(wd, through_link)
    assert after.proxy_path == str(wd.proxy_path) == os.path.realpath(after.proxy_path)
    rec = read_stamps(wd.path)
    assert rec is not None and rec.source_file == str(film)

    p = cinecut("analyze", film, "--model", absent, "--mmproj", absent, "--gpu-lock", tmp_path / "gpu.lock")
    assert p.returncode == 0, p.stderr  # the other spelling: the same film, nothing redone
    assert up.load_checkpoint_strict(wd.path).stages_complete == ALL_STAGES and proxy_identity(wd) == proxy


def test_a_fresh_analysis_records_only_upstreams_spelling(
    synthetic_film_template, model_env: dict[str, str], tmp_path: Path
) -> None:
    """Every path written (checkpoint, cache metadata, frame paths, our sidecar) is the realpath, and the
    work dir of a symlinked film FILE lies beside its target, where upstream looks for it."""
    real, alias = symlinked_library(tmp_path)
    target = copy_film(synthetic_film_template, real / "store")
    shelf = real / "shelf"
    shelf.mkdir()
    link = shelf / "Linked Film.mkv"
    link.symlink_to(target)
    given = alias / "shelf" / link.name

    p = cinecut("analyze", given, "--gpu-lock", tmp_path / "gpu.lock", "--n-gpu-layers", "0", env=model_env)
    assert p.returncode == 0, p.stderr
    wd = WorkDir.for_film(target)
    assert wd.path == target.with_name(f"{target.stem}_cinecut_work") and wd.path.is_dir()
    assert not (shelf / "Linked Film_cinecut_work").exists()
    assert upstream_accepts(wd, given)
    ck = up.load_checkpoint_strict(wd.path)
    assert ck.proxy_path == str(wd.proxy_path)
    cache = up.unpack_cache_file(up.cache_path_for(target, wd.path))
    assert cache["metadata"]["source_file"] == str(target)
    assert all(item["record"]["frame_path"].startswith(str(wd.keyframes_dir) + "/") for item in cache["results"])
    assert up.load_cache(target, wd.path) is not None
    rec = read_stamps(wd.path)
    assert rec is not None and rec.source_file == str(target)
    # Any spelling of the name given: a cache hit, nothing redone. (Subtitle sidecars pair with the name
    # given, here the link's folder, as the daemon pairs them.)
    for spelling in (given, link):
        q = cinecut("analyze", spelling, "--model", tmp_path / "x", "--mmproj", tmp_path / "x")
        assert q.returncode == 0 and "LLaVA inference skipped" in q.stdout, (spelling, q.stderr)


# ------------------------------------------------------------------------------------------ daemon


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[DaemonRunner]:
    with DaemonRunner(tmp_path) as r:
        yield r


def _finished(film: Film) -> bool:
    s = work_state(film)
    return s.stages == tuple(ALL_STAGES) and s.cache_valid and s.proxy and s.keyframes > 0


@pytest.mark.parametrize("spelled", ["records-through-the-link", "root-through-the-link"])
def test_daemon_treats_two_spellings_as_one_film(runner: DaemonRunner, spelled: str) -> None:
    """Same-stem twins make the daemon ask whose work dir it is: the owner's records spelled another way
    are still the owner's. Nothing is invalidated over a spelling; the owner's real change still is."""
    lib = Path(os.path.realpath(runner.library()))
    alias = runner.base / "media"
    alias.symlink_to(lib, target_is_directory=True)
    owner = make_film_with_work_dir(lib / "Heat", "Heat", subtitles=())
    make_film(lib / "Heat", "Heat", ".mp4", seed=3, subtitles=(), trailer=None)
    wd = owner.wd
    if spelled == "records-through-the-link":
        name = alias / "Heat" / owner.path.name
        ck = up.load_checkpoint_strict(wd.path)
        ck.source_file = str(name)
        up.save_checkpoint(ck, wd.path)
        rec = read_stamps(wd.path)
        assert rec is not None
        with safefs.work_dir_fd(wd.path) as fd:
            write_stamps_at(fd, dataclasses.replace(rec, source_file=str(name)))
        root = lib
    else:
        root = alias
    assert _finished(owner)

    d = runner.start([Library(root)])
    for _ in range(2):
        d.request("rescan")
    assert stays(lambda: _finished(owner), 0.6), work_state(owner)
    assert d.status()["recent_invalidations"] == []

    replace_in_place(owner.path)
    wait_for(lambda: video_invalidated(owner), what="the owner's replacement invalidates")
    seen = invalidations_of(d, owner) or invalidations_of(d, alias / "Heat" / owner.path.name)
    assert len(seen) == 1
