"""Hostile input: the cache, checkpoint and stamps readers against crafted and fuzzed files.

Crafted bombs run in a child process under an address-space limit, so a regression fails the test with a
MemoryError instead of taking the machine down; peak allocation is measured per case with tracemalloc
(and the child's max RSS growth with getrusage). Random and mutated files go through hypothesis.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import upstream_reader as up
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cinecut import safefs
from cinecut.checkpoint import (
    MAX_CHECKPOINT_BYTES,
    CheckpointStatus,
    PipelineCheckpoint,
    encode_checkpoint,
    parse_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from cinecut.inference.cache import (
    CacheState,
    cache_state,
    decode_cache,
    encode_cache,
    load_cache,
    metadata_from_fd,
    read_cache_metadata,
    stream_metadata,
)
from cinecut.inference.models import SceneDescription
from cinecut.models import KeyframeRecord
from cinecut.stamp import SourceStamp
from cinecut.stamps import InputStamps, read_stamps, write_stamps_at
from cinecut.workdir import WorkDir

MB = 1 << 20
GB4 = b"\xff\xff\xff\xff"
BILLION = struct.pack(">I", 1_000_000_000)


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def valid_payload(film: Path, n: int = 3) -> dict[str, Any]:
    st_ = film.stat()
    return {
        "metadata": {"source_file": str(film), "mtime": st_.st_mtime, "size": st_.st_size},
        "results": [
            {
                "record": {"timestamp_s": 1.0 + i, "frame_path": f"/k/frame_{i:010d}.jpg", "source": "scene_change"},
                "description": {"visual_content": "v", "mood": "m", "action": "a", "setting": "s"},
            }
            for i in range(n)
        ],
    }


def meta_prefix(film: Path) -> bytes:
    """A valid map header and metadata entry, ready for a hostile ``results`` entry."""
    return b"\x82" + pack({"metadata": valid_payload(film)["metadata"]})[1:]


def cache_bombs(film: Path) -> dict[str, bytes]:
    prefix = meta_prefix(film)
    nested_arrays = (b"\xdd" + struct.pack(">I", 200_000)) * 1000
    nested_maps = b"\xde\xff\xff" * 1000
    good = pack(valid_payload(film))
    bombs = {
        "4 GB string as first key": b"\x82\xdb" + GB4 + b"metadata",
        "4 GB string in metadata": b"\x82\xa8metadata\x83\xabsource_file\xdb" + GB4 + b"abc",
        "4 GB string in results": prefix + b"\xa7results\x91\x82\xa6record\x83\xabtimestamp_s\xdb" + GB4,
        "4 GB bin in metadata": b"\x82\xa8metadata\xc6" + GB4 + b"\x00",
        "4 GB ext": prefix + b"\xa7results\xc9" + GB4 + b"\x01",
        "billion-entry results array": prefix + b"\xa7results\xdd" + BILLION + b"\xc0" * 16,
        "billion-entry top array": b"\xdd" + BILLION,
        "billion-entry top map": b"\xdf" + BILLION,
        "billion-entry map in metadata": b"\x82\xa8metadata\xdf" + BILLION,
        "billion-entry map in a record": prefix + b"\xa7results\x91\xdf" + BILLION,
        "pre-sized nested arrays in metadata": (b"\x82\xa8metadata" + nested_arrays).ljust(250_000, b"\xc0"),
        "pre-sized nested arrays in results": (prefix + b"\xa7results\x91" + nested_arrays).ljust(250_000, b"\xc0"),
        "pre-sized nested maps": (prefix + b"\xa7results\x91" + nested_maps).ljust(250_000, b"\xc0"),
        "deep array nesting": prefix + b"\xa7results\x91" + b"\x91" * 100_000 + b"\xc0",
        "deep map nesting": b"\x82\xa8metadata" + b"\x81\xa1k" * 50_000 + b"\xc0",
        "truncated": good[: len(good) // 2],
        "trailing garbage": good + b"\x00",
        "random": os.urandom(65_536),
        "empty": b"",
    }
    wrong = valid_payload(film)
    variants: dict[str, Any] = {
        "metadata is a list": {**wrong, "metadata": [1, 2, 3]},
        "mtime is a string": {**wrong, "metadata": {**wrong["metadata"], "mtime": "yesterday"}},
        "size is negative": {**wrong, "metadata": {**wrong["metadata"], "size": -1}},
        "results is a map": {**wrong, "results": {"a": 1}},
        "extra top key": {**wrong, "extra": 1},
        "record has extra key": {**wrong, "results": [{**wrong["results"][0], "record": {
            **wrong["results"][0]["record"], "score": 1}}]},
        "description is an int": {**wrong, "results": [{**wrong["results"][0], "description": 7}]},
        "timestamp is NaN": {**wrong, "results": [{**wrong["results"][0], "record": {
            **wrong["results"][0]["record"], "timestamp_s": float("nan")}}]},
        "unknown source": {**wrong, "results": [{**wrong["results"][0], "record": {
            **wrong["results"][0]["record"], "source": "vibes"}}]},
    }
    bombs.update({k: pack(v) for k, v in variants.items()})
    return bombs


def checkpoint_bombs() -> dict[str, bytes]:
    limit = MAX_CHECKPOINT_BYTES
    return {
        "deep nesting": b"[" * (limit - 1),
        "empty objects up to the size cap": b"[" + b"{}," * ((limit - 3) // 3) + b"{}]",
        "zeros up to the size cap": b"[" + b"0," * ((limit - 3) // 2) + b"0]",
        "huge integer": b'{"source_file": "a", "vibe": "b", "keyframe_count": ' + b"9" * 100_000 + b"}",
        "long string": b'{"source_file": "' + b"a" * (limit - 100) + b'", "vibe": 1}',
        "random": os.urandom(65_536),
        "wrong types": b'{"source_file": 1, "vibe": [], "stages_complete": {}}',
    }


HOSTILE_CHILD = r"""
import json, os, resource, sys, time, tracemalloc
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
from cinecut import safefs
from cinecut.checkpoint import read_checkpoint
from cinecut.inference.cache import cache_state, load_cache, metadata_from_fd, read_cache_metadata
from cinecut.stamps import read_stamps

