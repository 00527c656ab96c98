"""Run a REAL ``cinecutd run`` process against real library folders, and build realistic work dirs.

Tests of the daemon's behaviour (watching, invalidation, renames, crashes, soaks) share this harness so
that every one of them exercises the installed entry point, real inotify or polling, the real control
socket and real signals, exactly as systemd runs the service. Nothing here is mocked.

Typical use::

    @pytest.fixture
    def runner(tmp_path):
        with DaemonRunner(tmp_path) as r:   # teardown: SIGTERM, exit 0 within 5 s, asserted
            yield r

    def test_x(runner):
        lib = runner.library("films")                       # a library root folder
        film = make_film(lib / "Heat (1995)", "Heat (1995)")  # film + subtitle + trailer beside it
        build_work_dir(film)                                # finished pipeline run, stamps recorded
        d = runner.start([Library(lib)])                    # returns once `ping` answers (READY)
        replace_in_place(film.path)
        wait_for(lambda: video_invalidated(film), what="work dir invalidated")

Helpers return plain data; assertions live in the tests. ``wait_for`` polls quickly (typical waits are
milliseconds) with generous timeouts, because the machines running the suite are shared and slow.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from cinecut import safefs
from cinecut.checkpoint import PipelineCheckpoint, read_checkpoint, save_checkpoint
from cinecut.inference.cache import read_cache_metadata, save_cache
from cinecut.inference.models import SceneDescription
from cinecut.models import KeyframeRecord
from cinecut.revalidate import revalidate
from cinecut.stamp import SourceStamp
from cinecut.stamps import InputStamps, current_stamps, read_stamps, write_stamps_at
from cinecut.workdir import (
    ASSEMBLY_MANIFEST_NAME,
    TRAILER_MANIFEST_NAME,
    WorkDir,
    keyframe_name,
)
from cinecutd.client import ClientError, ControlClient
from cinecutd.cookies import sync_root

REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")

#: Every stage complete, in upstream's completion order.
ALL_STAGES = ["proxy", "subtitles", "keyframes", "structural", "narrative", "assembly", "music"]
#: Files in a work dir that are never ours to delete (a user may have edited the manifests).
KEPT_IN_WORK_DIR = (TRAILER_MANIFEST_NAME, ASSEMBLY_MANIFEST_NAME, "notes.txt", "stems/dialogue.wav")
STOP_TIMEOUT_S = 5.0
DEFAULT_WAIT_S = 10.0


# --------------------------------------------------------------------------------------------- waiting


def wait_for(
    predicate: Callable[[], T], timeout: float = DEFAULT_WAIT_S, *, interval: float = 0.01, what: str = ""
) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that; AssertionError on timeout.

    The interval grows from 10 ms to 100 ms, so a quick condition costs milliseconds and a slow one does
    not burn the shared CPU. Exceptions inside the predicate count as "not yet" (files come and go).
    """
    deadline = time.monotonic() + timeout
    delay = interval
    last: Any = None
    while True:
        try:
            last = predicate()
        except (OSError, ValueError, KeyError, ClientError) as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what or predicate!r}; last: {last!r}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.1)


def stays(predicate: Callable[[], Any], duration: float, *, interval: float = 0.05) -> bool:
    """True if ``predicate`` holds for the whole ``duration`` (for "nothing else happens" checks)."""
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        if not predicate():
            return False
        time.sleep(interval)
    return bool(predicate())


# --------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Library:
    """One ``[[library]]`` table. ``poll_interval`` is only written for ``watch = "poll"``."""

    path: Path
    watch: str = "inotify"
    poll_interval: float = 0.2
    extra: dict[str, Any] = field(default_factory=dict)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def render_config(
    libraries: Sequence[Library],
    *,
    socket: Path,
    settle_seconds: float = 0.3,
    rescan_interval: float = 0,
    log_level: str = "info",
    daemon: dict[str, Any] | None = None,
    control: dict[str, Any] | None = None,
) -> str:
    """A cinecutd TOML config. Periodic rescans are off by default so tests see the watchers' work."""
    lines = ["[daemon]"]
    d = {"settle_seconds": settle_seconds, "rescan_interval": rescan_interval, "log_format": "json",
         "log_level": log_level, **(daemon or {})}
    lines += [f"{k} = {_toml(v)}" for k, v in d.items()]
    for lib in libraries:
        lines += ["", "[[library]]", f"path = {_toml(lib.path)}", f"watch = {_toml(lib.watch)}"]
        if lib.watch == "poll":
            lines.append(f"poll_interval = {_toml(lib.poll_interval)}")
        lines += [f"{k} = {_toml(v)}" for k, v in lib.extra.items()]
    lines += ["", "[control]", f"socket = {_toml(socket)}"]
    lines += [f"{k} = {_toml(v)}" for k, v in (control or {}).items()]
    return "\n".join(lines) + "\n"


