"""``cinecutd run``: wire config, logging, watchers, engine, control socket and systemd together.

Startup order matters: watches start first (events queue up), then the full reconcile, then the control
socket, then READY=1, so nothing that happens while we start is lost and "ready" means "caught up".
The main loop is the engine loop; WATCHDOG=1 is sent from it alone, so a wedged loop gets the service
restarted by systemd.
"""

from __future__ import annotations

import gc
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import structlog

from cinecut import __version__
from cinecutd.config import EX_CONFIG, Config, ConfigError, load_config
from cinecutd.control import ControlError, ControlServer, ControlSocketError, Later, Router
from cinecutd.cookies import PREFIX as COOKIE_PREFIX
from cinecutd.cookies import is_cookie
from cinecutd.engine import Engine
from cinecutd.gc import collect_orphans
from cinecutd.hints import HintRefused, HintSink, hint_from_request
from cinecutd.instance import EX_ALREADY_RUNNING, AlreadyRunning, take_instance_lock
from cinecutd.logs import configure_logging
from cinecutd.memory import trim_heap
from cinecutd.sdnotify import Notifier
from cinecutd.states import RootStatus, WatchMode
from cinecutd.watcher import Watchers
from cinecutd.webhook import WebhookDown, WebhookReceiver, start_receiver

log = structlog.get_logger("cinecutd")

STATUS_EVERY_S = 2.0
ROOT_RETRY_S = 5.0
STOP_DEADLINE_S = 4.0


