"""The daemon's TOML configuration: parsed once into frozen dataclasses, or rejected with a precise error.

Every key is declared once in a schema table below; the parser, the defaults and the generated reference
(docs/config.md) all come from that table, so they cannot drift apart. Unknown keys are errors: a typo in
a config that deletes files must never silently do nothing.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from datetime import time as dtime
from pathlib import Path
from typing import Any

EX_CONFIG = 78
DEFAULT_CONFIG_PATH = Path("/etc/cinecut/cinecutd.toml")
CONFIG_ENV = "CINECUTD_CONFIG"
DEFAULT_SOCKET = Path("/run/cinecut/cinecutd.sock")
SOCKET_GROUP = "cinecut"
MAX_CONFIG_BYTES = 1 << 20  # a config is a few hundred bytes; refuse to parse megabytes of junk

LOG_FORMATS = ("auto", "json", "console", "journal")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
ORPHAN_POLICIES = ("keep", "reclaim")
WATCH_MODES = ("inotify", "poll")

DEFAULT_VIDEO_EXTENSIONS = (
    ".mkv", ".mp4", ".m4v", ".avi", ".mov", ".webm", ".ts", ".m2ts", ".wmv", ".mpg", ".mpeg",
)
DEFAULT_SUBTITLE_EXTENSIONS = (".srt", ".ass", ".ssa")


def default_config_path() -> Path:
    """The config the daemon and the client read when none is given: $CINECUTD_CONFIG, else /etc."""
    env = os.environ.get(CONFIG_ENV)
    return Path(env) if env else DEFAULT_CONFIG_PATH


class ConfigError(Exception):
    """A config the daemon refuses to start with; str() names the file, the key and why."""

    def __init__(self, file: Path | str, key: str | None, why: str) -> None:
        self.file = Path(file)
        self.key = key
        self.why = why
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.file}: {self.key}: {self.why}" if self.key else f"{self.file}: {self.why}"


class _Invalid(Exception):
    """Raised by a key checker; the parser adds the file and the key path."""


# --------------------------------------------------------------------------------------------- window


_HHMM = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")


@dataclass(frozen=True)
class Window:
    """A daily local-time window ("01:00-06:00", may cross midnight) or "always".

    The start is inclusive and the end exclusive. Datetimes are compared on their wall-clock time, so
    naive local datetimes (what the scheduler uses) and aware ones both work.
    """

    start: dtime | None = None
    end: dtime | None = None

    @property
    def always(self) -> bool:
        return self.start is None

    @classmethod
    def parse(cls, text: str) -> Window:
        if not isinstance(text, str):
            raise ValueError(f'must be a string like "01:00-06:00" or "always", got {_show(text)}')
        spec = text.strip()
        if spec.lower() == "always":
            return cls()
        parts = spec.split("-")
        if len(parts) != 2:
            raise ValueError(f'must be "HH:MM-HH:MM" (local time) or "always", got {_show(text)}')
        times = []
        for part in parts:
            m = _HHMM.match(part.strip())
            if not m:
                raise ValueError(f'must be "HH:MM-HH:MM" with 00:00..23:59 (local time) or "always", '
                                 f"got {_show(text)}")
            times.append(dtime(int(m.group(1)), int(m.group(2))))
        if times[0] == times[1]:
            raise ValueError(f'start and end are equal in {_show(text)}; use "always" for a 24 h window')
        return cls(times[0], times[1])

    def __str__(self) -> str:
        if self.start is None or self.end is None:
            return "always"
        return f"{self.start:%H:%M}-{self.end:%H:%M}"

    def contains(self, when: datetime) -> bool:
        """Is `when` inside the window?"""
        if self.start is None or self.end is None:
            return True
        t = when.time().replace(tzinfo=None)
        if self.start < self.end:
            return self.start <= t < self.end
        return t >= self.start or t < self.end

    def next_start(self, when: datetime) -> datetime | None:
        """The first start of the window at or after `when` (None for "always": it never starts)."""
        if self.start is None:
            return None
        candidate = datetime.combine(when.date(), self.start, tzinfo=when.tzinfo)
        if candidate < when:
            candidate = datetime.combine(when.date() + timedelta(days=1), self.start, tzinfo=when.tzinfo)
        return candidate

    def current_end(self, when: datetime) -> datetime | None:
        """When the window that contains `when` closes (None for "always" or when outside the window)."""
        if self.start is None or self.end is None or not self.contains(when):
            return None
        candidate = datetime.combine(when.date(), self.end, tzinfo=when.tzinfo)
        if candidate <= when:
            candidate = datetime.combine(when.date() + timedelta(days=1), self.end, tzinfo=when.tzinfo)
        return candidate


# --------------------------------------------------------------------------------------------- dataclasses


@dataclass(frozen=True)
class DaemonConfig:
    rescan_interval: float
    settle_seconds: float
    log_format: str
    log_level: str
    orphans: str
    orphan_grace_days: float
    state_dir: Path
    video_extensions: tuple[str, ...]
    subtitle_extensions: tuple[str, ...]


@dataclass(frozen=True)
class LibraryConfig:
    path: Path
    watch: str
    poll_interval: float
    video_extensions: tuple[str, ...]  # resolved: the library's own list, else [daemon]'s
    subtitle_extensions: tuple[str, ...]


@dataclass(frozen=True)
class ControlConfig:
    socket: Path
    mode: int
    group: str
    request_timeout: float
    max_request_bytes: int


@dataclass(frozen=True)
class PrewarmConfig:
    enabled: bool
    window: Window
    model: Path | None
    mmproj: Path | None
    n_gpu_layers: int
    n_ctx: int
    max_tokens: int
    settle_seconds: float
    gpu_lock: Path
    min_free_vram_mb: int
    vibe: str
    python: Path | None  # None: the daemon's own interpreter
    parallel: int = 0  # frames in flight per job; 0: chosen from the free VRAM when the model loads
    # Sharing the GPU with other programs (a media server's transcodes, another model): see cinecut.gpu_share.
    yield_to: tuple[str, ...] = ("processes", "transcodes", "vram")
    yield_ignore: tuple[str, ...] = ()
    yield_vram_mb: int = 1024
    encoder_busy_percent: int = 5
    quiet_seconds: float = 60.0
    unload_after_s: float = 120.0


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus exposition (both off by default); see cinecutd.metrics."""

    textfile: Path | None = None  # node_exporter textfile collector target
    listen: tuple[str, int] | None = None  # (loopback host, port) of an HTTP /metrics endpoint
    interval: float = 5.0  # seconds between snapshots (and textfile writes)