def daemon_command() -> list[str]:
    """The installed console script beside this interpreter, else the module entry point."""
    script = Path(sys.executable).parent / "cinecutd"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "cinecutd.cli"]


# --------------------------------------------------------------------------------------------- process


class Daemon:
    """One ``cinecutd run --config`` subprocess, its log file and its control socket."""

    def __init__(self, config: Path, socket: Path, log: Path, *, prefix: Sequence[str] = ()) -> None:
        self.config = config
        self.socket = socket
        self.log_path = log
        self.prefix = list(prefix)
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    # ---------------------------------------------------------------- lifecycle
    def start(self, *, ready_timeout: float = 20.0) -> Daemon:
        """Start the process and wait until it answers ``ping`` (it listens only after its startup
        reconcile, so "ready" means "caught up")."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("NOTIFY_SOCKET", None)
        env.pop("CINECUTD_CONFIG", None)
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it; closed right after spawning
        try:
            self.proc = subprocess.Popen(
                [*self.prefix, *daemon_command(), "run", "--config", str(self.config)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
            )
        finally:
            log.close()
        self.started_at = time.monotonic()
        deadline = time.monotonic() + ready_timeout
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise AssertionError(f"cinecutd exited with {rc} before it was ready:\n{self.log_text()[-4000:]}")
            with contextlib.suppress(ClientError):
                if self.request("ping", timeout=1.0).get("pong"):
                    return self
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"cinecutd not ready after {ready_timeout:g} s:\n{self.log_text()[-4000:]}")
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send(self, sig: int) -> None:
        """Send a signal to the daemon process."""
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S) -> tuple[int, float]:
        """Send ``sig`` and wait; returns (exit code, seconds taken). Kills it (and raises) past ``timeout``."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            return self.proc.returncode, 0.0
        t0 = time.monotonic()
        self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"cinecutd did not stop within {timeout:g} s of signal {sig}") from None
        return rc, time.monotonic() - t0

    def kill(self) -> None:
        """SIGKILL (crash tests, or a daemon that would not stop)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    # ---------------------------------------------------------------- control socket
    def client(self, timeout: float = 10.0) -> ControlClient:
        """A connected client (use as a context manager)."""
        return ControlClient(self.socket, timeout=timeout)

    def request(self, cmd: str, *, timeout: float = 10.0, **args: Any) -> dict[str, Any]:
        with ControlClient(self.socket, timeout=timeout) as c:
            return c.request(cmd, **args)

    def status(self) -> dict[str, Any]:
        return self.request("status")

    def film_status(self, film: Path | str) -> dict[str, Any]:
        return self.request("status", film=str(film))

    def counter(self, name: str) -> int:
        return int(self.status()["counters"].get(name, 0))

    def sync(self, root: Path | None = None, *, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Return once the daemon has handled every change made so far in ``root`` (every root by default):
        a cookie file's event proves it (cinecutd.cookies), instead of a sleep or a poll."""
        with ControlClient(self.socket, timeout=timeout) as c:
            roots = [root] if root is not None else [Path(r["path"]) for r in c.request("status")["roots"]]
            return [sync_root(lambda req: c.request(req.pop("cmd"), **req), Path(r)) for r in roots]

    def reload(self, config_text: str | None = None) -> None:
        """Optionally rewrite the config, then SIGHUP (the daemon reloads it and reconciles)."""
        if config_text is not None:
            tmp = self.config.with_suffix(".tmp")
            tmp.write_text(config_text)
            os.replace(tmp, self.config)
        self.send(signal.SIGHUP)

    # ---------------------------------------------------------------- logs
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def logs(self, event: str | None = None) -> list[dict[str, Any]]:
        """The JSON log records (optionally only those with ``event``); non-JSON lines are skipped."""
        out = []
        for line in self.log_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and (event is None or rec.get("event") == event):
                out.append(rec)
        return out


