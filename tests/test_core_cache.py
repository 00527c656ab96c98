"""The SceneDescription cache: round trips, both directions of upstream compatibility, header-only reads.

Hostile and fuzzed inputs (memory bounds, random bytes) are in test_core_fuzz.py.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import msgpack
import pytest
import upstream_reader as up

from cinecut.inference.cache import (
    CacheState,
    cache_path,
    cache_state,
    decode_cache,
    encode_cache,
    invalidate_cache,
    load_cache,
    read_cache_metadata,
    save_cache,
)
from cinecut.inference.models import SceneDescription
from cinecut.models import KeyframeRecord
from cinecut.safefs import SymlinkRefused
from cinecut.stamp import SourceStamp
from cinecut.workdir import WorkDir


def make_film(tmp_path: Path, name: str = "Heat (1995).mkv", size: int = 4096) -> Path:
    folder = tmp_path / "lib" / Path(name).stem
    folder.mkdir(parents=True, exist_ok=True)
    film = folder / name
    film.write_bytes(os.urandom(size))
    # A sub-second mtime, so exact float comparison is exercised (not an integer that survives anything).
    os.utime(film, ns=(1_700_000_000_123_456_789, 1_700_000_000_123_456_789))
    return film


def sample_results(wd: Path, n: int = 5) -> list[tuple[KeyframeRecord, SceneDescription | None]]:
    out: list[tuple[KeyframeRecord, SceneDescription | None]] = []
    for i in range(n):
        ts = 0.5 + i * 1.25
        rec = KeyframeRecord(ts, str(wd / "keyframes" / f"frame_{int(ts * 1000):010d}.jpg"), "scene_change")
        desc = None if i == 1 else SceneDescription(f"Ünïcode shot {i} 🎬", "calm", "walks", "night street")
        out.append((rec, desc))
    return out


def as_upstream(results: list[tuple[KeyframeRecord, SceneDescription | None]]) -> list[up.Result]:
    return [
        (
            up.KeyframeRecord(r.timestamp_s, r.frame_path, r.source),
            up.SceneDescription(**d.to_dict()) if d is not None else None,
        )
        for r, d in results
    ]


def test_round_trip_and_exact_stamp(tmp_path: Path) -> None:
    film = make_film(tmp_path)
    wd = WorkDir.for_film(film)
    results = sample_results(wd.path)
    path = save_cache(results, film, wd.path)
    assert path == wd.cache_path == wd.path / "Heat (1995).scenedesc.msgpack"
    assert load_cache(film, wd.path) == results
    meta = read_cache_metadata(path)
    assert meta is not None
    assert meta.stamp == SourceStamp.of(film)
    assert meta.source_file == str(film)
    assert cache_state(film, wd) == (CacheState.VALID, meta)
    assert not [p for p in wd.path.iterdir() if p.name.endswith(".tmp")]


def test_stale_when_film_touched_or_resized(tmp_path: Path) -> None:
    film = make_film(tmp_path)
    wd = WorkDir.for_film(film)
    save_cache(sample_results(wd.path), film, wd.path)
    st = film.stat()
    # One microsecond later is a different film state (float st_mtime resolves ~0.24 µs at today's epoch;
    # finer changes are invisible to upstream's stamp by contract).
    os.utime(film, ns=(st.st_atime_ns, st.st_mtime_ns + 1000))
    assert load_cache(film, wd.path) is None
    assert cache_state(film, wd)[0] is CacheState.STALE
    os.utime(film, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert load_cache(film, wd.path) is not None
    with film.open("ab") as f:
        f.write(b"x")
    os.utime(film, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime, different size
    assert load_cache(film, wd.path) is None
    assert cache_state(film, wd)[0] is CacheState.STALE


def test_explicit_stamp_taken_before_reading_is_what_gets_recorded(tmp_path: Path) -> None:
    film = make_film(tmp_path)
    wd = WorkDir.for_film(film)
    before = SourceStamp.of(film)
    film.write_bytes(b"replaced while frames were being described")
    save_cache(sample_results(wd.path), film, wd.path, stamp=before)
    assert read_cache_metadata(wd.cache_path).stamp == before  # type: ignore[union-attr]
    assert load_cache(film, wd.path) is None  # results describe the old film: never served


def test_upstream_written_cache_loads_and_validates(tmp_path: Path) -> None:
    film = make_film(tmp_path)
    wd = up.work_dir_for(film)
    ours = sample_results(wd, 7)
    up.save_cache(as_upstream(ours), film, wd)
    assert load_cache(film, wd) == ours
    state, meta = cache_state(film, WorkDir.for_film(film))
    assert state is CacheState.VALID
    assert meta is not None and meta.stamp == SourceStamp.of(film)


def test_our_cache_loads_with_upstream_exact_calls(tmp_path: Path) -> None:
    film = make_film(tmp_path)
    wd = WorkDir.for_film(film)
    results = sample_results(wd.path, 6)
    save_cache(results, film, wd.path)
    raw = up.unpack_cache_file(wd.cache_path)
    assert list(raw) == ["metadata", "results"]  # metadata first: header-only reads depend on it
    assert list(raw["metadata"]) == ["source_file", "mtime", "size"]
    assert type(raw["metadata"]["mtime"]) is float and type(raw["metadata"]["size"]) is int
    for item in raw["results"]:
        assert set(item) == {"record", "description"}
        assert set(item["record"]) == set(up.KeyframeRecord.__dataclass_fields__)
        if item["description"] is not None:
            assert set(item["description"]) == set(up.SceneDescription.__dataclass_fields__)
    assert up.load_cache(film, wd.path) == as_upstream(results)


def test_encode_matches_upstream_bytes(tmp_path: Path) -> None:
    """Byte-identical to upstream's packing, so nothing about our files can surprise upstream."""
    film = make_film(tmp_path)
    wd = up.work_dir_for(film)
    results = sample_results(wd, 4)
    up.save_cache(as_upstream(results), film, wd)
    assert encode_cache(results, str(film), SourceStamp.of(film)) == up.cache_path_for(film, wd).read_bytes()


