"""The checkpoint transitions an analysis makes through the stage graph, with the work dir locked.

Each is a reset :func:`cinecut.stages.invalidate_at` performs (so the salvage store, the owned files and
the checkpoint fields move together), taken at one moment of a run: at its start (a fresh or adopted
checkpoint, a twin's work dir taken over), on a Stage 4 cache miss, and when the film changed under it.
"""

from __future__ import annotations

from pathlib import Path

from cinecut.checkpoint import CHECKPOINT_KEYS, PipelineCheckpoint, read_checkpoint_at, save_checkpoint_at
from cinecut.inference.partial import remove_partial_at
from cinecut.paths import same_film_path
from cinecut.pipeline_errors import FilmChangedError
from cinecut.revalidate import revalidate
from cinecut.stages import STAGE_BY_NAME, InvalidationReport, downstream, invalidate_at
from cinecut.stamp import SourceStamp
from cinecut.workdir import WorkDir, subtitle_sidecars


def start_checkpoint_at(fd: int, wd: WorkDir, film: Path, vibe: str) -> PipelineCheckpoint:
    """The film's checkpoint; a missing, unreadable or foreign one starts fresh, as upstream does.

    Starting fresh also removes the proxy and keyframes left beside it: their origin is unknown
    (another film with the same stem, a crashed writer), and extraction keeps JPEGs it finds. A
    checkpoint naming this film in another spelling (a symlinked folder, an older abspath record) is
    this film's: it is kept, and its paths are rewritten in upstream's spelling so upstream keeps it.
    """
    read = read_checkpoint_at(fd)
    old = read.checkpoint
    if old is not None and same_film_path(old.source_file, film):
        if old.source_file != str(film):
            if same_film_path(old.proxy_path, wd.proxy_path):
                old.proxy_path = str(wd.proxy_path)
            old.source_file = str(film)
            save_checkpoint_at(old, fd)
        return old
    report = InvalidationReport(str(wd.path), ["video"], "fresh checkpoint")
    invalidate_at(fd, wd, [STAGE_BY_NAME["proxy"], STAGE_BY_NAME["keyframes"]], report)
    ckpt = PipelineCheckpoint(source_file=str(film), vibe=vibe)
    save_checkpoint_at(ckpt, fd)
    return ckpt


def take_over_at(fd: int, wd: WorkDir, film: Path, vibe: str, owner: str) -> InvalidationReport:
    """Reset a work dir holding a same-stem twin's results (``owner``) for ``film``: every stage, the
    partial results, and a fresh checkpoint naming ``film``."""
    report = InvalidationReport(str(wd.path), ["video"], f"work dir taken over from {owner}")
    invalidate_at(fd, wd, downstream(["video"]), report)
    remove_partial_at(fd, wd.partial_name)
    save_checkpoint_at(PipelineCheckpoint(source_file=str(film), vibe=vibe), fd)
    return report


def reset_after_miss_at(fd: int, wd: WorkDir, ckpt: PipelineCheckpoint) -> None:
    """A miss: whatever was built on earlier descriptions is stale, so reset it through the stage graph;
    ``ckpt`` is updated in place and saved.

    Upstream's own miss path resets only ``narrative`` and ``assembly``; ``music`` depends on them too.
    """
    stale = downstream(["inference"])
    if (
        ckpt.inference_complete is None
        and ckpt.cache_hit is None
        and not any(
            ckpt.is_complete(st.name) or any(getattr(ckpt, f) is not None for f in st.fields) for st in stale
        )
    ):
        return
    report = InvalidationReport(str(wd.path), ["inference"], "no valid SceneDescription cache")
    invalidate_at(fd, wd, stale, report)
    fresh = read_checkpoint_at(fd).checkpoint
    if fresh is not None:
        for name in CHECKPOINT_KEYS:
            setattr(ckpt, name, getattr(fresh, name))
    ckpt.inference_complete = ckpt.cache_hit = None
    save_checkpoint_at(ckpt, fd)


def film_changed_at(
    fd: int, wd: WorkDir, film: Path, named: Path, was: SourceStamp | None
) -> FilmChangedError:
    """The film changed under a run (its stamp was ``was``): reset its stages through the stage graph and
    return the error that says what happened. ``named``: the film as the caller named it (its sidecars)."""
    now = SourceStamp.maybe(film)
    rv = revalidate(film, subtitle_sidecars(named), locked_fd=fd)
    if now is None:
        remove_partial_at(fd, wd.partial_name)
        why = "was removed"
    else:
        assert was is not None  # a run checks its film only once it holds the film's stamp
        why = f"is now {now.size} bytes, mtime {now.mtime} (was {was.size} bytes, mtime {was.mtime})"
    reset = f" (reset: {', '.join(rv.report.stages_reset)})" if rv.report and rv.report.stages_reset else ""
    return FilmChangedError(f"{film} changed during analysis and {why}: results discarded{reset}")
