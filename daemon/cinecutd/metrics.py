"""Prometheus metrics: a node_exporter textfile and/or an HTTP ``/metrics`` on loopback (both off by default).

The engine thread alone touches the registry of films, so the numbers are copied from it there, every
``[metrics] interval`` seconds, into an immutable :class:`Snapshot` (:meth:`MetricsExporter.tick`, called
from the main loop). Scrapes (the HTTP server's threads) and the textfile writer (its own thread, so a
slow disk never stalls an invalidation) read only the latest snapshot, through a private
``CollectorRegistry`` and a custom collector: the exposition itself is prometheus_client's.

Labels carry small, fixed sets of values (a cache state, a root state, a job outcome, a yield reason),
never a film's path or name: a path is personal, unbounded in number, and it would turn every rename
into a new time series.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from typing import Any, Final
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import structlog
from prometheus_client import CollectorRegistry, generate_latest, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector

from cinecut import __version__, fresh
from cinecut.evidence import Verification
from cinecut.inference.cache import CacheState
from cinecutd.config import MetricsConfig
from cinecutd.states import RootStatus
from cinecutd.tallies import Tallies

log = structlog.get_logger("cinecutd")

CACHE_STATES: Final = tuple(CacheState)
ROOT_STATES: Final = (RootStatus.WATCHING, RootStatus.POLL_FALLBACK, RootStatus.DEGRADED, RootStatus.MISSING,
                      RootStatus.UNREADABLE, RootStatus.STARTING)
JOB_OUTCOMES: Final = ("done", "stopped", "discarded", "failed", "abandoned")
#: Whom a pre-warm job yields the GPU to (``cinecut.gpu_share`` reasons, an interactive run, the lock's holder).
YIELD_REASONS: Final = ("interactive", "gpu_lock", "processes", "transcodes", "vram")
#: Temp files of the textfile: node_exporter reads only ``*.prom``, so a half-written one is never read.
TEXTFILE_TMP_SUFFIX: Final = ".prom-tmp"


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The daemon's numbers at one moment, copied on the engine thread; never mutated afterwards."""

    films_by_cache: dict[str, int]
    films_pending: int
    films_blocked: int
    films_unverified: int
    films_copying: int
    orphans: int
    conflicts: int
    roots_by_state: dict[str, int]
    counters: dict[str, int]
    tallies: Tallies
    started_at: float
    prewarm: dict[str, Any] = field(default_factory=dict)


def take_snapshot(engine: Any, prewarm: Any | None) -> Snapshot:
    """Copy what the metrics need from the engine (and the pre-warm scheduler). Engine thread only."""
    reg = engine.reg
    by_cache = dict.fromkeys(CACHE_STATES, 0)
    pending = unverified = copying = 0
    now = time.monotonic()
    settle = engine.config.prewarm.settle_seconds
    for st in reg.films.values():
        by_cache[st.cache if st.cache in by_cache else CacheState.CORRUPT] += 1
        pending += st.pending is not None
        unverified += st.verification == Verification.UNVERIFIED
        copying += not st.settled(now, settle)
    roots = dict.fromkeys(ROOT_STATES, 0)
    for r in reg.roots.values():
        roots[r.state] = roots.get(r.state, 0) + 1
    pw: dict[str, Any] = {}
    if prewarm is not None:
        s = prewarm.status()
        cur = s.get("current") or {}
        pw = {
            "enabled": bool(s.get("enabled")),
            "queued": int(s.get("queued") or 0),
            "fps": float(cur.get("fps") or 0.0),
            "running": bool(cur),
            "yielded": bool(cur.get("yielded")),
            "frames_described": int(s.get("frames_described") or 0),
            "outcomes": dict(s.get("outcomes") or {}),
            "gpu_yields": dict(s.get("gpu_yields") or {}),
            "last_success": s.get("last_success"),
        }
    return Snapshot(
        films_by_cache=by_cache,
        films_pending=pending,
        films_blocked=sum(1 for f in engine.health.blocked if f in reg.films),
        films_unverified=unverified,
        films_copying=copying,
        orphans=len(reg.orphans),
        conflicts=len(reg.conflicts),
        roots_by_state=roots,
        counters={k: int(v) for k, v in reg.counters.items()},
        tallies=engine.tallies.copy(),
        started_at=reg.started_at,
        prewarm=pw,
    )


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _histogram(name: str, doc: str, buckets: Any) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, doc, buckets=buckets.cumulative(), sum_value=buckets.total)