@dataclass(frozen=True)
class WebhookConfig:
    """The Radarr/Sonarr webhook receiver (``cinecutd.webhook``); off while ``listen`` is None."""

    listen: tuple[str, int] | None = None  # (IP address, port)
    token: str = ""
    token_file: Path | None = None
    allow: tuple[str, ...] = ()  # client networks (CIDR); () = any client that has the token
    max_body_bytes: int = 1 << 20
    max_requests_per_minute: int = 600
    threads: int = 8

    @property
    def loopback(self) -> bool:
        import ipaddress

        return self.listen is not None and ipaddress.ip_address(self.listen[0]).is_loopback


@dataclass(frozen=True)
class PathMapConfig:
    """A path as Radarr/Sonarr see it (``src``, e.g. inside their container) and as this host sees it."""

    src: Path
    dest: Path


@dataclass(frozen=True)
class QueueConfig:
    """Remote pre-warm workers through an RQ queue on Redis (``cinecutd.prewarm.remote``); off while
    ``redis`` is empty."""

    redis: str = ""
    password_file: Path | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.redis)


@dataclass(frozen=True)
class Config:
    path: Path
    daemon: DaemonConfig
    libraries: tuple[LibraryConfig, ...]
    control: ControlConfig
    prewarm: PrewarmConfig
    webhook: WebhookConfig = WebhookConfig()
    path_maps: tuple[PathMapConfig, ...] = ()
    metrics: MetricsConfig = MetricsConfig()
    queue: QueueConfig = QueueConfig()


# --------------------------------------------------------------------------------------------- checkers


