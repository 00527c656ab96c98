"""A file of ours that is a hard link to someone else's file is never written through.

Dedupe tools and ``cp -al`` make hard links; ``O_NOFOLLOW`` does not see them. For every kind of file we
write (lock files, the lock holder note, checkpoint, stamps sidecar, cache, migration journal, the partial
result stream, GPU lock and want files, pre-warm logs), the name is hard-linked to a "film" outside, the
real code path runs (a daemon event, a pipeline writer, the GPU handover, a worker start), and the film
must keep its bytes and its mtime.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cinecut import safefs
from cinecut.inference.models import SceneDescription
from cinecut.inference.partial import open_partial, read_partial_at
from cinecut.locks import GpuLock, work_dir_lock
from cinecut.models import KeyframeRecord
from cinecut.stamp import SourceStamp
from cinecut.workdir import LOCK_NAME, STAMPS_NAME, WorkDir
from cinecutd.prewarm.supervisor import WorkerProcess
from tests.harness.checks import subtitles_invalidated
from tests.harness.films import SRT, film_bytes, make_film, make_film_with_work_dir
from tests.harness.runner import DaemonRunner, Library
from tests.harness.waiting import wait_for

OLD_NS = 1_500_000_000_000_000_000


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[DaemonRunner]:
    with DaemonRunner(tmp_path) as r:
        yield r


def _victim(path: Path, data: bytes | None = None) -> tuple[bytes, int]:
    """Give ``path`` an old mtime; return (bytes, mtime_ns) it must keep."""
    if data is not None:
        path.write_bytes(data)
    os.utime(path, ns=(OLD_NS, OLD_NS))
    return path.read_bytes(), path.stat().st_mtime_ns


def _hardlink(name: Path, target: Path) -> None:
    name.unlink(missing_ok=True)
    os.link(target, name)


def _intact(path: Path, before: tuple[bytes, int]) -> bool:
    return (path.read_bytes(), path.stat().st_mtime_ns) == before


def test_hard_linked_work_dir_files_never_write_a_film(runner: DaemonRunner, tmp_path: Path) -> None:
    """The reported case: A's lock is a hard link to film B; an edit of A's subtitle must leave B alone.
    The same holds for every name the daemon rewrites in a work dir (checkpoint, stamps, cache)."""
    lib = runner.library()
    a = make_film_with_work_dir(lib / "A", "A")
    b = make_film(lib / "B", "B", size=256 * 1024, seed=7, trailer=None)
    b_before = _victim(b.path)
    _hardlink(a.wd.path / LOCK_NAME, b.path)
    outside = tmp_path / "outside"
    outside.mkdir()
    # Other names share their inode with a file outside (what `cp -al` of a work dir leaves).
    twins = {}
    for name in ("pipeline_checkpoint.json", STAMPS_NAME, a.wd.cache_path.name):
        twin = outside / f"twin-{name}"
        os.link(a.wd.path / name, twin)
        twins[twin] = _victim(twin)
    d = runner.start([Library(lib)], settle_seconds=0.2)

    a.subtitles[0].write_text(SRT.replace("Hello there.", "Hello, there!"))
    wait_for(lambda: subtitles_invalidated(a), what="A's stages reset from subtitles")
    d.request("rescan", timeout=30)

    assert _intact(b.path, b_before), "film B was written through A's hard-linked lock file"
    for twin, before in twins.items():
        assert _intact(twin, before), f"{twin.name} was written through a hard link"
    assert d.status()["films"]["total"] >= 2  # still running and answering


def test_a_migration_never_writes_through_hard_linked_names(runner: DaemonRunner, tmp_path: Path) -> None:
    """A rename rewrites the cache, checkpoint and stamps under the new name: each by a new file."""
    lib = runner.library()
    c = make_film_with_work_dir(lib / "C", "C")
    outside = tmp_path / "outside"
    outside.mkdir()
    twins = {}
    (c.wd.path / LOCK_NAME).touch()  # as a pipeline run leaves it
    for name in ("pipeline_checkpoint.json", STAMPS_NAME, c.wd.cache_path.name, LOCK_NAME):
        twin = outside / f"twin-{name}"
        os.link(c.wd.path / name, twin)
        twins[twin] = _victim(twin)
    d = runner.start([Library(lib)], settle_seconds=0.2)

    moved = c.path.with_name("D.mkv")
    c.path.rename(moved)
    new_wd = WorkDir.for_film(moved)
    wait_for(lambda: new_wd.cache_path.exists() and not c.wd.path.exists(), what="work dir followed the rename")
    d.request("rescan", timeout=30)

    for twin, before in twins.items():
        assert _intact(twin, before), f"{twin.name} was written through a hard link"


def test_gpu_lock_and_want_files_that_are_hard_links_stay_untouched(tmp_path: Path) -> None:
    films = tmp_path / "films"
    films.mkdir()
    gpu_film, want_film = films / "G.mkv", films / "W.mkv"
    before = {gpu_film: _victim(gpu_film, film_bytes(8192, 1)), want_film: _victim(want_film, film_bytes(8192, 2))}
    run = tmp_path / "run"
    run.mkdir()
    os.link(gpu_film, run / "gpu.lock")
    os.link(want_film, run / "gpu.lock.want")

    interactive = GpuLock(run / "gpu.lock", purpose="cinecut analyze", interactive=True)
    interactive.acquire(5)
    prewarm = GpuLock(run / "gpu.lock", purpose="prewarm", interactive=False)
    assert not prewarm.try_acquire() and prewarm.should_yield()
    assert (interactive.holder() or {}).get("purpose") == "cinecut analyze"
    interactive.release()
    assert prewarm.try_acquire()
    prewarm.release()

    for film, b in before.items():
        assert _intact(film, b), f"{film.name} was written through a hard-linked GPU lock file"


def test_a_hard_linked_lock_holder_note_is_replaced_not_written(tmp_path: Path) -> None:
    wd = tmp_path / "Heat_cinecut_work"
    wd.mkdir()
    film = tmp_path / "Other.mkv"
    before = _victim(film, film_bytes(4096, 3))
    os.link(film, wd / "cinecut.lock.holder")
    lock = work_dir_lock(wd, purpose="cinecut analyze", announce=True)
    assert lock.try_acquire()
    assert (lock.holder() or {}).get("pid") == os.getpid()
    lock.release()
    assert _intact(film, before)


def _result(t: float, i: int) -> tuple[KeyframeRecord, SceneDescription | None]:
    return KeyframeRecord(t, f"/w/keyframes/frame_{int(t * 1000):010d}.jpg", "scene_change"), SceneDescription(
        f"frame {i}", "calm", "none", "room"
    )


def test_a_resumed_partial_stream_never_appends_through_a_hard_link(tmp_path: Path) -> None:
    """A work dir copied with `cp -al` shares its partial stream's inode with the copy: resuming one
    must leave the other's bytes as they were."""
    wd = tmp_path / "Heat_cinecut_work"
    wd.mkdir()
    plan = [(1.0 + i, "scene_change") for i in range(5)]
    stamp = SourceStamp(1234.5, 99)
    name = "Heat.scenedesc.partial"
    with safefs.work_dir_fd(wd) as fd:
        writer, done = open_partial(fd, name, source_file="/films/Heat.mkv", stamp=stamp, plan=plan)
        assert done == []
        for i in range(2):
            writer.append(*_result(plan[i][0], i))
        writer.close()
    copy = tmp_path / "copy.partial"
    os.link(wd / name, copy)
    with open(copy, "ab") as f:
        f.write(b"\x92torn")  # a damaged tail the resume must cut off: in its own file, not in the copy
    before = _victim(copy)

    with safefs.work_dir_fd(wd) as fd:
        writer, done = open_partial(fd, name, source_file="/films/Heat.mkv", stamp=stamp, plan=plan)
        assert len(done) == 2
        writer.append(*_result(plan[2][0], 2))
        writer.close()
        read = read_partial_at(fd, name)
    assert read is not None and read.done == 3 and read.damage is None
    assert _intact(copy, before), "the other name of the partial stream was appended to or truncated"


