"""Work that upstream left without our sidecar is judged on upstream's own evidence, never adopted.

Real films rendered with ffmpeg, a real proxy made with upstream's filter chain, a checkpoint and cache
written with upstream's own calls (``tests/upstream_reader.py``): what an upstream run stopped before
inference leaves behind. The film is then replaced the way ``rsync -a`` and Radarr do it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import upstream_reader as up

from cinecut.checkpoint import read_checkpoint
from cinecut.demo.film import make_synthetic_film
from cinecut.ingest.ffmpeg import ffmpeg_args, media_arg, run_tool
from cinecut.ingest.proxy import make_proxy
from cinecut.revalidate import probe, revalidate
from cinecut.stamp import SourceStamp
from cinecut.stamps import current_stamps, read_stamps
from cinecut.workdir import WorkDir

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")

OLD = 1_500_000_000.5  # an mtime from long ago, as rsync -a and Radarr's downloads carry


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Two cuts of different length and the proxy of the first."""
    base = tmp_path_factory.mktemp("media")
    a = make_synthetic_film(base / "a.mkv", duration_s=6.0, with_subtitles=False).video
    b = make_synthetic_film(base / "b.mkv", duration_s=9.0, with_subtitles=False).video
    proxy = base / "a_proxy.mp4"
    make_proxy(a, proxy)
    return a, b, proxy


def upstream_left(folder: Path, media: tuple[Path, Path, Path]) -> Path:
    """The film and what an upstream run stopped before inference leaves: checkpoint, proxy, keyframes."""
    a, _, proxy = media
    folder.mkdir(parents=True)
    film = folder / "Heat (1995).mkv"
    shutil.copyfile(a, film)
    os.utime(film, (OLD + 100, OLD + 100))
    wd = Path(up.work_dir_for(film))
    (wd / "keyframes").mkdir(parents=True)
    shutil.copyfile(proxy, wd / f"{film.stem}_proxy.mp4")  # written after the film: newer than it
    stamps = [1.0, 3.5]
    (wd / "keyframe_timestamps.json").write_text(json.dumps(stamps))
    for ts in stamps:
        (wd / "keyframes" / f"frame_{int(ts * 1000):010d}.jpg").write_bytes(b"\xff\xd8jpeg")
    up.save_checkpoint(
        up.PipelineCheckpoint(
            source_file=str(film),
            vibe="action",
            stages_complete=["proxy", "subtitles", "keyframes"],
            proxy_path=str(wd / f"{film.stem}_proxy.mp4"),
            keyframe_count=2,
            dialogue_event_count=0,
            proxy_duration_s=6.0,
        ),
        wd,
    )
    return film


def rsync_over(film: Path, src: Path, mtime: float) -> None:
    """``rsync -a``: new bytes into a temp name, the source's (older) mtime set, renamed over the film."""
    tmp = film.with_name(f".{film.name}.Xy12Ab")
    shutil.copyfile(src, tmp)
    os.utime(tmp, (mtime, mtime))
    os.replace(tmp, film)


def stages(film: Path) -> list[str]:
    ck = read_checkpoint(WorkDir.for_film(film)).checkpoint
    return ck.stages_complete if ck else []


def test_film_replaced_by_an_older_file_under_upstream_work_is_stale(
    tmp_path: Path, media: tuple[Path, Path, Path]
) -> None:
    film = upstream_left(tmp_path / "lib" / "Heat (1995)", media)
    wd = WorkDir.for_film(film)
    rsync_over(film, media[1], OLD)  # another cut, mtime older than the proxy and than the old film
    assert probe(film).needs_revalidation
    r = revalidate(film)
    assert r.changed == ["video"], r.reasons
    assert any("proxy lasts" in why for why in r.reasons), r.reasons
    assert stages(film) == [] and not wd.proxy_path.exists() and not wd.timestamps_path.exists()
    assert not list(wd.keyframes_dir.glob("*.jpg"))
    rec = read_stamps(wd.path)  # a record of the invalidation made here
    assert rec is not None and rec.video == SourceStamp.of(film)