class DaemonRunner:
    """Owns the folders, configs and daemons of one test; stops every daemon on exit.

    Teardown asserts the contract the service relies on: SIGTERM stops the daemon with exit code 0
    within 5 s. ``public=True`` puts everything in a world-traversable temp dir owned by ``owner`` so a
    daemon can run as an unprivileged user (``start(..., user=...)``).
    """

    def __init__(self, base: Path | None = None, *, public: bool = False) -> None:
        self.public = public
        if public or base is None:
            self.base = Path(tempfile.mkdtemp(prefix="cinecutd-t-", dir="/tmp"))
            self.base.chmod(0o755)
            self._own_base = True
        else:
            self.base = base
            self._own_base = False
        # sun_path is 108 bytes: keep the socket short whatever pytest's tmp path looks like.
        self.sock_dir = Path(tempfile.mkdtemp(prefix="ccd-", dir="/tmp"))
        self.daemons: list[Daemon] = []
        self._n = 0

    def __enter__(self) -> DaemonRunner:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        problems = []
        for d in self.daemons:
            if d.proc is None:
                continue
            if d.proc.poll() is not None:
                continue
            try:
                rc, took = d.stop()
            except AssertionError as e:
                problems.append(str(e))
                continue
            if rc != 0:
                problems.append(f"cinecutd exited {rc} on SIGTERM:\n{d.log_text()[-3000:]}")
            elif took > STOP_TIMEOUT_S:
                problems.append(f"cinecutd took {took:.2f} s to stop")
        shutil.rmtree(self.sock_dir, ignore_errors=True)
        if self._own_base:
            _rmtree_forcefully(self.base)
        if problems and exc_type is None:
            raise AssertionError("; ".join(problems))

    def library(self, name: str = "films") -> Path:
        """Create (if needed) a library root folder under the runner's base."""
        p = self.base / name
        p.mkdir(parents=True, exist_ok=True)
        return p

    @property
    def socket(self) -> Path:
        return self.sock_dir / "d.sock"

    def config(self, libraries: Sequence[Library], **kwargs: Any) -> Path:
        """Write ``cinecutd.toml`` in the base dir and return its path."""
        path = self.base / "cinecutd.toml"
        path.write_text(render_config(libraries, socket=self.socket, **kwargs))
        return path

    def daemon(self, config: Path, *, user: str | None = None) -> Daemon:
        """A daemon object for ``config`` (not started). ``user`` runs it through setpriv (root only)."""
        self._n += 1
        prefix: list[str] = []
        if user is not None:
            prefix = unprivileged_prefix(user)
            uid, gid = _ids(user)
            for p in (self.sock_dir, self.base, config):
                os.chown(p, uid, gid)
        d = Daemon(config, self.socket, self.base / f"cinecutd-{self._n}.log", prefix=prefix)
        if user is not None:
            d.log_path.touch()
            os.chown(d.log_path, *_ids(user))
        self.daemons.append(d)
        return d

    def start(self, libraries: Sequence[Library], *, user: str | None = None, **kwargs: Any) -> Daemon:
        """Write a config for ``libraries`` and start a daemon on it (returns when it is ready)."""
        return self.daemon(self.config(libraries, **kwargs), user=user).start()

    def restart(self, d: Daemon) -> Daemon:
        """Stop ``d`` (asserting a clean exit) and start a new process on the same config."""
        rc, _ = d.stop()
        assert rc == 0, d.log_text()[-3000:]
        return self.daemon(d.config).start()


def _rmtree_forcefully(path: Path) -> None:
    """Remove a test tree even where a test left folders chmod 000."""
    def onerror(fn: Any, p: str, _exc: Any) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(p), 0o755)
            os.chmod(p, 0o755)
            fn(p)

    shutil.rmtree(path, onerror=onerror)


def _ids(user: str) -> tuple[int, int]:
    import pwd

    pw = pwd.getpwnam(user)
    return pw.pw_uid, pw.pw_gid