def from_fd(c):
    d = os.open(c["wd"], os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = safefs.open_regular(d, os.path.basename(c["cache"]))
    except OSError:
        return "refused"
    finally:
        os.close(d)
    try:
        return metadata_from_fd(fd)
    finally:
        os.close(fd)

READERS = {
    "load_cache": lambda c: load_cache(c["film"], c["wd"]),
    "read_cache_metadata": lambda c: read_cache_metadata(c["cache"]),
    "cache_state": lambda c: cache_state(c["film"], c["wd"])[0].value,
    "metadata_from_fd": from_fd,
    "read_checkpoint": lambda c: read_checkpoint(c["wd"]).status.value,
    "read_stamps": lambda c: read_stamps(c["wd"]),
}

def run(c):
    out = READERS[c["reader"]](c)
    return out if isinstance(out, str) else type(out).__name__

cases = json.load(open(sys.argv[1]))
for c in cases:  # warm-up: imports, caches and code paths that allocate once
    if c["label"] == "valid":
        run(c)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for c in cases:
    try:
        run(c)
    except BaseException:
        pass
rss_growth_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
tracemalloc.start()
out = []
for c in cases:
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    try:
        result, error = run(c), None
    except BaseException as exc:
        result, error = None, repr(exc)[:300]
    out.append({**c, "result": result, "error": error, "seconds": time.perf_counter() - t0,
                "peak": tracemalloc.get_traced_memory()[1] - before})
print(json.dumps({"rss_growth_kb": rss_growth_kb, "cases": out}))
"""


def film_dir(root: Path, label: str) -> tuple[Path, WorkDir]:
    folder = root / f"case{len(list(root.iterdir())):03d}"
    folder.mkdir()
    film = folder / "Film.mkv"
    film.write_bytes(b"film bytes")
    os.utime(film, ns=(1_700_000_000_250_000_000, 1_700_000_000_250_000_000))  # every case: the same stamp
    wd = WorkDir.for_film(film)
    wd.path.mkdir()
    (folder / "label").write_text(label)
    return film, wd


def test_hostile_files_are_misses_with_bounded_memory_and_time(tmp_path: Path) -> None:
    root = tmp_path / "lib"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    cases: list[dict[str, Any]] = []

    def add(label: str, film: Path, wd: WorkDir, readers: tuple[str, ...], expect: str) -> None:
        for reader in readers:
            cases.append({"label": label, "reader": reader, "film": str(film), "wd": str(wd.path),
                          "cache": str(wd.cache_path), "expect": expect})

    cache_readers = ("load_cache", "read_cache_metadata", "cache_state", "metadata_from_fd")
    film, wd = film_dir(root, "valid")
    wd.cache_path.write_bytes(pack(valid_payload(film)))
    save_checkpoint(PipelineCheckpoint(str(film), "v"), wd)
    add("valid", film, wd, (*cache_readers, "read_checkpoint"), "hit")
    for label, data in cache_bombs(film).items():
        f, w = film_dir(root, label)
        data = data.replace(str(film).encode(), str(f).encode())
        w.cache_path.write_bytes(data)
        # Header-only readers answer from a valid metadata entry whatever follows it (by design).
        header_ok = data[:1] != b"" and 0x81 < data[0] < 0x90 and data[1:].startswith(meta_prefix(f)[1:])
        add(label, f, w, ("load_cache",), "miss")
        add(label, f, w, cache_readers[1:], "hit" if header_ok else "miss")
    for label, data in checkpoint_bombs().items():
        f, w = film_dir(root, label)
        (w.path / "pipeline_checkpoint.json").write_bytes(data)
        (w.path / "cinecut_stamps.json").write_bytes(data)
        add(label, f, w, ("read_checkpoint", "read_stamps"), "miss")
    # Special files in place of every file: a FIFO, a directory, a symlink to a valid file outside, 100 MB.
    target_cache = outside / "valid.msgpack"
    target_cache.write_bytes(pack(valid_payload(film)))
    target_json = outside / "valid.json"
    target_json.write_bytes(encode_checkpoint(PipelineCheckpoint(str(film), "v")))
    kinds = ("fifo", "directory", "symlink", "100 MB sparse", "100 MB zeros after a valid header",
             "60 MB zeros after a valid header")  # the last is under the cache's size cap: streamed, not read
    for kind in kinds:
        f, w = film_dir(root, kind)
        for name, target in ((w.cache_name, target_cache), ("pipeline_checkpoint.json", target_json),
                             ("cinecut_stamps.json", target_json)):
            p = w.path / name
            if kind == "fifo":
                os.mkfifo(p)
            elif kind == "directory":
                p.mkdir()
            elif kind == "symlink":
                p.symlink_to(target)
            else:
                with p.open("wb") as fh:
                    if kind.endswith("header") and name == w.cache_name:
                        fh.write(meta_prefix(f))
                    fh.truncate((60 if kind.startswith("60") else 100) * MB)
        header_ok = kind.endswith("header")
        add(kind, f, w, ("load_cache",), "miss")
        add(kind, f, w, cache_readers[1:], "hit" if header_ok else "miss")
        add(kind, f, w, ("read_checkpoint", "read_stamps"), "miss")
    spec = tmp_path / "cases.json"
    spec.write_text(json.dumps(cases))
    before_outside = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in outside.iterdir()}

    proc = subprocess.run([sys.executable, "-c", HOSTILE_CHILD, str(spec)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)

    bad = []
    for c in report["cases"]:
        miss = c["result"] in ("NoneType", "corrupt", "missing", "stale", "unreadable", "refused")
        # msgpack readers stay under 4 MB whatever is declared; JSON costs up to ~25x its (capped) size.
        limit = 8 * MB if c["reader"] in ("read_checkpoint", "read_stamps") else 4 * MB
        if c["error"] or miss != (c["expect"] == "miss") or c["seconds"] > 1.0 or c["peak"] > limit:
            bad.append((c["label"], c["reader"], c["result"], c["error"], round(c["seconds"], 3), c["peak"]))
    assert not bad, bad
    for kind in ("msgpack", "json"):
        group = [c for c in report["cases"] if (c["reader"] in ("read_checkpoint", "read_stamps")) == (kind == "json")]
        worst = max(group, key=lambda c: c["peak"])
        slowest = max(group, key=lambda c: c["seconds"])
        print(f"{len(group)} hostile {kind} reads: worst peak {worst['peak'] / MB:.2f} MB ({worst['label']} / "
              f"{worst['reader']}), slowest {slowest['seconds'] * 1e3:.1f} ms ({slowest['label']})")
    assert report["rss_growth_kb"] < 16 * 1024
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in outside.iterdir()} == before_outside


# --- hypothesis fuzzing ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_film(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, WorkDir]:
    folder = tmp_path_factory.mktemp("fuzz")
    film = folder / "Fuzz.mkv"
    film.write_bytes(b"fuzz film")
    wd = WorkDir.for_film(film)
    wd.path.mkdir()
    return film, wd


def upstream_accepts_cache(data: bytes) -> bool:
    """Upstream's exact load of cache bytes (without the stamp check)."""
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
        _ = obj["metadata"]["mtime"], obj["metadata"]["size"]
        for r in obj["results"]:
            up.KeyframeRecord(**r["record"])
            if r["description"]:
                up.SceneDescription(**r["description"])
    except Exception:
        return False
    return True


def all_cache_readers(film: Path, wd: WorkDir, data: bytes) -> None:
    """Every cache reader on these bytes: none may raise, each must answer quickly."""
    t0 = time.perf_counter()
    try:
        meta, results = decode_cache(data)
    except ValueError:
        decoded = False
    else:
        decoded = True
        # Whatever we accept, upstream accepts: we never hand upstream a cache it would choke on.
        assert upstream_accepts_cache(data)
    wd.cache_path.write_bytes(data)
    header = read_cache_metadata(wd.cache_path)
    assert header == stream_metadata(io.BytesIO(data)) if header else True
    fd = safefs.open_regular(os.open(wd.path, os.O_RDONLY), wd.cache_name)
    try:
        assert metadata_from_fd(fd) == header
    finally:
        os.close(fd)
    loaded = load_cache(film, wd)
    state, _ = cache_state(film, wd)
    if decoded:
        assert header == meta
        assert (loaded is not None) == (meta.stamp == SourceStamp.of(film))
        assert loaded is None or loaded == results
    else:
        assert loaded is None
    assert state in (CacheState.VALID, CacheState.STALE, CacheState.CORRUPT)
    assert time.perf_counter() - t0 < 1.0


FUZZ = settings(max_examples=250, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(data=st.binary(max_size=4096))
def test_fuzz_cache_random_bytes(fuzz_film: tuple[Path, WorkDir], data: bytes) -> None:
    all_cache_readers(*fuzz_film, data)


mutation = st.one_of(
    st.tuples(st.just("truncate"), st.integers(0, 10_000)),
    st.tuples(st.just("set"), st.integers(0, 10_000), st.integers(0, 255)),
    st.tuples(st.just("insert"), st.integers(0, 10_000), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.integers(0, 10_000), st.integers(1, 16)),
)


def mutate(data: bytes, ops: list[tuple]) -> bytes:
    buf = bytearray(data)
    for op in ops:
        if not buf:
            break
        i = op[1] % len(buf)
        if op[0] == "truncate":
            del buf[i:]
        elif op[0] == "set":
            buf[i] = op[2]
        elif op[0] == "insert":
            buf[i:i] = op[2]
        else:
            del buf[i : i + op[2]]
    return bytes(buf)


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)
CACHE_PATHS = [("metadata",), ("metadata", "mtime"), ("metadata", "size"), ("metadata", "source_file"),
               ("results",), ("results", 0), ("results", 0, "record"), ("results", 0, "record", "timestamp_s"),
               ("results", 0, "record", "source"), ("results", 0, "description"),
               ("results", 0, "description", "mood"), ("results", 1, "extra")]


def edit(obj: Any, path: tuple, value: Any) -> None:
    """Set (or delete, for ``"__delete__"``) the entry at ``path``; a path that no longer exists is skipped."""
    for key in path[:-1]:
        if isinstance(obj, list) and isinstance(key, int) and obj:
            obj = obj[key % len(obj)]
        elif isinstance(obj, dict) and key in obj:
            obj = obj[key]
        else:
            return
    last = path[-1]
    if isinstance(obj, list) and isinstance(last, int) and obj:
        if value == "__delete__":
            del obj[last % len(obj)]
        else:
            obj[last % len(obj)] = value
    elif isinstance(obj, dict):
        if value == "__delete__":
            obj.pop(last, None)
        else:
            obj[last] = value


@FUZZ
@given(ops=st.lists(mutation, min_size=1, max_size=4), edits=st.lists(
    st.tuples(st.sampled_from(CACHE_PATHS), msgpack_values | st.just("__delete__")), max_size=2))
def test_fuzz_cache_structured_mutations(fuzz_film: tuple[Path, WorkDir], ops: list, edits: list) -> None:
    film, wd = fuzz_film
    payload = valid_payload(film, 3)
    for path, value in edits:
        edit(payload, path, value)
    good = pack(payload)
    all_cache_readers(film, wd, good)
    all_cache_readers(film, wd, mutate(good, ops))


def check_checkpoint_bytes(wd: WorkDir, data: bytes) -> None:
    t0 = time.perf_counter()
    parsed = parse_checkpoint(data)
    (wd.path / "pipeline_checkpoint.json").write_bytes(data)
    read = read_checkpoint(wd)
    assert read.status in (CheckpointStatus.OK, CheckpointStatus.UNREADABLE)
    assert (read.status, read.checkpoint) == (parsed.status, parsed.checkpoint)
    if read.status is CheckpointStatus.OK:
        assert read.checkpoint is not None
        assert up.PipelineCheckpoint(**json.loads(data)) is not None  # upstream takes what we take
        save_checkpoint(read.checkpoint, wd)  # and what we write back still loads upstream, same values
        assert up.load_checkpoint_strict(wd.path).__dict__ == read.checkpoint.to_dict()
    else:
        assert read.reason
    assert time.perf_counter() - t0 < 1.0


@FUZZ
@given(data=st.binary(max_size=2048))
def test_fuzz_checkpoint_random_bytes(fuzz_film: tuple[Path, WorkDir], data: bytes) -> None:
    check_checkpoint_bytes(fuzz_film[1], data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=10,
)
checkpoint_keys = st.sampled_from(sorted(up.UPSTREAM_CHECKPOINT_KEYS)) | st.text(max_size=12)


@FUZZ
@given(
    fields=st.dictionaries(checkpoint_keys, json_values, max_size=6),
    base=st.booleans(),
    ops=st.lists(mutation, max_size=2),
)
def test_fuzz_checkpoint_structured(fuzz_film: tuple[Path, WorkDir], fields: dict, base: bool, ops: list) -> None:
    obj: dict[str, Any] = PipelineCheckpoint("/lib/F.mkv", "v", ["proxy"]).to_dict() if base else {}
    obj.update(fields)
    data = json.dumps(obj, allow_nan=True).encode()
    check_checkpoint_bytes(fuzz_film[1], data)
    check_checkpoint_bytes(fuzz_film[1], mutate(data, ops))


valid_stamp = st.fixed_dictionaries({"mtime": st.floats(allow_nan=False), "size": st.integers(0, 10**12)})
valid_stamps_file = st.fixed_dictionaries(
    {
        "format": st.just(1),
        "source_file": st.text(max_size=8),
        "video": st.none() | valid_stamp,
        "inode": st.none() | st.integers(0, 2**64),
        "device": st.none() | st.integers(0, 2**32),
        "subtitles": st.lists(
            st.tuples(st.sampled_from([".en.srt", ".srt", ".fr.ass"]), valid_stamp).map(
                lambda t: {"name": t[0], **t[1]}
            ),
            max_size=4,
        ),
    }
)
# Mostly-valid files with one field swapped for anything, so the checks deep inside are reached.
stamp_dicts = valid_stamps_file | st.tuples(
    valid_stamps_file, st.sampled_from(["format", "source_file", "video", "inode", "device", "subtitles"]),
    json_values,
).map(lambda t: {**t[0], t[1]: t[2]})


@FUZZ
@given(obj=stamp_dicts, raw=st.binary(max_size=512), ops=st.lists(mutation, max_size=2))
def test_fuzz_stamps_reader(fuzz_film: tuple[Path, WorkDir], obj: dict, raw: bytes, ops: list) -> None:
    wd = fuzz_film[1]
    fd = os.open(wd.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for data in (json.dumps(obj).encode(), raw, mutate(json.dumps(obj).encode(), ops)):
            (wd.path / "cinecut_stamps.json").write_bytes(data)
            t0 = time.perf_counter()
            stamps = read_stamps(wd.path)
            assert time.perf_counter() - t0 < 1.0
            if stamps is not None:  # anything we accept survives our own write and read unchanged
                assert isinstance(stamps, InputStamps)
                write_stamps_at(fd, stamps)
                assert read_stamps(wd.path) == stamps
    finally:
        os.close(fd)


def test_upstream_objects_survive_our_readers(fuzz_film: tuple[Path, WorkDir]) -> None:
    """The fuzz helpers accept a genuine cache: the properties above are not vacuous."""
    film, wd = fuzz_film
    data = encode_cache(
        [(KeyframeRecord(1.0, "/k/a.jpg", "interval_fallback"), SceneDescription("a", "b", "c", "d"))],
        str(film), SourceStamp.of(film),
    )
    assert upstream_accepts_cache(data)
    all_cache_readers(film, wd, data)
    assert load_cache(film, wd) is not None