def test_upstream_work_of_this_film_is_verified_by_its_proxy_and_recorded(
    tmp_path: Path, media: tuple[Path, Path, Path]
) -> None:
    film = upstream_left(tmp_path / "lib" / "Heat (1995)", media)
    wd = WorkDir.for_film(film)
    os.utime(film, (OLD, OLD))  # older than the proxy, as after rsync -a: the mtime proves nothing here
    p = probe(film)
    assert p.needs_revalidation and p.verification == "unverified"  # no ffprobe in a lock-free rescan
    r = revalidate(film)
    assert r.changed == [] and r.verification == "proxy", r.evidence
    assert stages(film) == ["proxy", "subtitles", "keyframes"] and wd.proxy_path.exists()
    rec = read_stamps(wd.path)  # evidence checked here: recorded, so the next rescan costs no ffprobe
    assert rec is not None and rec.video == SourceStamp.of(film)
    again = probe(film, st=os.stat(film))
    assert not again.needs_revalidation and again.verification == "recorded"


def test_same_length_but_another_frame_shape_is_stale(tmp_path: Path, media: tuple[Path, Path, Path]) -> None:
    """Duration alone is not the proof: a proxy of another picture shape did not come from this film."""
    film = upstream_left(tmp_path / "lib" / "Heat (1995)", media)
    wd = WorkDir.for_film(film)
    wide = tmp_path / "wide.mkv"  # the same 6 s film at 2.35:1
    run_tool(
        "ffmpeg",
        ffmpeg_args("-loglevel", "error", "-i", media_arg(media[0]), "-vf", "scale=752:320", "-c:v",
                    "libx264", "-preset", "ultrafast", "-c:a", "copy", media_arg(wide)),
        what="widening",
    )
    rsync_over(film, wide, OLD)
    r = revalidate(film)
    assert r.changed == ["video"] and any("frame makes" in why for why in r.reasons), r.reasons
    assert not wd.proxy_path.exists()


def test_film_ffprobe_cannot_read_leaves_the_stages_unverified_untouched_and_unwritten(
    tmp_path: Path, media: tuple[Path, Path, Path]
) -> None:
    film = upstream_left(tmp_path / "lib" / "Heat (1995)", media)
    wd = WorkDir.for_film(film)
    film.write_bytes(b"half a download" * 100)  # not (yet) a film ffprobe can read
    os.utime(film, (OLD, OLD))
    names = sorted(p.name for p in wd.path.rglob("*"))
    r = revalidate(film)
    assert r.changed == [] and r.verification == "unverified" and "nothing proves" in r.evidence
    assert sorted(p.name for p in wd.path.rglob("*")) == names  # no sidecar, no lock file
    assert stages(film) == ["proxy", "subtitles", "keyframes"]


def test_unverified_stages_of_a_film_seen_changing_are_stale(tmp_path: Path, media: tuple[Path, Path, Path]) -> None:
    """Unverifiable at first sight (nothing written), then the film changes under the caller's eyes: whatever
    the stages came from, it was not the new bytes, even where the proxy cannot be examined."""
    film = upstream_left(tmp_path / "lib" / "Heat (1995)", media)
    film.write_bytes(b"half a download" * 100)
    os.utime(film, (OLD, OLD))
    first = revalidate(film)
    assert first.changed == [] and first.verification == "unverified"
    baseline = current_stamps(film, [])
    film.write_bytes(b"the rest of it" * 200)  # still unreadable to ffprobe, and older than the proxy
    os.utime(film, (OLD + 1, OLD + 1))
    assert revalidate(film, baseline=baseline).changed == ["video"]
    assert stages(film) == [] and read_stamps(WorkDir.for_film(film).path) is not None
    # The same film, unchanged since the caller's first look, stays untouched.
    again = upstream_left(tmp_path / "lib2" / "Heat (1995)", media)
    again.write_bytes(b"half a download" * 100)
    os.utime(again, (OLD, OLD))
    assert revalidate(again, baseline=current_stamps(again, [])).changed == []
    assert stages(again) == ["proxy", "subtitles", "keyframes"]


def test_proxy_the_checkpoint_calls_complete_but_gone_is_no_evidence(
    tmp_path: Path, media: tuple[Path, Path, Path]
) -> None:
    film = upstream_left(tmp_path / "lib" / "Heat (1995)", media)
    wd = WorkDir.for_film(film)
    wd.proxy_path.unlink()
    r = revalidate(film)
    assert r.changed == ["video"] and stages(film) == []
    assert not list(wd.keyframes_dir.glob("*.jpg"))