def unprivileged_prefix(user: str = "nobody") -> list[str]:
    """``setpriv`` arguments that run a command as ``user`` (the caller must be root)."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        raise RuntimeError("running the daemon as another user needs root and setpriv (util-linux)")
    uid, gid = _ids(user)
    return [setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]


def unprivileged_problem(user: str = "nobody") -> str | None:
    """Why a daemon cannot be run as ``user`` here (None when it can): not root, no setpriv, or the
    project and its virtualenv not readable by that user (a checkout in a private home dir)."""
    try:
        prefix = unprivileged_prefix(user)
    except (RuntimeError, KeyError) as e:
        return str(e)
    probe = subprocess.run([*prefix, *daemon_command(), "--version"], capture_output=True, timeout=60, cwd="/")
    if probe.returncode != 0:
        return f"cinecutd cannot run as {user}: {probe.stderr.decode(errors='replace')[-300:]}"
    return None


def chown_tree(path: Path, user: str) -> None:
    """Give a folder tree to ``user`` (for a daemon run through :func:`unprivileged_prefix`)."""
    uid, gid = _ids(user)
    for root, dirs, files in os.walk(path):
        os.chown(root, uid, gid)
        for name in dirs + files:
            os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)


# --------------------------------------------------------------------------------------------- films


@dataclass(frozen=True)
class Film:
    """A film file with its sidecars, as a media library holds it."""

    path: Path
    subtitles: tuple[Path, ...] = ()
    trailer: Path | None = None

    @property
    def wd(self) -> WorkDir:
        return WorkDir.for_film(self.path)

    @property
    def stem(self) -> str:
        return self.path.stem


def film_bytes(size: int, seed: int = 0) -> bytes:
    """Distinct, cheap, deterministic content for a film of ``size`` bytes."""
    block = (f"cinecut-film-{seed}-".encode() * 64)[:4096]
    return (block * (size // len(block) + 1))[:size]


SRT = "1\n00:00:01,000 --> 00:00:02,500\nHello there.\n\n2\n00:00:04,000 --> 00:00:05,000\nGoodbye.\n"


def make_film(
    folder: Path,
    stem: str = "Heat (1995)",
    ext: str = ".mkv",
    *,
    size: int = 64 * 1024,
    seed: int = 0,
    subtitles: Iterable[str] = (".en.srt",),
    trailer: str | None = "action",
) -> Film:
    """Write a film, its subtitle sidecars and (optionally) an upstream trailer beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}{ext}"
    path.write_bytes(film_bytes(size, seed))
    subs = []
    for suffix in subtitles:
        sub = folder / f"{stem}{suffix}"
        sub.write_text(SRT)
        subs.append(sub)
    trailer_path = None
    if trailer is not None:
        trailer_path = folder / f"{stem}_trailer_{trailer}.mp4"
        trailer_path.write_bytes(b"final trailer: user data " * 40)
    return Film(path, tuple(subs), trailer_path)


def build_work_dir(film: Film, *, frames: int = 6, vibe: str = "action", record_stamps: bool = True) -> WorkDir:
    """Leave the work dir a finished pipeline run leaves: checkpoint with every stage complete, a cache
    saved with the core's ``save_cache``, proxy, keyframes, timestamps, manifests, later-stage output and
    an unknown file; then (``record_stamps``) the stamps sidecar our pipeline's commit mark records."""
    wd = film.wd
    kdir = wd.keyframes_dir
    kdir.mkdir(parents=True, exist_ok=True)
    stamps = [1.5 + 2.25 * i for i in range(frames)]
    results = []
    for i, ts in enumerate(stamps):
        jpg = kdir / keyframe_name(ts)
        jpg.write_bytes(b"\xff\xd8\xff\xe0jpeg" + bytes([i]) * 300)
        desc = None if i == 2 else SceneDescription(f"scene {i}", "tense", "running", "street")
        results.append((KeyframeRecord(ts, str(jpg), "subtitle_midpoint" if i % 2 else "scene_change"), desc))
    wd.timestamps_path.write_text(json.dumps(stamps))
    wd.proxy_path.write_bytes(b"proxy video " * 500)
    save_cache(results, film.path, wd)
    (wd.path / TRAILER_MANIFEST_NAME).write_text(json.dumps({"film": film.stem, "edited_by_user": True}))
    (wd.path / ASSEMBLY_MANIFEST_NAME).write_text(json.dumps({"clips": [1, 2, 3]}))
    (wd.path / "notes.txt").write_text("my notes about this cut\n")
    (wd.path / "stems").mkdir(exist_ok=True)
    (wd.path / "stems" / "dialogue.wav").write_bytes(b"RIFFwav" * 100)
    save_checkpoint(
        PipelineCheckpoint(
            source_file=str(film.path),
            vibe=vibe,
            stages_complete=list(ALL_STAGES),
            proxy_path=str(wd.proxy_path),
            keyframe_count=frames,
            dialogue_event_count=2,
            inference_complete=True,
            cache_hit=False,
            manifest_path=str(wd.path / TRAILER_MANIFEST_NAME),
            assembly_manifest_path=str(wd.path / ASSEMBLY_MANIFEST_NAME),
            proxy_duration_s=5400.125,
            structural_anchors={"act1_end": 1800.0, "act2_end": 3600.5},
        ),
        wd,
    )
    # The proxy was made from the film: never older than it (the "no sidecar yet" witness checks that).
    st = os.stat(film.path)
    os.utime(wd.proxy_path, (st.st_atime, st.st_mtime + 1))
    if record_stamps:
        res = revalidate(film.path, film.subtitles)
        assert res.report is None or not res.report.changed_anything, res.report
        with safefs.work_dir_fd(wd.path) as fd:
            write_stamps_at(fd, current_stamps(film.path, list(film.subtitles)))
    return wd