def test_a_hard_linked_prewarm_log_is_replaced_not_appended(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    film = tmp_path / "Film.mkv"
    before = _victim(film, film_bytes(4096, 4))
    os.link(film, logs / "job.log")
    w = WorkerProcess([sys.executable, "-c", "import sys; sys.stderr.write('worker says hi\\n')"], log_path=logs / "job.log")
    w.start()
    deadline = time.monotonic() + 20
    while w.running and time.monotonic() < deadline:
        w.poll()
        time.sleep(0.01)
    assert not w.running
    assert _intact(film, before), "the worker's stderr was appended to a film"
    assert b"worker says hi" in (logs / "job.log").read_bytes()


def test_keyframes_and_proxy_names_that_are_hard_links_are_replaced(tmp_path: Path, synthetic_film_template) -> None:
    """ffmpeg writes into a folder or name of its own, then a rename puts each file in place: a keyframe or
    proxy name hard-linked to a film gets a new file, and the film keeps its bytes."""
    from cinecut.ingest.keyframes import extract_keyframes, keyframe_name
    from cinecut.ingest.proxy import make_proxy

    film_a, film_b = tmp_path / "A.mkv", tmp_path / "B.mkv"
    before = {film_a: _victim(film_a, film_bytes(4096, 5)), film_b: _victim(film_b, film_bytes(4096, 6))}
    out = tmp_path / "keyframes"
    out.mkdir()
    plan = [(1.0, "scene_change"), (2.5, "interval_fallback")]
    os.link(film_a, out / keyframe_name(1.0))  # not a complete JPEG: it is extracted again
    records = extract_keyframes(synthetic_film_template.video, plan, out)
    assert [Path(r.frame_path).read_bytes()[:2] for r in records] == [b"\xff\xd8"] * 2
    proxy = tmp_path / "Demo_proxy.mp4"
    os.link(film_b, proxy)
    make_proxy(synthetic_film_template.video, proxy)
    assert proxy.stat().st_size > 0 and proxy.stat().st_ino != film_b.stat().st_ino
    for film, b in before.items():
        assert _intact(film, b), f"{film.name} was written through a hard-linked keyframe or proxy name"
