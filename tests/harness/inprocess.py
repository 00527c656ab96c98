"""The daemon's engine in-process: a real temporary library, synthetic watcher events, no sleeps.

Loaded as a pytest plugin (``tests/conftest.py``), so the fixtures ``root`` (an empty library folder) and
``make_engine`` (an engine on it, started and idle) serve every in-process engine test; ``settle`` steps
the loop until nothing is due and ``post`` delivers what inotify would have delivered.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cinecutd.config import load_config
from cinecutd.engine import Engine
from tests.harness.runner import Library, render_config


def settle(engine: Engine, *, limit: float = 5.0) -> None:
    """Step the engine until nothing is queued, no timer is due and no rescan runs.

    Timers that are due later (a settle delay) are waited for only up to ``limit`` seconds of wall time:
    the tests use ``settle_seconds = 0`` so every timer the engine sets for them is due at once.
    """
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        engine.run_once(0)
        due = engine.next_deadline()
        if engine.queue.empty() and not engine.rescanning and (due is None or due > time.monotonic() + limit):
            return
        if due is not None and due > time.monotonic():
            time.sleep(min(0.01, due - time.monotonic()))  # a timer a few ms ahead (e.g. a minimum settle)
    raise AssertionError("the engine did not become idle")


def post(engine: Engine, kind: str, src: Path, dest: Path | None = None) -> None:
    """One watcher event, as the watch thread posts it."""
    engine.post_event(kind, str(src), str(dest) if dest is not None else None)


def unstarted_engine(tmp_path: Path, root: Path) -> Engine:
    """An engine on ``root`` (no periodic rescan, settle 0.2 s, warnings only), not started: the test runs
    its startup rescan when its films are in place."""
    cfg = tmp_path / "cinecutd.toml"
    cfg.write_text(
        f'[daemon]\nrescan_interval = 0\nsettle_seconds = 0.2\nlog_level = "warning"\n'
        f'[[library]]\npath = "{root}"\n[control]\nsocket = "{tmp_path / "d.sock"}"\n'
    )
    return Engine(load_config(cfg))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """An empty library folder."""
    p = tmp_path / "films"
    p.mkdir()
    return p


@pytest.fixture
def make_engine(tmp_path: Path, root: Path) -> Iterator[Callable[[], Engine]]:
    """Start an engine on ``root`` (settle 0, startup rescan done, idle) once the test has made its films."""

    def make() -> Engine:
        cfg = tmp_path / "cinecutd.toml"
        cfg.write_text(render_config([Library(root)], socket=tmp_path / "run" / "d.sock", settle_seconds=0))
        engine = Engine(load_config(cfg))
        engine.reconcile("startup")
        settle(engine)
        return engine

    yield make