def make_film_with_work_dir(folder: Path, stem: str = "Heat (1995)", **kwargs: Any) -> Film:
    """:func:`make_film` then :func:`build_work_dir`: a film whose cache is warm and stamps recorded."""
    frames = kwargs.pop("frames", 6)
    film = make_film(folder, stem, **kwargs)
    build_work_dir(film, frames=frames)
    return film


# --------------------------------------------------------------------------------------------- inspection


def snapshot(paths: Iterable[Path]) -> dict[Path, bytes | None]:
    """Contents of files that must not change (None for a missing one)."""
    out: dict[Path, bytes | None] = {}
    for p in paths:
        try:
            out[p] = p.read_bytes()
        except FileNotFoundError:
            out[p] = None
    return out


def sacred_files(film: Film) -> list[Path]:
    """What no invalidation may touch: manifests, later-stage output, unknown files, the trailer."""
    out = [film.wd.path / name for name in KEPT_IN_WORK_DIR]
    if film.trailer is not None:
        out.append(film.trailer)
    return out


def changed_files(before: dict[Path, bytes | None]) -> list[Path]:
    """The files of a :func:`snapshot` whose content differs now."""
    return [p for p, data in before.items() if snapshot([p])[p] != data]


@dataclass(frozen=True)
class WorkState:
    """What is in a film's work dir right now (read with the core's readers, symlink-safe)."""

    exists: bool
    stages: tuple[str, ...]
    checkpoint_source: str | None
    cache_stamp: SourceStamp | None
    cache_source: str | None
    cache_file: bool
    proxy: bool
    keyframes: int
    timestamps: bool
    stamps: InputStamps | None

    film_stamp: SourceStamp | None

    @property
    def cache_valid(self) -> bool:
        """Upstream's rule: the cache's mtime/size equal the film's current stat."""
        return self.cache_stamp is not None and self.cache_stamp == self.film_stamp


def work_state(film: Film | Path) -> WorkState:
    path = film.path if isinstance(film, Film) else film
    wd = WorkDir.for_film(path)
    ck = read_checkpoint(wd.path).checkpoint
    meta = read_cache_metadata(wd.cache_path)
    kdir = wd.keyframes_dir
    frames = len(list(kdir.glob("frame_*.jpg"))) if kdir.is_dir() and not kdir.is_symlink() else 0
    return WorkState(
        exists=wd.path.is_dir() and not wd.path.is_symlink(),
        stages=tuple(ck.stages_complete) if ck else (),
        checkpoint_source=ck.source_file if ck else None,
        cache_stamp=meta.stamp if meta else None,
        cache_source=meta.source_file if meta else None,
        cache_file=os.path.lexists(wd.cache_path),
        proxy=os.path.lexists(wd.proxy_path),
        keyframes=frames,
        timestamps=os.path.lexists(wd.timestamps_path),
        stamps=read_stamps(wd.path),
        film_stamp=SourceStamp.maybe(path),
    )