def test_header_reads_even_when_results_are_garbage_or_truncated(tmp_path: Path) -> None:
    film = make_film(tmp_path)
    wd = WorkDir.for_film(film)
    save_cache(sample_results(wd.path, 50), film, wd.path)
    good = wd.cache_path.read_bytes()
    header = msgpack.packb(
        {"metadata": {"source_file": str(film), "mtime": film.stat().st_mtime, "size": film.stat().st_size}}
    )[1:]  # the map entry without its 1-entry map header
    start = 1 + len(header)  # 0x82 + metadata entry
    assert good[:start] == b"\x82" + header
    variants = {
        "truncated": good[: start + 10],
        "garbage": good[:start] + os.urandom(len(good) - start),
        "nothing after header": good[:start],
        "hostile length": good[:start] + b"\xa7results\xdd\xff\xff\xff\xff",
    }
    for label, data in variants.items():
        wd.cache_path.write_bytes(data)
        os.utime(wd.cache_path)
        meta = read_cache_metadata(wd.cache_path)
        assert meta is not None and meta.stamp == SourceStamp.of(film), label
        assert load_cache(film, wd.path) is None, label  # a full load rejects what the header cannot see
        with pytest.raises(ValueError):
            decode_cache(data)


def test_header_read_touches_only_the_first_block(tmp_path: Path) -> None:
    """A 3,000-record cache whose results are cut to pieces still answers in about the same time."""
    film = make_film(tmp_path)
    wd = WorkDir.for_film(film)
    save_cache(sample_results(wd.path, 3000), film, wd.path)
    assert wd.cache_path.stat().st_size > 300_000
    t0 = time.perf_counter()
    for _ in range(200):
        assert read_cache_metadata(wd.cache_path) is not None
    per_read = (time.perf_counter() - t0) / 200
    t0 = time.perf_counter()
    assert load_cache(film, wd.path) is not None
    full = time.perf_counter() - t0
    assert per_read * 10 < full, (per_read, full)


def test_misses_for_missing_symlink_fifo_and_directory(tmp_path: Path) -> None:
    film = make_film(tmp_path)
    wd = WorkDir.for_film(film)
    wd.path.mkdir()
    assert load_cache(film, wd.path) is None
    assert read_cache_metadata(wd.cache_path) is None
    assert cache_state(film, wd) == (CacheState.MISSING, None)
    # A symlink to a perfectly valid cache elsewhere is still a miss: the cache must be a real file.
    elsewhere = tmp_path / "elsewhere"
    other = elsewhere / "x_cinecut_work"
    elsewhere.mkdir()
    save_cache(sample_results(other), film, other)
    target = other / wd.cache_name
    before = (target.read_bytes(), target.stat().st_mtime_ns)
    wd.cache_path.symlink_to(target)
    assert load_cache(film, wd.path) is None
    assert read_cache_metadata(wd.cache_path) is None
    assert cache_state(film, wd)[0] is CacheState.CORRUPT
    with pytest.raises(SymlinkRefused):  # refused loudly, link left in place, target untouched
        invalidate_cache(film, wd.path)
    assert wd.cache_path.is_symlink()
    assert (target.read_bytes(), target.stat().st_mtime_ns) == before
    wd.cache_path.unlink()
    os.mkfifo(wd.cache_path)
    t0 = time.monotonic()
    assert load_cache(film, wd.path) is None
    assert read_cache_metadata(wd.cache_path) is None
    assert time.monotonic() - t0 < 1.0  # a FIFO with no writer must not block
    wd.cache_path.unlink()
    wd.cache_path.mkdir()
    assert load_cache(film, wd.path) is None
    assert read_cache_metadata(wd.cache_path) is None


def test_vanished_film_is_a_miss(tmp_path: Path) -> None:
    film = make_film(tmp_path)
    wd = WorkDir.for_film(film)
    save_cache(sample_results(wd.path), film, wd.path)
    film.unlink()
    assert load_cache(film, wd.path) is None
    assert cache_state(film, wd)[0] is CacheState.STALE


def test_invalidate_cache_removes_only_the_cache(tmp_path: Path) -> None:
    film = make_film(tmp_path)
    wd = up.run_pipeline(film)
    before = sorted(p.relative_to(wd) for p in wd.rglob("*"))
    assert invalidate_cache(film, wd) is True
    assert invalidate_cache(film, wd) is False
    after = sorted(p.relative_to(wd) for p in wd.rglob("*"))
    assert set(before) - set(after) == {Path(f"{film.stem}.scenedesc.msgpack")}
    assert load_cache(film, wd) is None


def test_save_through_symlinked_work_dir_is_refused(tmp_path: Path) -> None:
    film = make_film(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    WorkDir.for_film(film).path.symlink_to(outside)
    with pytest.raises(OSError):
        save_cache(sample_results(outside), film, WorkDir.for_film(film).path)
    assert list(outside.iterdir()) == []


def test_cache_path_matches_upstream(tmp_path: Path) -> None:
    film = make_film(tmp_path, "Alien (1979).mp4")
    assert cache_path(film, up.work_dir_for(film)) == up.cache_path_for(film, up.work_dir_for(film))