class Daemon:
    """One running daemon: owns the engine, the watchers, the control server and the notifier."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.engine = Engine(config)
        self.watchers = Watchers(self.engine)
        self.notifier = Notifier()
        self.control: ControlServer | None = None
        self.prewarm: Any = None
        self.metrics: Any = None  # cinecutd.metrics.MetricsExporter when [metrics] asks for one
        self.hints = HintSink(self.engine, config)  # Radarr/Sonarr events: webhook and `cinecutd arr-hook`
        self.webhook: WebhookReceiver | WebhookDown | None = None
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._last_status = ""
        self._last_status_at = 0.0
        self._last_ping = 0.0
        self._last_root_check = 0.0
        self._root_ids: dict[Path, tuple[int, int] | None] = {}  # (st_dev, st_ino) of each root when last seen

    # ------------------------------------------------------------------ control commands
    def _handlers(self) -> dict[str, Any]:
        eng = self.engine

        def on_engine(fn: Any, timeout: float = 10.0) -> Later:
            """Run ``fn`` on the engine thread; its completion wakes the control loop (no thread waits)."""
            return Later(lambda done: eng.submit(fn, done), timeout=timeout)

        def film_status(film: str) -> dict[str, Any]:
            result = eng.film_status(film)
            if self.prewarm is not None:
                result["prewarm"] = self.prewarm.film_status(result["film"])
            return result

        def daemon_status() -> dict[str, Any]:
            result = eng.status()
            result["prewarm"] = self.prewarm.status() if self.prewarm is not None else {"enabled": False, "state": "disabled"}
            result["hints"] = self.hints.snapshot()
            if self.webhook is not None:
                result["webhook"] = self.webhook.status()
            return result

        def status(film: str | None = None) -> Later:
            return on_engine((lambda: film_status(film)) if film else daemon_status)

        def rescan() -> Later:
            def start(done: Any) -> None:  # runs in slices: events go on meanwhile; ``done`` when it ends
                eng.submit(lambda: eng.request_reconcile("requested", lambda summary: done(summary, None)),
                           lambda _r, error: error is not None and done(None, error))

            return Later(start, timeout=120.0,
                         busy_message="the rescan is still running; see the daemon's log for its summary")

        def gc(apply: bool = False) -> Later:
            def run() -> dict[str, Any]:
                reports = collect_orphans(eng.reg, apply=apply)
                return {"applied": apply, "orphans": [r.to_dict() for r in reports]}

            return on_engine(run, timeout=120.0)

        def hint(**req: Any) -> dict[str, Any]:
            try:
                return self.hints.submit(hint_from_request(req))
            except HintRefused as exc:
                raise ControlError(exc.code, exc.message) from None

        def sync(cookie: str) -> Later:
            path = Path(cookie)
            if not path.is_absolute() or not is_cookie(path):
                raise ControlError("bad_request", "sync: 'cookie' must be an absolute path named "
                                   f"{COOKIE_PREFIX}<pid>-<n>")
            asked = time.monotonic()  # the client created the cookie before this
            lib = self.engine.library_for(path)
            slowest = lib.poll_interval if lib is not None else 0.0

            def start(done: Any) -> None:
                def register() -> None:
                    lib = eng.library_for(path)
                    if lib is None or path.parent != Path(os.path.normpath(path.parent)):
                        raise ControlError("not_found", f"{cookie} is not inside a watched library")
                    root = eng.reg.roots.get(lib.path)
                    polled = (root.watch if root is not None else lib.watch) == WatchMode.POLL
                    eng.cookies.wait(path, lib.path, polled, asked, lambda result: done(result, None))

                eng.submit(register, lambda _r, error: error is not None and done(None, error))

            return Later(start, timeout=max(10.0, 3 * slowest + 10.0),
                         busy_message="the cookie's event has not arrived; is that library watched?")

        handlers: dict[str, Any] = {"status": status, "rescan": rescan, "gc": gc, "hint": hint, "sync": sync}
        if self.prewarm is not None:
            pw = self.prewarm

            def prewarm(film: str, now: bool = False, retry: bool = False) -> Later:
                return on_engine(lambda: pw.request(eng.find_film(film).film, now=now, retry=retry))

            handlers.update(
                prewarm=prewarm,
                pause=lambda: on_engine(pw.pause),
                resume=lambda: on_engine(pw.resume),
            )
        else:

            def disabled(**_: Any) -> dict[str, Any]:
                raise ControlError("prewarm_disabled", "pre-warm is not enabled in the daemon's config ([prewarm] enabled)")

            handlers.update(prewarm=disabled, pause=disabled, resume=disabled)
        return handlers

    def _start_control(self) -> None:
        c = self.config.control
        self.control = ControlServer(
            c.socket,
            Router(self._handlers()),
            mode=c.mode,
            group=c.group,
            max_request_bytes=c.max_request_bytes,
            request_timeout=c.request_timeout,
        )
        self.control.start()

    # ------------------------------------------------------------------ lifecycle
    def _install_signals(self) -> None:
        def on_stop(signum: int, _frame: Any) -> None:
            self._stop.set()
            self.engine.queue.put(None)

        def on_reload(signum: int, _frame: Any) -> None:
            self._reload.set()
            self.engine.queue.put(None)

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_reload)

    def _make_prewarm(self) -> None:
        if not self.config.prewarm.enabled:
            return
        from cinecutd.prewarm.scheduler import PrewarmScheduler

        self.prewarm = PrewarmScheduler(self.config, self.engine)
        self.engine.on_film_changed = self.prewarm.on_film_changed
        self.engine.on_reconciled = self.prewarm.on_reconciled

    def run(self) -> int:
        if os.environ.get("CINECUTD_TRACEMALLOC"):
            # Diagnostics for memory growth in long soaks: the top allocation sites are logged at stop.
            import tracemalloc

            tracemalloc.start(int(os.environ["CINECUTD_TRACEMALLOC"]) or 1)
        self._install_signals()
        log.info("starting", version=__version__, pid=os.getpid(), config=str(self.config.path),
                 roots=[str(lib.path) for lib in self.config.libraries])
        self._make_prewarm()
        self.notifier.status("starting: scanning libraries")
        self.watchers.ensure(self.config.libraries)
        summary = self.engine.reconcile("startup")
        self.watchers.ensure(self.config.libraries)
        self._root_ids = {lib.path: _identity(lib.path) for lib in self.config.libraries}
        # The registry of a big library is long-lived: move it out of the cyclic GC's sight so a full
        # collection never walks 10,000 film states in the middle of an invalidation (p99 latency).
        gc.collect()
        gc.freeze()
        trim_heap(force=True)
        try:
            self._start_control()
        except (ControlSocketError, OSError) as exc:
            log.error("control_socket_failed", socket=str(self.config.control.socket), error=str(exc))
            self._shutdown()
            return 1
        self._start_metrics()
        self.webhook = start_receiver(self.config.webhook, self.hints)
        self.notifier.ready(self.status_line())
        log.info("ready", films=summary["films"], duration_s=summary["duration_s"],
                 socket=str(self.config.control.socket))
        interval = self.notifier.watchdog_interval()
        max_wait = min(interval, 1.0) if interval else 1.0
        while not self._stop.is_set():
            self.engine.run_once(max_wait, self._stop.is_set)
            if self._reload.is_set():
                self._reload.clear()
                self.reload()
            if self.prewarm is not None:
                self.prewarm.tick()
            if self.metrics is not None:
                self.metrics.tick()
            self._periodic()
        self._shutdown()
        return 0

    def _start_metrics(self) -> None:
        """Open the configured metric outputs (imported only then: the daemon runs without them)."""
        if not (self.config.metrics.textfile or self.config.metrics.listen):
            return
        from cinecutd.metrics import MetricsExporter

        self.metrics = MetricsExporter(self.config.metrics, self.engine, lambda: self.prewarm)
        self.metrics.start()

    def _periodic(self) -> None:
        now = time.monotonic()
        self.watchers.check()  # a watch whose thread died is replaced at once (root shown as degraded)
        if now - self._last_ping >= 0.5:
            self.notifier.watchdog()
            self._last_ping = now
        if now - self._last_root_check >= ROOT_RETRY_S:
            self._last_root_check = now
            self._check_roots()
        if now - self._last_status_at >= STATUS_EVERY_S:
            self._last_status_at = now
            line = self.status_line()
            if line != self._last_status:
                self._last_status = line
                self.notifier.status(line)

    def _check_roots(self) -> None:
        """A root that was missing (unmounted) and is back gets a rescan and its watch again."""
        back = [
            r.path
            for r in self.engine.reg.roots.values()
            if r.state in (RootStatus.MISSING, RootStatus.PENDING_WATCH) and os.path.isdir(r.path)
        ]
        gone = [r.path for r in self.engine.reg.roots.values() if r.state != RootStatus.MISSING and not os.path.isdir(r.path)]
        for root in gone:
            log.warning("root_missing", root=str(root))
            self.engine.root_missing(root)
        # A root unmounted (its empty mount point left behind) or mounted over is another directory now:
        # the old watches see the old filesystem, or nothing. Watch it afresh and look again.
        replaced = []
        for lib in self.config.libraries:
            ident = _identity(lib.path)
            if self._root_ids.get(lib.path) not in (None, ident) and ident is not None:
                replaced.append(lib.path)
                self.watchers.restart(lib.path)
            self._root_ids[lib.path] = ident
        if replaced:
            log.warning("root_replaced", roots=[str(r) for r in replaced],
                        detail="unmounted, mounted or replaced; watching it afresh and rescanning")
            back = [r for r in back if r not in replaced]
            self.watchers.ensure(self.config.libraries)  # watch first, then look: nothing falls in between
            self.engine.request_reconcile("root replaced")
        if back or gone or replaced:
            if back:
                log.info("root_available", roots=[str(r) for r in back])
                self.engine.request_reconcile("root available")
            self.watchers.ensure(self.config.libraries)

    def reload(self) -> None:
        """SIGHUP: re-read the config; added or removed roots take effect without a restart."""
        self.notifier.reloading()
        try:
            new = load_config(self.config.path)
        except ConfigError as exc:
            log.error("reload_failed", error=str(exc), detail="keeping the running configuration")
            self.notifier.ready(f"reload failed, old config kept: {exc}")
            return
        old = self.config
        self.config = new
        try:
            configure_logging(new.daemon.log_format, new.daemon.log_level)
        except ValueError as exc:
            log.error("reload_logging_failed", error=str(exc))
        self.engine.set_config(new)
        self.hints.reconfigure(new)
        if new.webhook != old.webhook:
            if self.webhook is not None:
                self.webhook.close()
            self.webhook = start_receiver(new.webhook, self.hints)
        self.watchers.ensure(new.libraries)
        if new.control != old.control and self.control is not None:
            self.control.close()
            self._start_control()
        if self.prewarm is not None:
            self.prewarm.reconfigure(new)
        elif new.prewarm.enabled:
            self._make_prewarm()
            if self.control is not None:
                self.control.handler = Router(self._handlers())
        if new.metrics != old.metrics:
            if self.metrics is not None:
                self.metrics.close()
                self.metrics = None
            self._start_metrics()
        summary = self.engine.reconcile("reload")
        self.watchers.ensure(new.libraries)
        log.info("reloaded", roots=[str(lib.path) for lib in new.libraries], films=summary["films"])
        self.notifier.ready(self.status_line())

    def _shutdown(self) -> None:
        """Stop within a few seconds: work dirs are only edited inside the engine loop, which has returned,
        so nothing is left half-edited; a pre-warm worker is asked to stop after its current frame."""
        self.notifier.stopping()
        log.info("stopping")
        if os.environ.get("CINECUTD_TRACEMALLOC"):
            import tracemalloc

            snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
            for stat in snap.statistics("traceback")[:12]:
                log.info("memory_site", size_kib=round(stat.size / 1024, 1), count=stat.count,
                         where=" <- ".join(f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}" for f in stat.traceback[:6]))
        deadline = time.monotonic() + STOP_DEADLINE_S
        if self.prewarm is not None:
            self.prewarm.stop(timeout=max(0.5, deadline - time.monotonic() - 1.0))
        if self.control is not None:
            self.control.close(timeout=1.0)
        if self.webhook is not None:
            self.webhook.close()
        if self.metrics is not None:
            self.metrics.close()
        self.watchers.stop_all()
        log.info("stopped")

    def status_line(self) -> str:
        """The one-line STATUS= shown by ``systemctl status``."""
        reg = self.engine.reg
        roots = len(self.config.libraries)
        films = len(reg.films)
        day_ago = time.time() - 86400
        removed = sum(1 for r in reg.recent if r["at"] >= day_ago)
        parts = [f"watching {films:,} films in {roots} root{'s' if roots != 1 else ''}"]
        parts.append(f"{removed} stale cache{'s' if removed != 1 else ''} removed today")
        pending = sum(1 for s in reg.films.values() if s.pending)
        if pending:
            parts.append(f"{pending} waiting for a pipeline's lock")
        if self.prewarm is not None:
            parts.append(self.prewarm.status_line())
        return "; ".join(parts)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def run_daemon(config: Config) -> int:
    """Entry point of ``cinecutd run`` after the config loaded."""
    try:
        configure_logging(config.daemon.log_format, config.daemon.log_level)
    except ValueError as exc:
        print(f"cinecutd: {config.path}: daemon.log_level: {exc}", flush=True)
        return EX_CONFIG
    # First of all, before any watch, scan or write: one daemon per control socket.
    try:
        instance = take_instance_lock(config.control.socket)
    except AlreadyRunning as exc:
        log.error("already_running", socket=str(config.control.socket), error=str(exc))
        return EX_ALREADY_RUNNING
    except OSError as exc:
        log.error("instance_lock_failed", socket=str(config.control.socket), error=str(exc))
        return 1
    try:
        return Daemon(config).run()
    finally:
        instance.release()


def main_for_tests(config_path: Path) -> int:
    """Load a config and run (used by tests that start the daemon in-process)."""
    return run_daemon(load_config(config_path))
