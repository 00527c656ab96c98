"""Hostile sidecars of ours: the stamps file (``cinecut_stamps.json``) and the migration journal.

Both live in work dirs that library users (the upstream CLI's group) can write, so both are input. The
stamps reader must answer a stamps record or None (never raise, never hang, bounded memory), whatever the
bytes or the file type; a corrupt sidecar must never cost valid results. A planted or corrupt migration
journal must never make the daemon move, rename or rewrite anything outside the directory it sits in, or
outside the libraries, and the daemon must start and serve regardless.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cinecut import safefs
from cinecut.revalidate import revalidate
from cinecut.stamps import MAX_STAMPS_BYTES, InputStamps, current_stamps, read_stamps_at
from cinecut.workdir import STAMPS_NAME
from tests.harness.checks import warm, work_state
from tests.harness.films import ALL_STAGES, make_film_with_work_dir
from tests.harness.runner import DaemonRunner, Library

READ_BUDGET_S = 0.5

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**80), 2**80) | st.floats() | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=10), kids, max_size=5),
    max_leaves=25,
)
VALID = {
    "format": 1,
    "source_file": "/srv/films/Heat/Heat.mkv",
    "video": {"mtime": 1700000000.25, "size": 123456},
    "inode": 42,
    "device": 2049,
    "subtitles": [{"name": ".en.srt", "mtime": 1700000001.5, "size": 99}],
    "recorded_at": 1700000002.0,
}


def _read(dir_fd: int) -> InputStamps | None:
    t0 = time.monotonic()
    out = read_stamps_at(dir_fd)
    assert time.monotonic() - t0 < READ_BUDGET_S
    assert out is None or isinstance(out, InputStamps)
    return out


@pytest.fixture
def wd(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    d = tmp_path / "X_cinecut_work"
    d.mkdir()
    fd = safefs.open_dir(d)
    try:
        yield d, fd
    finally:
        os.close(fd)


def _put(d: Path, data: bytes) -> None:
    p = d / STAMPS_NAME
    if p.is_symlink() or (p.exists() and not p.is_file()):
        p.unlink()
    p.write_bytes(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=600))
def test_random_bytes(wd: tuple[Path, int], blob: bytes) -> None:
    _put(wd[0], blob)
    _read(wd[1])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=json_values)
def test_random_json_documents(wd: tuple[Path, int], doc: object) -> None:
    _put(wd[0], json.dumps(doc).encode())
    _read(wd[1])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from([*VALID, "video.mtime", "video.size", "subtitles.0", "subtitles.0.name",
                            "subtitles.0.mtime", "extra"]),
       value=json_values)
def test_structured_mutations_of_a_valid_sidecar(wd: tuple[Path, int], key: str, value: object) -> None:
    doc = json.loads(json.dumps(VALID))
    parts = key.split(".")
    target = doc
    for part in parts[:-1]:
        target = target[int(part)] if isinstance(target, list) else target[part]
    last = parts[-1]
    if isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value
    _put(wd[0], json.dumps(doc).encode())
    out = _read(wd[1])
    if out is not None:  # whatever it accepted is well-typed
        assert isinstance(out.source_file, str)
        assert out.video is None or (isinstance(out.video.mtime, float) and out.video.size >= 0)
        assert all(isinstance(n, str) and s.size >= 0 for n, s in out.subtitles)


def test_hostile_shapes_and_file_types(wd: tuple[Path, int], tmp_path: Path) -> None:
    d, fd = wd
    deep = b"[" * 200_000 + b"]" * 200_000
    for blob in (deep, b"{" * 100_000, b'{"format": 1, "source_file": "' + b"x" * (MAX_STAMPS_BYTES + 1) + b'"}',
                 json.dumps({**VALID, "video": {"mtime": float("nan"), "size": 1}}).encode(),
                 json.dumps({**VALID, "video": {"mtime": float("inf"), "size": 1}}).encode(),
                 json.dumps({**VALID, "inode": True}).encode(),
                 json.dumps({**VALID, "subtitles": [VALID["subtitles"][0]] * 2}).encode(),
                 json.dumps({**VALID, "format": 1.0000001}).encode()):
        _put(d, blob)
        assert _read(fd) is None, blob[:80]
    _put(d, b"\xff\xfe" + json.dumps(VALID).encode("utf-16-le"))  # JSON may be UTF-16 with a BOM
    assert _read(fd) is not None
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps(VALID))
    (d / STAMPS_NAME).unlink()
    (d / STAMPS_NAME).symlink_to(outside)
    assert _read(fd) is None  # never followed
    (d / STAMPS_NAME).unlink()
    os.mkfifo(d / STAMPS_NAME)  # would block a naive reader forever
    assert _read(fd) is None
    os.unlink(d / STAMPS_NAME)
    (d / STAMPS_NAME).mkdir()
    assert _read(fd) is None
    os.rmdir(d / STAMPS_NAME)
    _put(d, json.dumps(VALID).encode())
    assert _read(fd) is not None


@pytest.mark.parametrize("garbage", [b"", b"null", b"{", b'{"format": 2}', b"\x00" * 64,
                                     json.dumps({**VALID, "video": {"mtime": "soon", "size": -1}}).encode()])
def test_a_corrupt_sidecar_never_costs_valid_results(tmp_path: Path, garbage: bytes) -> None:
    """With the sidecar unreadable, revalidation falls back to the cache's own stamp: a warm work dir keeps
    every result (and nothing is written: the cache proves them, nothing changed); a replaced film is
    still caught, and the invalidation is recorded."""
    film = make_film_with_work_dir(tmp_path / "Heat", "Heat")
    (film.wd.path / STAMPS_NAME).write_bytes(garbage)
    res = revalidate(film.path, film.subtitles)
    assert res.report is None or not res.report.changed_anything
    s = work_state(film)
    assert s.cache_valid and s.stages == tuple(ALL_STAGES) and s.proxy and s.keyframes > 0
    assert res.verification == "cache"
    (film.wd.path / STAMPS_NAME).write_bytes(garbage)
    film.path.write_bytes(b"another film" * 100)
    res = revalidate(film.path, film.subtitles)
    assert res.report is not None and "proxy" in res.report.stages_reset
    rec = current_stamps(film.path, film.subtitles)
    with safefs.dir_fd(film.wd.path) as fd:
        assert read_stamps_at(fd) is not None and read_stamps_at(fd).video == rec.video


# --------------------------------------------------------------------------------------------- journal


def _tree(root: Path) -> dict[str, tuple[int, int, bytes | None]]:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            st = os.lstat(p)
            if p.is_dir():  # a folder's mtime moves when a journal in it is consumed; its files must not
                out[str(p.relative_to(root))] = (st.st_ino, 0, None)
                continue
            data = p.read_bytes() if p.is_file() and not p.is_symlink() else None
            out[str(p.relative_to(root))] = (st.st_ino, st.st_mtime_ns, data)
    return out


def test_planted_journals_move_and_rewrite_nothing(tmp_path: Path) -> None:
    """Journals naming paths outside the libraries, other work dirs, garbage, or nonsense types: the daemon
    starts, serves, keeps every film warm, and no byte outside (or inside) the libraries moves."""
    lib = tmp_path / "lib"
    victim_root = tmp_path / "elsewhere"  # a work-dir-shaped folder outside the libraries
    victim = make_film_with_work_dir(victim_root / "Victim", "Victim")
    films = [make_film_with_work_dir(lib / f"F{i}", f"F{i}") for i in range(7)]
    other = films[0]
    journals: list[object] = [
        {"old_film": str(films[1].path), "new_film": str(victim.path)},  # move it out of the library
        {"old_film": str(victim.path), "new_film": str(films[2].path)},  # "finish" into another dir
        {"old_film": str(other.path), "new_film": str(films[3].path)},  # another film's work dir
        {"old_film": "relative.mkv", "new_film": "x.mkv"},
        {"old_film": str(films[5].path), "new_film": str(films[5].path) + "\x00.mkv"},
        {"old_film": 1, "new_film": ["a"]},
        "not an object",
    ]
    for film, journal in zip(films[1:], journals, strict=False):
        (film.wd.path / "cinecut_migration.json").write_text(json.dumps(journal))
    before_victim = _tree(victim_root)
    before_lib = {k: v for k, v in _tree(lib).items() if "cinecut_migration.json" not in k}
    (tmp_path / "run").mkdir()
    with DaemonRunner(tmp_path / "run") as r:
        d = r.start([Library(lib)])
        assert d.request("ping")["pong"]
        st = d.status()
        assert st["films"]["total"] == len(films)
    assert _tree(victim_root) == before_victim
    after_lib = {k: v for k, v in _tree(lib).items() if "cinecut_migration.json" not in k and "cinecut.lock" not in k}
    assert after_lib == {k: v for k, v in before_lib.items() if "cinecut.lock" not in k}
    assert all(warm(f) for f in films) and warm(victim)