def _show(value: Any) -> str:
    """A value as the user wrote it in TOML, for error messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a TOML basic string; control characters escaped
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return repr(value)


# Every number is bounded by what its consumers can take: epoll takes its timeout in milliseconds in a C
# int (24.8 days), threading waits at most threading.TIMEOUT_MAX, llama.cpp a C int. The bounds below are
# far inside those limits and far beyond any useful setting (tests/test_config.py starts the daemon at them).
HOUR = 3600.0
DAY = 86400.0


def _number(
    *, minimum: float | None = None, exclusive: bool = False, maximum: float | None = None, off_or_at_least: float | None = None
) -> Callable[[Any], float]:
    """A finite number in [minimum, maximum]; ``off_or_at_least``: 0 (off) or at least that much."""
    def check(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise _Invalid(f"must be a number, got {_show(v)}")
        if not math.isfinite(v):
            raise _Invalid(f"must be a finite number, got {_show(v)}")
        if minimum is not None and (v <= minimum if exclusive else v < minimum):
            raise _Invalid(f"must be {'>' if exclusive else '>='} {minimum:g}, got {v!r}")
        if maximum is not None and v > maximum:
            raise _Invalid(f"must be <= {maximum:g}, got {v!r}")
        if off_or_at_least is not None and 0 < v < off_or_at_least:
            raise _Invalid(f"must be 0 (off) or at least {off_or_at_least:g}, got {v!r}")
        return float(v)
    return check


def _integer(*, minimum: int, maximum: int | None = None) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise _Invalid(f"must be an integer, got {_show(v)}")
        if v < minimum or (maximum is not None and v > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise _Invalid(f"must be {bound}, got {v}")
        return v
    return check


def _boolean(v: Any) -> bool:
    if not isinstance(v, bool):
        raise _Invalid(f"must be true or false, got {_show(v)}")
    return v


def _choice(options: tuple[str, ...]) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        if not isinstance(v, str) or v.lower() not in options:
            alts = ", ".join(f'"{o}"' for o in options[:-1]) + f' or "{options[-1]}"'
            raise _Invalid(f"must be {alts}, got {_show(v)}")
        return v.lower()
    return check


def _string(v: Any) -> str:
    if not isinstance(v, str):
        raise _Invalid(f"must be a string, got {_show(v)}")
    if "\x00" in v:
        raise _Invalid("must not contain a NUL character")
    return v


def _abs_path(v: Any) -> Path:
    s = _string(v)
    if not s:
        raise _Invalid("must not be empty")
    if not s.startswith("/"):
        raise _Invalid(f"must be an absolute path, got {_show(v)}")
    # normpath keeps exactly two leading slashes (POSIX lets them mean something else); Linux does not.
    return Path("/" + os.path.normpath(s).lstrip("/"))


def _optional_abs_path(v: Any) -> Path | None:
    s = _string(v)
    return _abs_path(s) if s else None


def _library_root(v: Any) -> Path:
    """The root as the kernel resolves it (symlinks followed): "//x", "/x/." and a link to /x are one root,
    and film paths under it are spelled as upstream's realpath spells them."""
    p = _abs_path(v)
    if p != Path("/"):
        p = Path(os.path.realpath(p))
    if p == Path("/"):
        raise _Invalid('must not be "/" (a library root is a folder of films)')
    return p


def _extensions(*, allow_empty: bool) -> Callable[[Any], tuple[str, ...]]:
    def check(v: Any) -> tuple[str, ...]:
        if not isinstance(v, list):
            raise _Invalid(f'must be an array of strings like [".mkv"], got {_show(v)}')
        if not v and not allow_empty:
            raise _Invalid("must not be empty")
        out: list[str] = []
        for i, ext in enumerate(v):
            if (not isinstance(ext, str) or len(ext) < 2 or not ext.startswith(".") or "/" in ext
                    or "\x00" in ext or ext.count(".") != 1 or ext != ext.strip()):
                raise _Invalid(f'[{i}] must be a file extension like ".mkv", got {_show(ext)}')
            low = ext.lower()
            if low not in out:
                out.append(low)
        return tuple(out)
    return check


def _socket_mode(v: Any) -> int:
    if isinstance(v, str):
        if not re.fullmatch(r"0?[0-7]{3}", v.strip()):
            raise _Invalid(f'must be an octal permission string like "0660", got {_show(v)}')
        mode = int(v.strip(), 8)
    elif isinstance(v, int) and not isinstance(v, bool):
        if not 0 <= v <= 0o777:
            raise _Invalid(f'must be an octal permission string like "0660" (or 0o660), got {v}')
        mode = v
    else:
        raise _Invalid(f'must be an octal permission string like "0660", got {_show(v)}')
    if mode & 0o007:
        raise _Invalid(f"must not grant access to others ({mode:04o}): only the owner and the socket's "
                       f"group may talk to the daemon; add users to the group instead")
    if mode & 0o600 != 0o600:
        raise _Invalid(f"must give the owner read and write access, got {mode:04o}")
    return mode


def _group_name(v: Any) -> str:
    s = _string(v)
    if s and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?", s):
        raise _Invalid(f"must be a group name, got {_show(v)}")
    return s


def _vibe(v: Any) -> str:
    s = _string(v)
    if s != s.strip() or "/" in s or any(ord(c) < 32 for c in s):
        raise _Invalid(f"must be a plain word without slashes or control characters, got {_show(v)}")
    return s


YIELD_REASONS: tuple[str, ...] = ("processes", "transcodes", "vram")
LOOPBACK_HOSTS: tuple[str, ...] = ("127.0.0.1", "::1", "localhost")