def metric_families(snap: Snapshot) -> Iterator[Metric]:
    """Every metric the daemon exports, from one snapshot (names follow Prometheus' conventions)."""
    info = InfoMetricFamily("cinecut_build", "Version of cinecut-cache.", value={"version": __version__})
    yield info
    yield _gauge("cinecut_start_time_seconds", "When the daemon started (Unix time).", snap.started_at)
    films = GaugeMetricFamily("cinecut_films", "Films watched, by the state of their SceneDescription cache "
                              "(valid = warm).", labels=["cache"])
    for state, n in snap.films_by_cache.items():
        films.add_metric([state], n)
    yield films
    yield _gauge("cinecut_films_pending", "Films whose invalidation waits for a pipeline's lock.", snap.films_pending)
    yield _gauge("cinecut_films_blocked", "Films an invalidation could not finish (permissions, I/O): "
                 "`cinecutd status` says why.", snap.films_blocked)
    yield _gauge("cinecut_films_unverified", "Films whose work dir's inputs could not be verified.",
                 snap.films_unverified)
    yield _gauge("cinecut_films_copying", "Films still being written (not settled).", snap.films_copying)
    yield _gauge("cinecut_orphaned_work_dirs", "Work dirs whose film is gone (reclaimed by `cinecutd gc`).",
                 snap.orphans)
    yield _gauge("cinecut_work_dir_conflicts", "Work dirs claimed by two same-stem films.", snap.conflicts)
    roots = GaugeMetricFamily("cinecut_roots", "Library roots, by watch state.", labels=["state"])
    for state, n in snap.roots_by_state.items():
        roots.add_metric([state], n)
    yield roots
    c = snap.counters
    yield _counter("cinecut_invalidations_total", "Stale caches and stages reset.", c.get("invalidations", 0))
    yield _counter("cinecut_reclaimed_bytes_total", "Bytes of stale regenerable data deleted.",
                   c.get("bytes_reclaimed", 0))
    yield _counter("cinecut_deferred_total", "Invalidations that had to wait for a pipeline's lock.",
                   c.get("deferred", 0))
    yield _counter("cinecut_inotify_overflows_total", "inotify queue overflows (each triggers a rescan).",
                   c.get("overflows", 0))
    yield _counter("cinecut_events_total", "Filesystem events received.", c.get("events", 0))
    yield _counter("cinecut_revalidations_total", "Films looked at after an event.", c.get("revalidations", 0))
    yield _counter("cinecut_errors_total", "Errors met (each is logged with path and errno).", c.get("errors", 0))
    yield _histogram("cinecut_invalidation_latency_seconds",
                     "From the event that changed a film to its stale cache gone.", snap.tallies.invalidation_latency)
    yield _histogram("cinecut_rescan_duration_seconds", "Full rescans of every root (count: rescans done).",
                     snap.tallies.rescan_duration)
    pw = snap.prewarm
    yield _gauge("cinecut_prewarm_enabled", "1 when pre-warm is enabled.", 1 if pw.get("enabled") else 0)
    if not pw:
        return
    yield _gauge("cinecut_prewarm_queue_length", "Films waiting to be pre-warmed.", pw["queued"])
    yield _gauge("cinecut_prewarm_running", "1 while a pre-warm job runs.", 1 if pw["running"] else 0)
    yield _gauge("cinecut_prewarm_yielding", "1 while the running job has handed the GPU to someone else.",
                 1 if pw["yielded"] else 0)
    yield _gauge("cinecut_prewarm_frames_per_second", "Frames per second of the running job (0: none).", pw["fps"])
    yield _counter("cinecut_prewarm_frames_described_total", "Keyframes described by the model (not salvaged, "
                   "not cache hits).", pw["frames_described"])
    jobs = CounterMetricFamily("cinecut_prewarm_jobs", "Pre-warm jobs, by outcome.", labels=["outcome"])
    outcomes = pw["outcomes"]
    for outcome in (*JOB_OUTCOMES, *sorted(set(outcomes) - set(JOB_OUTCOMES))):
        jobs.add_metric([outcome], outcomes.get(outcome, 0))
    yield jobs
    yields = CounterMetricFamily("cinecut_prewarm_gpu_yields", "Times the pre-warm paused and handed the GPU "
                                 "over, by whom it yielded to.", labels=["reason"])
    counted = pw["gpu_yields"]
    for reason in (*YIELD_REASONS, *sorted(set(counted) - set(YIELD_REASONS))):
        yields.add_metric([reason], counted.get(reason, 0))
    yield yields
    last = pw.get("last_success")
    yield _gauge("cinecut_prewarm_last_success_timestamp_seconds", "When a pre-warm job last left a valid "
                 "cache (Unix time; 0: not since the daemon started).", last if isinstance(last, int | float) else 0)