def stamps_current(film: Film) -> bool:
    """Our sidecar records exactly the film's (and its present subtitles') current stamps."""
    rec = read_stamps(film.wd.path)
    if rec is None:
        return False
    now = current_stamps(film.path, [s for s in film.subtitles if s.exists()])
    return rec.video == now.video and rec.subtitles == now.subtitles and rec.source_file == str(film.path)


def no_stale_results(film: Film) -> bool:
    """The invariant of issue 3: no stale cache and no stale stage survive.

    A cache that is present matches the film's stat; if any stage is complete, our stamps match the
    film's current inputs (so nothing complete was computed from an older film or subtitle).
    """
    s = work_state(film)
    if s.cache_file and not s.cache_valid:
        return False
    if s.stages or s.proxy or s.keyframes or s.timestamps:
        return stamps_current(film)
    return True


def video_invalidated(film: Film) -> bool:
    """Everything downstream of the video is reset and the regenerable files are gone, stamps current."""
    s = work_state(film)
    return (
        s.exists
        and s.stages == ()
        and not s.cache_file
        and not s.proxy
        and s.keyframes == 0
        and not s.timestamps
        and stamps_current(film)
    )


def subtitles_invalidated(film: Film) -> bool:
    """Reset from ``subtitles``: the proxy (video only) stays, keyframes and cache are gone."""
    s = work_state(film)
    return (
        s.exists
        and s.stages == ("proxy",)
        and s.proxy
        and not s.cache_file
        and s.keyframes == 0
        and not s.timestamps
        and stamps_current(film)
    )


def warm(film: Film) -> bool:
    """Untouched results: every stage complete, a valid cache, keyframes present, stamps current."""
    s = work_state(film)
    return s.stages == tuple(ALL_STAGES) and s.cache_valid and s.proxy and s.keyframes > 0 and stamps_current(film)


def invalidations_of(d: Daemon, film: Film | Path) -> list[dict[str, Any]]:
    """The daemon's recent invalidation records for one film (newest first)."""
    path = str(film.path if isinstance(film, Film) else film)
    return [r for r in d.status()["recent_invalidations"] if r["film"] == path]


# --------------------------------------------------------------------------------------------- replacing


def new_content(film: Path, seed: int = 1, size: int | None = None) -> bytes:
    """Different bytes for a film (same size by default: a size-only check would miss it)."""
    return film_bytes(size if size is not None else film.stat().st_size, seed)


def replace_in_place(film: Path, data: bytes | None = None) -> None:
    """Overwrite the bytes without truncating (``dd conv=notrunc``-style)."""
    data = data if data is not None else new_content(film)
    with open(film, "r+b") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def truncate_and_write(film: Path, data: bytes | None = None) -> None:
    """``open(film, "wb")`` then write: a moment of size 0, then the new content."""
    data = data if data is not None else new_content(film)
    with open(film, "wb") as f:
        f.flush()
        os.fsync(f.fileno())
        f.write(data)


def staging_dir(film: Path) -> Path:
    """A fresh folder for files to move in: same filesystem, outside the library root, assuming the
    harness layout ``<base>/<library>/<folder>/<film>`` (or ``<base>/<library>/<film>``)."""
    root = film.parents[1] if film.parent.parent.name else film.parent
    return Path(tempfile.mkdtemp(prefix="incoming-", dir=root.parent))


def cp_over(film: Path, data: bytes | None = None) -> None:
    """``cp new film``: the real coreutils cp writing over the existing file (truncate and copy)."""
    src = staging_dir(film) / "new.bin"
    src.write_bytes(data if data is not None else new_content(film))
    subprocess.run(["cp", str(src), str(film)], check=True, timeout=30)


def mv_over_from_partial(film: Path, data: bytes | None = None) -> None:
    """Radarr's upgrade: the new file is written as ``<name>.partial`` beside the film, then renamed over."""
    part = film.with_name(film.name + ".partial")
    part.write_bytes(data if data is not None else new_content(film))
    subprocess.run(["mv", "-f", str(part), str(film)], check=True, timeout=30)


def mv_over_from_elsewhere(film: Path, data: bytes | None = None) -> None:
    """A download client finished elsewhere on the same filesystem; the file is moved over the film."""
    src = staging_dir(film) / film.name
    src.write_bytes(data if data is not None else new_content(film))
    subprocess.run(["mv", "-f", str(src), str(film)], check=True, timeout=30)


