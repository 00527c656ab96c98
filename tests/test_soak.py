"""Churn soak (CI size): a busy two-root library against a real ``cinecutd``, checked against a model.

The driver, the simulated pipeline and the model live in ``bench/soak.py`` (whose long run is
``make soak``); this test runs a few hundred operations of the same mix and holds the daemon to the
contract: no stale result survives (before and after the safety rescan), no valid result is lost, nothing
outside what is ours is touched (a user file hard-linked into a work dir included, checked by inode), no
temp file is left, and memory and descriptors stay flat. Part of the library lives in flat folders.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.soak import SoakConfig, run_soak

OPERATIONS = 400
FILMS = 30


@pytest.mark.slow
def test_churn_soak_keeps_every_invariant(tmp_path: Path) -> None:
    res = run_soak(tmp_path, SoakConfig(operations=OPERATIONS, films=FILMS, seed=20261128))
    summary = res.summary()
    print(summary)

    # It really churned: every kind of operation ran, the daemon invalidated and migrated, pipelines ran
    # and sometimes held the lock while a film changed under them.
    assert set(res.op_counts) >= {"rename_film_and_subs", "move_folder_across_roots", "upgrade_rename_over",
                                  "touch", "subtitle_edit", "delete", "arrive_slow_copy", "twin_arrive",
                                  "twin_rename_away", "hardlink_workdir_file"}, res.op_counts
    # Films in flat folders (many films and work dirs side by side) took part in the same operations, and
    # hard links joined work-dir files (lock, keyframes, ...) to user files elsewhere.
    assert sum(res.flat_op_counts.values()) >= 60 and {"rename_film_and_subs", "rename_folder", "delete",
                                                         "subtitle_edit"} <= set(res.flat_op_counts), summary
    assert sum(res.link_counts.values()) >= 6, summary
    assert res.invalidations >= 40 and res.migrations >= 20, summary
    assert res.pipeline_runs >= 40, summary
    assert res.final.warm >= 5, summary

    # (a) no stale cache, stage, proxy or keyframe survives: live, and after the safety rescan
    assert res.live.false_negatives == [], res.live.false_negatives
    assert res.final.false_negatives == [], res.final.false_negatives
    # (b) no valid result was deleted or left behind by a rename or move
    assert res.final.false_positives == [], res.final.false_positives
    # (c) films, subtitles, trailers, unrelated files, manifests and unknown work-dir files untouched
    assert res.final.touched == [], res.final.touched
    assert res.final.temp_files == [], res.final.temp_files
    assert res.errors == 0, summary
    # (d) bounded: no growth with the number of operations beyond noise
    assert res.rss_max_mb - res.rss_start_mb < 25, summary
    assert res.fds_max <= res.fds_start + 16 and res.fds_end <= res.fds_start + 4, summary