def _yield_to(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise _Invalid(f"must be a list of strings, got {_show(v)}")
    out: list[str] = []
    for x in v:
        if x.lower() not in YIELD_REASONS:
            raise _Invalid(f'{_show(x)} is not one of "processes", "transcodes", "vram"')
        if x.lower() not in out:
            out.append(x.lower())
    return tuple(out)


def _process_names(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(x, str) and 0 < len(x) <= 256 for x in v) or len(v) > 256:
        raise _Invalid(f"must be a list of process names, got {_show(v)}")
    return tuple(v)


def _listen(v: Any) -> tuple[str, int] | None:
    """``"HOST:PORT"`` on a loopback address (``""``: off). Metrics are for a local Prometheus or a
    reverse proxy; a remote scraper reads the textfile through node_exporter instead."""
    if not isinstance(v, str):
        raise _Invalid(f'must be "HOST:PORT", got {_show(v)}')
    if v == "":
        return None
    host, sep, port = v.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise _Invalid(f'must be "HOST:PORT" with a port from 0 to 65535, got {_show(v)}')
    if host not in LOOPBACK_HOSTS and not host.startswith("127."):
        raise _Invalid(f"{_show(host)} is not a loopback address (127.0.0.1, ::1 or localhost); "
                       "scrape a remote box through node_exporter's textfile collector ([metrics] textfile)")
    return host, int(port)


def _webhook_listen(v: Any) -> tuple[str, int] | None:
    """"IP:PORT" or "[IPv6]:PORT" ("" = off). An address, not a host name: nothing is resolved."""
    import ipaddress

    s = _string(v).strip()
    if not s:
        return None
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([0-9.]+):(\d{1,5})", s)
    if not m:
        raise _Invalid(f'must be "IP:PORT" like "127.0.0.1:8787" or "[::1]:8787" (or "" for off), got {_show(v)}')
    host, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise _Invalid(f"{host!r} is not an IP address") from None
    if not 0 <= int(port) <= 65535:
        raise _Invalid(f"port must be 0 to 65535, got {port}")
    return str(addr), int(port)


def _networks(v: Any) -> tuple[str, ...]:
    import ipaddress

    if not isinstance(v, list):
        raise _Invalid(f'must be an array of networks like ["172.17.0.0/16"], got {_show(v)}')
    out = []
    for i, item in enumerate(v):
        try:
            out.append(str(ipaddress.ip_network(_string(item), strict=False)))
        except (ValueError, _Invalid):
            raise _Invalid(f"[{i}] must be an IP address or network like 172.17.0.0/16, got {_show(item)}") from None
    return tuple(out)


def _token(v: Any) -> str:
    s = _string(v)
    if s and (len(s) < 16 or any(ord(c) < 33 or ord(c) > 126 for c in s)):
        raise _Invalid("must be at least 16 printable ASCII characters without spaces (e.g. `openssl rand -hex 24`)")
    return s


def _window(v: Any) -> Window:
    try:
        return Window.parse(v)
    except ValueError as e:
        raise _Invalid(str(e)) from None


# --------------------------------------------------------------------------------------------- schema


class _Required:
    def __repr__(self) -> str:
        return "(required)"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class Key:
    """One config key: its default (as written in TOML), a checker, and its documentation."""

    name: str
    default: Any
    check: Callable[[Any], Any]
    doc: str


DAEMON_KEYS: tuple[Key, ...] = (
    Key("rescan_interval", 900, _number(minimum=0, maximum=7 * DAY, off_or_at_least=1),
        "Seconds between full reconcile scans, the safety net for events the kernel dropped. 0 disables them; "
        "else 1 to 604800 (a week)."),
    Key("settle_seconds", 1.0, _number(minimum=0, maximum=HOUR),
        "Quiet time after the last event of a burst before the final revalidation (invalidation itself is "
        "never delayed). At most 3600."),
    Key("log_format", "auto", _choice(LOG_FORMATS),
        '"auto" (journal under systemd, console on a TTY, else JSON lines), "json", "console" or "journal".'),
    Key("log_level", "info", _choice(LOG_LEVELS), "debug, info, warning, error or critical."),
    Key("orphans", "keep", _choice(ORPHAN_POLICIES),
        '"keep": report orphaned work dirs only. "reclaim": delete their regenerable data (cache, proxy, '
        "keyframes) after `orphan_grace_days`; manifests and unknown files are never deleted."),
    Key("orphan_grace_days", 7, _number(minimum=0, maximum=3650),
        "Days an orphaned work dir is kept before `reclaim` (at most 3650)."),
    Key("state_dir", "/var/lib/cinecut", _abs_path, "Where the daemon keeps its own state."),
    Key("video_extensions", list(DEFAULT_VIDEO_EXTENSIONS), _extensions(allow_empty=False),
        "File extensions that are films (case-insensitive)."),
    Key("subtitle_extensions", list(DEFAULT_SUBTITLE_EXTENSIONS), _extensions(allow_empty=True),
        "File extensions of subtitle sidecars (case-insensitive)."),
)

LIBRARY_KEYS: tuple[Key, ...] = (
    Key("path", REQUIRED, _library_root,
        'Absolute path of the library root, resolved (symlinks followed); not "/", and roots may neither '
        "repeat nor nest."),
    Key("watch", "inotify", _choice(WATCH_MODES),
        '"inotify" (local filesystems) or "poll" (NFS, SMB and other filesystems that do not report '
        "remote writes)."),
    Key("poll_interval", 30.0, _number(minimum=0.1, maximum=DAY),
        'Seconds between polls when watch = "poll" (0.1 to 86400).'),
    Key("video_extensions", None, _extensions(allow_empty=False),
        "Overrides `[daemon].video_extensions` for this library."),
    Key("subtitle_extensions", None, _extensions(allow_empty=True),
        "Overrides `[daemon].subtitle_extensions` for this library."),
)

CONTROL_KEYS: tuple[Key, ...] = (
    Key("socket", str(DEFAULT_SOCKET), _abs_path, "Path of the control socket (`cinecutd status` talks to it)."),
    Key("mode", "0660", _socket_mode,
        "Octal permissions of the socket. Access for others is refused: members of the socket's group may "
        "use the client."),
    Key("group", "", _group_name,
        'Group that owns the socket ("" = the daemon\'s group; the packaged unit runs with group cinecut).'),
    Key("request_timeout", 5.0, _number(minimum=0.1, maximum=HOUR),
        "Seconds a client has to send a complete request (and to read its answer) before it is cut off "
        "(0.1 to 3600)."),
    Key("max_request_bytes", 65536, _integer(minimum=256, maximum=16 << 20),
        "Largest request line accepted; a longer one is answered with `too_large` and the connection closed."),
)

PREWARM_KEYS: tuple[Key, ...] = (
    Key("enabled", False, _boolean, "Pre-warm SceneDescription caches of new films on the GPU."),
    Key("window", "01:00-06:00", _window,
        '"HH:MM-HH:MM" in local time (may cross midnight; start inclusive, end exclusive) or "always".'),
    Key("model", "", _optional_abs_path, "Absolute path of the GGUF text model (required when enabled)."),
    Key("mmproj", "", _optional_abs_path, "Absolute path of the GGUF mmproj (required when enabled)."),
    Key("n_gpu_layers", -1, _integer(minimum=-1, maximum=100_000), "Layers offloaded to the GPU: -1 all, 0 CPU only."),
    Key("n_ctx", 4096, _integer(minimum=512, maximum=1 << 20),
        "Accepted for compatibility: each frame gets the context its prompt and `max_tokens` need."),
    Key("max_tokens", 256, _integer(minimum=16, maximum=1 << 16), "Token budget of one frame's answer."),
    Key("parallel", 0, _integer(minimum=0, maximum=64),
        "Frames described at once in one batch (continuous batching, one KV cache each): 1 = one at a "
        "time; 0 = as many KV caches as the free VRAM holds after loading the model (at most 8), or on "
        "the CPU as many as a quarter of the available memory holds (its cgroup's `MemoryMax=` counted; "
        "at most 16); the worker logs the size and its KV cache (0 to 64)."),
    Key("settle_seconds", 60, _number(minimum=0, maximum=7 * DAY),
        "A film is queued once its size and mtime have not changed for this long (at most 604800)."),
    Key("gpu_lock", "/run/cinecut/gpu.lock", _abs_path,
        "GPU lock file shared with interactive `cinecut analyze` runs (which always win)."),
    Key("min_free_vram_mb", 0, _integer(minimum=0, maximum=1 << 24),
        "Free VRAM needed before loading the model; 0 = estimate from the model files."),
    Key("vibe", "", _vibe, "Vibe recorded in a new checkpoint when none exists."),
    Key("python", "", _optional_abs_path,
        'Interpreter that runs the inference worker ("" = the daemon\'s own).'),
    Key("yield_to", list(YIELD_REASONS), _yield_to,
        'When the worker pauses and hands the GPU to other programs (NVML, between frames and before the '
        'first): "processes" (any other process on the GPU), "transcodes" (NVENC/NVDEC busy: Plex, '
        'Jellyfin), "vram" (free VRAM, counting our model as loaded, below `yield_vram_mb` while another '
        "program holds GPU memory). [] = never."),
    Key("yield_ignore", ["Xorg", "Xwayland", "gnome-shell", "kwin_x11", "kwin_wayland"], _process_names,
        'Process names on the GPU that never count as "processes" (a desktop\'s display server).'),
    Key("yield_vram_mb", 1024, _integer(minimum=0, maximum=1 << 24),
        'The "vram" threshold: free VRAM (MiB) other programs must be left.'),
    Key("encoder_busy_percent", 5, _integer(minimum=1, maximum=100),
        'The "transcodes" threshold: encoder or decoder utilisation (%) that counts as a transcode.'),
    Key("quiet_seconds", 60, _number(minimum=0, maximum=7 * DAY),
        "Seconds the GPU must have been free of other users before a paused job resumes (at most 604800)."),
    Key("unload_after_s", 120, _number(minimum=0, maximum=7 * DAY),
        "A pause longer than this unloads the model, freeing its VRAM (at most 604800; 0 = at once)."),
)

METRICS_KEYS: tuple[Key, ...] = (
    Key("textfile", "", _optional_abs_path,
        'Prometheus textfile written atomically every `interval` for node_exporter\'s textfile collector, e.g. '
        '"/var/lib/prometheus/node-exporter/cinecut.prom" ("" = off). Needs `cinecutd systemd-dropin`.'),
    Key("listen", "", _listen,
        'Serve `/metrics` over HTTP on a loopback "HOST:PORT", e.g. "127.0.0.1:9817" ("" = off; port 0: any '
        'free port, logged as `metrics_listening`). The '
        "packaged unit has PrivateNetwork=yes: see the README for the drop-in it needs."),
    Key("interval", 5.0, _number(minimum=1, maximum=HOUR),
        "Seconds between metric snapshots and textfile writes (1 to 3600)."),
)

WEBHOOK_KEYS: tuple[Key, ...] = (
    Key("listen", "", _webhook_listen,
        'Address the webhook receiver listens on, "IP:PORT" (e.g. "127.0.0.1:8787"; port 0: any free '
        'port, shown by `cinecutd status`); "" = off. Anything but a loopback address needs a token. Under '
        "systemd, regenerate the drop-in (`cinecutd systemd-dropin`): the unit has no network otherwise."),
    Key("token", "", _token,
        "Shared secret Radarr/Sonarr send (HTTP Basic password, `Authorization: Bearer`, or `?token=`); at "
        "least 16 characters. Prefer `token_file`."),
    Key("token_file", "", _optional_abs_path,
        "File holding the token (first line), e.g. a systemd credential; not readable by others."),
    Key("allow", [], _networks,
        'Client networks allowed to connect, e.g. ["172.17.0.0/16"] for containers on the default Docker '
        "bridge; [] = any client holding the token (loopback only when listening on loopback)."),
    Key("max_body_bytes", 1 << 20, _integer(minimum=1024, maximum=16 << 20),
        "Largest request body accepted; a larger one is refused with 413 unread."),
    Key("max_requests_per_minute", 600, _integer(minimum=1, maximum=100_000),
        "Requests accepted per minute (a minute's worth may arrive at once); more get 429."),
    Key("threads", 8, _integer(minimum=1, maximum=64),
        "Requests handled at once; a further connection gets 503 at once."),
)

PATH_MAP_KEYS: tuple[Key, ...] = (
    Key("from", REQUIRED, _abs_path, 'A path as Radarr/Sonarr see it, e.g. "/movies" inside their container.'),
    Key("to", REQUIRED, _abs_path,
        'The same folder on this host, e.g. "/srv/media/films". The longest matching `from` wins, compared '
        "by whole path components."),
)

def _redis_url(v: Any) -> str:
    """"" (off) or a redis://, rediss:// or unix:// URL; a password belongs in password_file, not here."""
    from urllib.parse import urlparse

    s = _string(v).strip()
    if not s:
        return ""
    u = urlparse(s)
    if u.scheme not in ("redis", "rediss", "unix"):
        raise _Invalid(f"{_show(v)}: expected redis://HOST:PORT/DB, rediss://... or unix:///PATH")
    if u.password:
        raise _Invalid("holds a password: put it in queue.password_file instead")
    return s


QUEUE_KEYS: tuple[Key, ...] = (
    Key("redis", "", _redis_url,
        'Redis URL of the pre-warm job queue, e.g. "redis://127.0.0.1:6379/0"; "" = pre-warm on this host. '
        "With a queue, `cinecut worker` processes on GPU hosts take the jobs; this host needs no model."),
    Key("password_file", "", _optional_abs_path,
        "File whose first line is the Redis password (requirepass), e.g. a systemd credential."),
)

TABLES: dict[str, tuple[Key, ...]] = {
    "daemon": DAEMON_KEYS,
    "library": LIBRARY_KEYS,
    "control": CONTROL_KEYS,
    "prewarm": PREWARM_KEYS,
    "metrics": METRICS_KEYS,
    "webhook": WEBHOOK_KEYS,
    "queue": QUEUE_KEYS,
    "path_map": PATH_MAP_KEYS,
}

TABLE_DOCS: dict[str, str] = {
    "daemon": "General behaviour of the daemon. Optional.",
    "library": "One `[[library]]` table per library root; at least one is required. In error messages "
               "`library[0]` is the first table in the file.",
    "control": "The control socket used by `cinecutd status` and friends. Optional.",
    "prewarm": "Overnight pre-warming of SceneDescription caches. Optional; off by default.",
    "metrics": "Prometheus metrics: a node_exporter textfile and/or an HTTP `/metrics` on loopback. Optional; "
               "off by default.",
    "queue": "Pre-warm on other hosts' GPUs: jobs go to an RQ queue on Redis, `cinecut worker` takes them. "
             "Optional; off by default.",
    "webhook": "Radarr/Sonarr \"Connect\" webhook receiver: their events make the daemon look at the named "
               "paths at once (hints; the files decide). Optional; off by default.",
    "path_map": "One `[[path_map]]` table per folder that Radarr/Sonarr see under another path (they often run "
                "in a container). Applied to webhook and `cinecutd arr-hook` paths.",
}


def _unknown(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f' (did you mean "{close[0]}"?)' if close else ""
    return f"unknown key{hint}; known keys: {', '.join(known)}"


def _parse_table(file: Path, raw: Any, keys: tuple[Key, ...], where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(file, where, f"must be a table, got {_show(raw)}")
    known = [k.name for k in keys]
    for name in raw:
        if name not in known:
            raise ConfigError(file, f"{where}.{name}", _unknown(name, known))
    out: dict[str, Any] = {}
    for key in keys:
        if key.name in raw:
            value = raw[key.name]
        elif key.default is REQUIRED:
            raise ConfigError(file, f"{where}.{key.name}", "is required")
        elif key.default is None:
            out[key.name] = None
            continue
        else:
            value = key.default
        try:
            out[key.name] = key.check(value)
        except _Invalid as e:
            raise ConfigError(file, f"{where}.{key.name}", str(e)) from None
    return out


def parse_config(data: Mapping[str, Any], path: Path) -> Config:
    """Validate an already-decoded TOML document; `path` only names the file in errors."""
    for name in data:
        if name not in TABLES:
            raise ConfigError(path, name, _unknown(name, list(TABLES)).replace("key", "table", 1))
    d = _parse_table(path, data.get("daemon", {}), DAEMON_KEYS, "daemon")
    daemon = DaemonConfig(**d)
    overlap = set(daemon.video_extensions) & set(daemon.subtitle_extensions)
    if overlap:
        raise ConfigError(path, "daemon.subtitle_extensions", f"{sorted(overlap)[0]} is also a video extension")

    libs_raw = data.get("library")
    if libs_raw is None:
        raise ConfigError(path, "library", "at least one [[library]] table with a path is required")
    if isinstance(libs_raw, dict):
        raise ConfigError(path, "library", "must be an array of tables: write [[library]], not [library]")
    if not isinstance(libs_raw, list) or not libs_raw:
        raise ConfigError(path, "library", "at least one [[library]] table with a path is required")
    libraries: list[LibraryConfig] = []
    for i, raw in enumerate(libs_raw):
        where = f"library[{i}]"
        if not isinstance(raw, dict):
            raise ConfigError(path, where, "must be a table: write [[library]] sections")
        lib = _parse_table(path, raw, LIBRARY_KEYS, where)
        if "poll_interval" in raw and lib["watch"] != "poll":
            raise ConfigError(path, f"{where}.poll_interval", 'only applies when watch = "poll"')
        lib["video_extensions"] = lib["video_extensions"] or daemon.video_extensions
        if lib["subtitle_extensions"] is None:
            lib["subtitle_extensions"] = daemon.subtitle_extensions
        for j, other in enumerate(libraries):
            a, b = lib["path"], other.path
            if a == b:
                raise ConfigError(path, f"{where}.path", f'"{a}" is already library[{j}].path')
            if b in a.parents:
                raise ConfigError(path, f"{where}.path", f'"{a}" is inside library[{j}].path "{b}"')
            if a in b.parents:
                raise ConfigError(path, f"{where}.path", f'"{a}" contains library[{j}].path "{b}"')
        overlap = set(lib["video_extensions"]) & set(lib["subtitle_extensions"])
        if overlap:
            raise ConfigError(path, f"{where}.subtitle_extensions",
                              f"{sorted(overlap)[0]} is also a video extension")
        libraries.append(LibraryConfig(**lib))

    control = ControlConfig(**_parse_table(path, data.get("control", {}), CONTROL_KEYS, "control"))
    p = _parse_table(path, data.get("prewarm", {}), PREWARM_KEYS, "prewarm")
    queue = QueueConfig(**_parse_table(path, data.get("queue", {}), QUEUE_KEYS, "queue"))
    if p["enabled"] and not queue.enabled:  # with a queue, the models are the workers' own
        for name in ("model", "mmproj"):
            if p[name] is None:
                raise ConfigError(path, f"prewarm.{name}", "is required when prewarm.enabled = true")
    prewarm = PrewarmConfig(**p)
    metrics = MetricsConfig(**_parse_table(path, data.get("metrics", {}), METRICS_KEYS, "metrics"))
    webhook, path_maps = _parse_arr(path, data)
    return Config(path=path, daemon=daemon, libraries=tuple(libraries), control=control, prewarm=prewarm,
                  metrics=metrics, webhook=webhook, path_maps=path_maps, queue=queue)


def _parse_arr(path: Path, data: Mapping[str, Any]) -> tuple[WebhookConfig, tuple[PathMapConfig, ...]]:
    """[webhook] and [[path_map]]: a listener off loopback needs a token; a `from` appears once."""
    webhook = WebhookConfig(**_parse_table(path, data.get("webhook", {}), WEBHOOK_KEYS, "webhook"))
    if webhook.token and webhook.token_file is not None:
        raise ConfigError(path, "webhook.token_file", "give either token or token_file, not both")
    if webhook.listen is not None and not webhook.loopback and not webhook.token and webhook.token_file is None:
        raise ConfigError(path, "webhook.token", f"is required when listen is not a loopback address "
                                                 f"({webhook.listen[0]}): anyone on the network could post")
    raw = data.get("path_map", [])
    if not isinstance(raw, list):
        raise ConfigError(path, "path_map", "must be an array of tables: write [[path_map]] sections")
    maps: list[PathMapConfig] = []
    for i, item in enumerate(raw):
        where = f"path_map[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(path, where, "must be a table: write [[path_map]] sections")
        m = _parse_table(path, item, PATH_MAP_KEYS, where)
        for j, other in enumerate(maps):
            if other.src == m["from"]:
                raise ConfigError(path, f"{where}.from", f'"{m["from"]}" is already path_map[{j}].from')
        maps.append(PathMapConfig(m["from"], m["to"]))
    return webhook, tuple(maps)


def load_config(path: Path | str) -> Config:
    """Read and validate a config file; every problem becomes a ConfigError naming file, key and why."""
    path = Path(path)
    try:
        # O_NONBLOCK: a FIFO (or a device) named as the config must be refused, not block the daemon forever.
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if stat.S_ISDIR(mode):
                raise IsADirectoryError(path)
            if not stat.S_ISREG(mode):
                raise ConfigError(path, None, "is not a regular file (a FIFO, socket or device); not a config file")
            blob = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(path, None, "no such file") from None
    except IsADirectoryError:
        raise ConfigError(path, None, "is a directory, not a config file") from None
    except PermissionError:
        raise ConfigError(path, None, "permission denied (cannot read the config)") from None
    except OSError as e:
        raise ConfigError(path, None, f"cannot read: {e.strerror or e}") from None
    if len(blob) > MAX_CONFIG_BYTES:
        raise ConfigError(path, None, f"larger than {MAX_CONFIG_BYTES} bytes; not a config file")
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError as e:
        line = blob[: e.start].count(b"\n") + 1
        raise ConfigError(path, None, f"invalid TOML: not UTF-8 (at line {line})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, None, f"invalid TOML: {e}") from None
    except RecursionError:
        raise ConfigError(path, None, "invalid TOML: nested too deeply") from None
    except ValueError as e:  # e.g. an integer literal beyond Python's digit limit
        raise ConfigError(path, None, f"invalid TOML: {e}") from None
    return parse_config(data, path)


# --------------------------------------------------------------------------------------------- reference


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return _show(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def render_reference() -> str:
    """The key reference of docs/config.md, generated from the schema above (a test keeps them equal)."""
    lines: list[str] = []
    for table, keys in TABLES.items():
        header = f"[[{table}]]" if table in ("library", "path_map") else f"[{table}]"
        lines += [f"### `{header}`", "", TABLE_DOCS[table], "", "| key | default | meaning |", "|---|---|---|"]
        for key in keys:
            if key.default is REQUIRED:
                default = "required"
            elif key.default is None:
                default = "from `[daemon]`"
            else:
                default = f"`{_toml_value(key.default)}`"
            doc = key.doc.replace("|", r"\|")
            lines.append(f"| `{key.name}` | {default} | {doc} |")
        lines.append("")
    return "\n".join(lines)



DOC_BEGIN, DOC_END = "<!-- BEGIN GENERATED KEYS -->\n", "<!-- END GENERATED KEYS -->"


def splice_reference(doc: str) -> str:
    """docs/config.md with its generated block replaced by the current reference."""
    head, rest = doc.split(DOC_BEGIN, 1)
    _, tail = rest.split(DOC_END, 1)
    return head + DOC_BEGIN + render_reference() + DOC_END + tail


if __name__ == "__main__":
    # `python -m cinecutd.config` prints the key reference; `python -m cinecutd.config docs/config.md`
    # rewrites the generated block of that file in place.
    import sys

    if len(sys.argv) > 1:
        target = Path(sys.argv[1])
        target.write_text(splice_reference(target.read_text(encoding="utf-8")), encoding="utf-8")
    else:
        print(render_reference(), end="")