def temp_then_rename(film: Path, data: bytes | None = None) -> None:
    """An atomic writer: mkstemp in the same folder (hidden name), write, fsync, ``os.replace``."""
    fd, tmp = tempfile.mkstemp(dir=film.parent, prefix=f".{film.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data if data is not None else new_content(film))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, film)


def hardlink_swap(film: Path, data: bytes | None = None) -> None:
    """``ln new tmp && mv tmp film``: a file that already exists elsewhere is linked in, then renamed over."""
    src = staging_dir(film) / "seeded.bin"
    src.write_bytes(data if data is not None else new_content(film))
    tmp = film.with_name(film.name + ".tmp")
    subprocess.run(["ln", str(src), str(tmp)], check=True, timeout=30)
    subprocess.run(["mv", "-f", str(tmp), str(film)], check=True, timeout=30)


def touch(film: Path) -> None:
    """``touch film``: only the mtime moves, which upstream's cache check treats as a new film."""
    subprocess.run(["touch", str(film)], check=True, timeout=30)


def rsync_over(film: Path, data: bytes | None = None) -> None:
    """``rsync -a`` from a sender copy: hidden temp ``.name.XXXXXX``, mtime set to the sender's, rename.

    Runs the real rsync when installed; otherwise performs exactly those steps.
    """
    src = staging_dir(film) / film.name
    src.write_bytes(data if data is not None else new_content(film))
    sender_mtime = time.time() - 3600.0  # rsync -a preserves the sender's (older) mtime
    os.utime(src, (sender_mtime, sender_mtime))
    rsync = shutil.which("rsync")
    if rsync is not None:
        subprocess.run([rsync, "-a", "--whole-file", str(src), str(film)], check=True, timeout=30)
        return
    fd, tmp = tempfile.mkstemp(dir=film.parent, prefix=f".{film.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(src.read_bytes())
    os.utime(tmp, (sender_mtime, sender_mtime))
    os.rename(tmp, film)


REPLACEMENTS: dict[str, Callable[[Path], None]] = {
    "in_place": replace_in_place,
    "truncate_write": truncate_and_write,
    "cp_over": cp_over,
    "mv_partial": mv_over_from_partial,
    "mv_elsewhere": mv_over_from_elsewhere,
    "temp_rename": temp_then_rename,
    "hardlink_swap": hardlink_swap,
    "touch": touch,
    "rsync": rsync_over,
}


def slow_copy(
    dest: Path, size: int, *, chunk: int = 64 * 1024, seed: int = 7, pause: float = 0.0,
    stop: threading.Event | None = None,
) -> int:
    """Write ``size`` bytes over ``dest`` in ``chunk`` pieces with a flush after each (and ``pause``
    seconds between them), like a copy from a slow source; returns the number of writes. ``stop`` ends
    the copy early."""
    block = film_bytes(chunk, seed)
    writes = 0
    with open(dest, "wb") as f:
        for _ in range(0, size, chunk):
            if stop is not None and stop.is_set():
                break
            f.write(block)
            f.flush()
            writes += 1
            if pause:
                time.sleep(pause)
    return writes


def raw_exchange(socket_path: Path, payload: bytes, *, timeout: float = 5.0, shut_write: bool = True) -> bytes:
    """Send raw bytes on the control socket and return everything the daemon answers before closing."""
    import socket as _socket

    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(socket_path))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(payload)
            if shut_write:
                s.shutdown(_socket.SHUT_WR)
        chunks = []
        with contextlib.suppress(ConnectionResetError):
            while True:
                data = s.recv(65536)
                if not data:
                    break
                chunks.append(data)
        return b"".join(chunks)
    finally:
        s.close()


@contextlib.contextmanager
def lock_held(work_dir: Path, purpose: str = "pipeline") -> Iterator[subprocess.Popen[str]]:
    """A separate process holding ``cinecut.locks.work_dir_lock`` on ``work_dir`` until the block ends."""
    code = (
        "import sys\n"
        "from cinecut.locks import work_dir_lock\n"
        f"lock = work_dir_lock({str(work_dir)!r}, purpose={purpose!r}, announce=True)\n"
        "lock.acquire(5)\n"
        "print('locked', flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "locked", f"lock holder failed to start: {line!r}"
        yield proc
    finally:
        if proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
        proc.wait(10)