class SnapshotCollector:
    """A prometheus_client collector that reports the latest published snapshot (any thread)."""

    def __init__(self) -> None:
        self.snapshot: Snapshot | None = None

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot  # one reference read: a snapshot is never mutated once published
        if snap is not None:
            yield from metric_families(snap)


def build_registry(collector: SnapshotCollector) -> CollectorRegistry:
    """A private registry (never the global one): our collector and the process' own CPU and memory."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    ProcessCollector(namespace="cinecut", registry=registry)
    return registry


class _Handler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # scrapes every few seconds: no access log
        pass


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


def _server_class(host: str) -> type[WSGIServer]:
    family = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][0]
    return type("_MetricsServer", (_Server,), {"address_family": family})


class MetricsExporter:
    """Publishes snapshots to the configured outputs. ``tick`` runs on the engine thread."""

    def __init__(self, config: MetricsConfig, engine: Any, prewarm: Callable[[], Any]) -> None:
        self.config = config
        self.engine = engine
        self._prewarm = prewarm
        self.collector = SnapshotCollector()
        self.registry = build_registry(self.collector)
        self._server: WSGIServer | None = None
        self._server_thread: threading.Thread | None = None
        self._writer: threading.Thread | None = None
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._next = 0.0
        self._last_error: str | None = None

    @property
    def enabled(self) -> bool:
        return self.config.textfile is not None or self.config.listen is not None

    @property
    def address(self) -> tuple[str, int] | None:
        """Where ``/metrics`` is served (the bound port, when the config asked for port 0)."""
        if self._server is None:
            return None
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Take a first snapshot and open the outputs; a port in use is logged, never fatal."""
        self.tick(force=True)
        if self.config.listen is not None:
            host, port = self.config.listen
            try:
                server = make_server(host, port, make_wsgi_app(self.registry), _server_class(host),
                                     handler_class=_Handler)
            except OSError as exc:
                log.error("metrics_listen_failed", listen=f"{host}:{port}", error=str(exc))
            else:
                self._server = server
                self._server_thread = threading.Thread(target=server.serve_forever, name="metrics-http",
                                                       daemon=True)
                self._server_thread.start()
                bound = self.address[1] if self.address else port
                log.info("metrics_listening", listen=f"[{host}]:{bound}" if ":" in host else f"{host}:{bound}")
        if self.config.textfile is not None:
            self._writer = threading.Thread(target=self._write_loop, name="metrics-textfile", daemon=True)
            self._writer.start()
            self._wake.set()

    def tick(self, *, force: bool = False) -> None:
        """Engine thread: every ``interval`` seconds, copy the numbers and wake the textfile writer."""
        now = time.monotonic()
        if not force and now < self._next:
            return
        self._next = now + self.config.interval
        try:
            self.collector.snapshot = take_snapshot(self.engine, self._prewarm())
        except Exception as exc:  # metrics must never stop the daemon
            log.error("metrics_snapshot_failed", error=repr(exc))
            return
        self._wake.set()

    def _write_loop(self) -> None:
        while not self._closing.is_set():
            self._wake.wait()
            self._wake.clear()
            if self._closing.is_set():
                break
            self.write_textfile()

    def write_textfile(self) -> None:
        """Atomically replace the textfile (a new 0644 file renamed over it: node_exporter reads it as
        another user, and never sees half of it). Errors are logged once until they change."""
        path = self.config.textfile
        if path is None or self.collector.snapshot is None:
            return
        try:
            data = generate_latest(self.registry)
            dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.close(fresh.publish(dfd, path.name, data, tmp_suffix=TEXTFILE_TMP_SUFFIX, mode=0o644,
                                       durable=False))
            finally:
                os.close(dfd)
        except OSError as exc:
            why = f"{exc.strerror or exc} ({os.fsdecode(exc.filename) if exc.filename else path})"
            if why != self._last_error:
                self._last_error = why
                log.warning("metrics_textfile_failed", path=str(path), error=why,
                            remedy="the service needs write access to its folder: `cinecutd systemd-dropin --write`")
            return
        if self._last_error is not None:
            log.info("metrics_textfile_written", path=str(path))
            self._last_error = None

    def close(self) -> None:
        """Stop serving and writing (a last textfile is written first, so it holds the final counts)."""
        self._closing.set()
        self._wake.set()
        if self._writer is not None:
            self._writer.join(2.0)
            if not self._writer.is_alive():  # never two writers; a hung folder is not waited for twice
                self.tick(force=True)
                self.write_textfile()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


__all__ = ["MetricsExporter", "Snapshot", "SnapshotCollector", "build_registry", "metric_families", "take_snapshot"]
