"""The resumable partial results stream: crash tolerance, bounded reads, resume rules, never a cache."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import msgpack
import pytest
import upstream_reader as up

from cinecut import safefs
from cinecut.inference.cache import decode_cache, read_cache_metadata
from cinecut.inference.models import SceneDescription
from cinecut.inference.partial import (
    PartialHeader,
    PartialWriter,
    SyncPolicy,
    decode_partial,
    encode_entry,
    open_partial,
    plan_fingerprint,
    plan_of,
    read_partial,
    read_partial_at,
)
from cinecut.models import KeyframeRecord
from cinecut.stamp import SourceStamp
from cinecut.workdir import WorkDir

STAMP = SourceStamp(1_700_000_000.123456, 123_456_789)
SOURCES = ("subtitle_midpoint", "scene_change", "interval_fallback")


def _records(wd: WorkDir, n: int) -> list[KeyframeRecord]:
    return [
        KeyframeRecord(
            1.5 + 2.25 * i,
            str(wd.keyframes_dir / f"frame_{int((1.5 + 2.25 * i) * 1000):010d}.jpg"),
            SOURCES[i % 3],
        )
        for i in range(n)
    ]


def _desc(i: int) -> SceneDescription | None:
    return None if i % 4 == 3 else SceneDescription(f"shot {i}", "tense", "running", "street at night")


@pytest.fixture
def wd(tmp_path: Path) -> WorkDir:
    film = tmp_path / "Heat (1995).mkv"
    film.write_bytes(b"film")
    w = WorkDir.for_film(film)
    w.path.mkdir()
    return w


def _write(wd: WorkDir, records: list[KeyframeRecord], n_done: int, **kw: object) -> PartialWriter:
    with safefs.work_dir_fd(wd.path) as fd:
        writer, done = open_partial(
            fd, wd.partial_name, source_file=str(wd.film), stamp=STAMP, plan=plan_of(records), **kw
        )  # type: ignore[arg-type]
    for i in range(len(done), n_done):
        writer.append(records[i], _desc(i))
    return writer


def test_round_trip_keeps_order_descriptions_and_failed_frames(wd: WorkDir) -> None:
    records = _records(wd, 9)
    _write(wd, records, 9).close()
    got = read_partial(wd.partial_cache_path)
    assert got is not None and got.damage is None
    assert got.header.stamp == STAMP and got.header.source_file == str(wd.film)
    assert got.header.plan == plan_of(records)
    assert got.results == [(r, _desc(i)) for i, r in enumerate(records)]
    assert (got.done, got.total) == (9, 9)
    assert got.valid_bytes == got.total_bytes == wd.partial_cache_path.stat().st_size


def test_never_mistaken_for_a_cache(wd: WorkDir) -> None:
    records = _records(wd, 3)
    _write(wd, records, 2).close()
    data = wd.partial_cache_path.read_bytes()
    assert wd.partial_cache_path.name != wd.cache_path.name
    assert not wd.cache_path.exists()
    with pytest.raises(msgpack.ExtraData):  # upstream's exact call refuses a stream of objects
        msgpack.unpackb(data, raw=False, strict_map_key=False)
    # Even renamed to the cache's name, neither upstream's reader nor ours would take it as a cache.
    os.rename(wd.partial_cache_path, wd.cache_path)
    with pytest.raises(msgpack.ExtraData):
        up.load_cache(wd.film, wd.path)
    with pytest.raises(ValueError):
        decode_cache(data)
    assert read_cache_metadata(wd.cache_path) is None
    # A header alone is a single map, but without upstream's "metadata" entry.
    header_only = PartialHeader.for_plan(str(wd.film), STAMP, plan_of(records)).encode()
    assert "metadata" not in msgpack.unpackb(header_only, raw=False, strict_map_key=False)


def test_every_truncation_of_the_last_entry_keeps_the_prefix_and_resume_repairs_it(wd: WorkDir) -> None:
    records = _records(wd, 5)
    _write(wd, records, 5).close()
    full = wd.partial_cache_path.read_bytes()
    last = encode_entry(records[4], _desc(4))
    cut_base = len(full) - len(last)
    for cut in range(len(last)):
        got = decode_partial(full[: cut_base + cut])
        assert got.done == 4 and got.valid_bytes == cut_base
        assert got.damage == (None if cut == 0 else "truncated entry")
    # A crash mid-append: resume cuts the torn bytes off and appends after the valid prefix.
    wd.partial_cache_path.write_bytes(full[: cut_base + len(last) // 2])
    with safefs.work_dir_fd(wd.path) as fd:
        writer, done = open_partial(
            fd, wd.partial_name, source_file=str(wd.film), stamp=STAMP, plan=plan_of(records)
        )
    assert len(done) == 4
    writer.append(records[4], _desc(4))
    writer.close()
    assert wd.partial_cache_path.read_bytes() == full


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00" * 64,
        b"\xc1\xc1\xc1",
        b"\x92\x01\x02",
        msgpack.packb({"record": 1, "description": None}),
        os.urandom(97),
    ],
    ids=["zeros", "reserved-byte", "wrong-type", "bad-record", "random"],
)
def test_trailing_garbage_ends_the_prefix_and_is_cut_off_on_resume(wd: WorkDir, garbage: bytes) -> None:
    records = _records(wd, 6)
    _write(wd, records, 3).close()
    good = wd.partial_cache_path.read_bytes()
    wd.partial_cache_path.write_bytes(good + garbage)
    got = read_partial(wd.partial_cache_path)
    assert got is not None and got.done == 3 and got.damage is not None
    assert got.valid_bytes == len(good)
    writer = _write(wd, records, 6)
    writer.close()
    final = read_partial(wd.partial_cache_path)
    assert final is not None and final.damage is None and final.done == 6


def test_entries_must_follow_the_plan(wd: WorkDir) -> None:
    records = _records(wd, 4)
    writer = _write(wd, records, 1)
    with pytest.raises(ValueError, match="not the plan's next keyframe"):
        writer.append(records[2], None)
    writer.close()
    # An entry for another keyframe written by hand ends the valid prefix.
    with open(wd.partial_cache_path, "ab") as f:
        f.write(encode_entry(records[3], None))
    got = read_partial(wd.partial_cache_path)
    assert got is not None and got.done == 1 and "does not follow the plan" in (got.damage or "")


def test_resume_only_for_the_same_film_stamp_and_plan(wd: WorkDir) -> None:
    records = _records(wd, 6)
    _write(wd, records, 4).close()
    with safefs.work_dir_fd(wd.path) as fd:
        w, done = open_partial(
            fd, wd.partial_name, source_file=str(wd.film), stamp=STAMP, plan=plan_of(records)
        )
        w.close()
        assert len(done) == 4
        other_stamp = SourceStamp(STAMP.mtime, STAMP.size + 1)
        w, done = open_partial(
            fd, wd.partial_name, source_file=str(wd.film), stamp=other_stamp, plan=plan_of(records)
        )
        w.close()
        assert done == []
        got = read_partial_at(fd, wd.partial_name)
        assert got is not None and got.header.stamp == other_stamp and got.done == 0
        _write(wd, records, 4).close()  # (starts over again: the stamp differs once more)
        other_plan = plan_of(records[:5])
        w, done = open_partial(fd, wd.partial_name, source_file=str(wd.film), stamp=STAMP, plan=other_plan)
        w.close()
        assert done == []
        got = read_partial_at(fd, wd.partial_name)
        assert got is not None and got.header.plan == other_plan


def test_fingerprint_ignores_where_the_work_dir_lives(tmp_path: Path) -> None:
    a = WorkDir.for_film(tmp_path / "a" / "Film.mkv")
    b = WorkDir.for_film(tmp_path / "b" / "Film.mkv")
    assert plan_fingerprint(plan_of(_records(a, 5))) == plan_fingerprint(plan_of(_records(b, 5)))
    assert plan_fingerprint(plan_of(_records(a, 5))) != plan_fingerprint(plan_of(_records(a, 4)))


def test_sync_policy_counts_frames(wd: WorkDir) -> None:
    records = _records(wd, 7)
    writer = _write(wd, records, 7, policy=SyncPolicy(frames=3, seconds=3600))
    assert writer.syncs == 2  # after frames 3 and 6
    writer.close()
    assert writer.syncs == 3  # the 7th, at close
    writer.close()  # idempotent
    with pytest.raises(RuntimeError):
        writer.append(records[0], None)


def test_hostile_headers_are_refused_without_large_allocations(wd: WorkDir) -> None:
    huge_plan = (
        b"\x87" + msgpack.packb("plan") + b"\xdd\x7f\xff\xff\xff"  # an array declaring 2**31 entries
    )
    huge_string = b"\x87" + msgpack.packb("format") + b"\xdb\x7f\xff\xff\xff" + b"x" * 10
    deep = b"\x91" * 100_000
    records = _records(wd, 2)
    header = PartialHeader.for_plan(str(wd.film), STAMP, plan_of(records)).encode()
    huge_entry = header + b"\x82" + msgpack.packb("record") + b"\xdb\x7f\xff\xff\xff" + b"y" * 10
    tracemalloc.start()
    try:
        for data in (huge_plan, huge_string, deep, b"", b"\xc1", header[: len(header) // 2]):
            with pytest.raises(ValueError):
                decode_partial(data)
        got = decode_partial(huge_entry)
        assert got.done == 0 and got.damage
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak


def test_a_symlinked_partial_is_never_read_nor_written_through(wd: WorkDir, tmp_path: Path) -> None:
    records = _records(wd, 3)
    _write(wd, records, 3).close()
    elsewhere = tmp_path / "elsewhere.partial"
    os.rename(wd.partial_cache_path, elsewhere)
    before = elsewhere.read_bytes()
    wd.partial_cache_path.symlink_to(elsewhere)
    assert read_partial(wd.partial_cache_path) is None
    writer = _write(wd, records, 1)  # starts over: the link is replaced by a real file
    writer.close()
    assert elsewhere.read_bytes() == before
    assert not wd.partial_cache_path.is_symlink()
    got = read_partial(wd.partial_cache_path)
    assert got is not None and got.done == 1
