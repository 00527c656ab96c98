"""The daemon's config loader: defaults, precise errors (also through the real `cinecutd run`), Window."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from datetime import datetime, timedelta
from datetime import time as dtime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cinecutd.config import (
    CONFIG_ENV,
    DEFAULT_CONFIG_PATH,
    DEFAULT_SOCKET,
    DEFAULT_SUBTITLE_EXTENSIONS,
    DEFAULT_VIDEO_EXTENSIONS,
    DOC_BEGIN,
    DOC_END,
    EX_CONFIG,
    TABLES,
    ConfigError,
    Window,
    default_config_path,
    load_config,
    parse_config,
    render_reference,
    splice_reference,
)

REPO = Path(__file__).resolve().parents[1]
CINECUTD = Path(sys.executable).parent / "cinecutd"

MINIMAL = '[[library]]\npath = "/srv/media/films"\n\n[control]\nsocket = "/run/cinecut/cinecutd.sock"\n'


def write(tmp_path: Path, text: str, name: str = "cinecutd.toml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def error_of(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    msg = str(ei.value)
    assert msg.startswith(f"{path}: "), msg
    return msg[len(f"{path}: "):]


# --------------------------------------------------------------------------------------------- valid


def test_minimal_config_from_the_issue_gets_every_default(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL))
    assert cfg.path == tmp_path / "cinecutd.toml"
    d = cfg.daemon
    assert (d.rescan_interval, d.settle_seconds, d.log_format, d.log_level) == (900, 1.0, "auto", "info")
    assert (d.orphans, d.orphan_grace_days, d.state_dir) == ("keep", 7, Path("/var/lib/cinecut"))
    assert d.video_extensions == DEFAULT_VIDEO_EXTENSIONS and d.subtitle_extensions == DEFAULT_SUBTITLE_EXTENSIONS
    (lib,) = cfg.libraries
    assert (lib.path, lib.watch, lib.poll_interval) == (Path("/srv/media/films"), "inotify", 30.0)
    assert lib.video_extensions == DEFAULT_VIDEO_EXTENSIONS
    c = cfg.control
    assert (c.socket, c.mode, c.group, c.request_timeout, c.max_request_bytes) == (
        DEFAULT_SOCKET, 0o660, "", 5.0, 65536)
    p = cfg.prewarm
    assert (p.enabled, str(p.window), p.model, p.mmproj, p.python) == (False, "01:00-06:00", None, None, None)
    assert (p.n_gpu_layers, p.n_ctx, p.max_tokens, p.settle_seconds) == (-1, 4096, 256, 60)
    assert (p.gpu_lock, p.min_free_vram_mb, p.vibe) == (Path("/run/cinecut/gpu.lock"), 0, "")


def test_values_are_converted_and_overrides_apply(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, """
[daemon]
rescan_interval = 0
log_level = "DEBUG"
video_extensions = [".MKV", ".mp4", ".mkv"]
[[library]]
path = "/srv/films/"
[[library]]
path = "/mnt/nas//films"
watch = "poll"
poll_interval = 5
subtitle_extensions = []
video_extensions = [".avi"]
[control]
mode = 0o640
group = "cinecut"
[prewarm]
enabled = true
window = "always"
model = "/models/m.gguf"
mmproj = "/models/p.gguf"
python = "/opt/venv/bin/python3"
"""))
    assert cfg.daemon.rescan_interval == 0 and cfg.daemon.log_level == "debug"
    assert cfg.daemon.video_extensions == (".mkv", ".mp4")  # lower-cased, de-duplicated, in order
    a, b = cfg.libraries
    assert a.path == Path("/srv/films") and a.video_extensions == (".mkv", ".mp4")
    assert a.subtitle_extensions == DEFAULT_SUBTITLE_EXTENSIONS
    assert (b.path, b.watch, b.poll_interval) == (Path("/mnt/nas/films"), "poll", 5.0)
    assert b.video_extensions == (".avi",) and b.subtitle_extensions == ()
    assert cfg.control.mode == 0o640 and cfg.control.group == "cinecut"
    assert cfg.prewarm.window.always and cfg.prewarm.model == Path("/models/m.gguf")
    assert cfg.prewarm.python == Path("/opt/venv/bin/python3")


def test_config_is_frozen(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL))
    with pytest.raises(AttributeError):
        cfg.daemon.rescan_interval = 1  # type: ignore[misc]


def test_default_path_and_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    assert default_config_path() == DEFAULT_CONFIG_PATH == Path("/etc/cinecut/cinecutd.toml")
    monkeypatch.setenv(CONFIG_ENV, "/elsewhere/d.toml")
    assert default_config_path() == Path("/elsewhere/d.toml")


def test_packaged_example_is_valid_and_shows_every_key_at_its_default() -> None:
    example = REPO / "packaging" / "cinecutd.toml"
    cfg = load_config(example)
    defaults = parse_config({"library": [{"path": "/srv/media/films"}]}, example)
    assert cfg == defaults
    text = example.read_text()
    for table, keys in TABLES.items():
        for key in keys:
            assert f"\n{key.name} =" in text or f"\n# {key.name} =" in text, f"{table}.{key.name} undocumented"


def test_docs_reference_is_generated_from_the_schema() -> None:
    doc = (REPO / "docs" / "config.md").read_text()
    assert splice_reference(doc) == doc, "docs/config.md is stale: run python -m cinecutd.config docs/config.md"
    generated = doc[doc.index(DOC_BEGIN) + len(DOC_BEGIN): doc.index(DOC_END)]
    assert generated == render_reference()
    for keys in TABLES.values():
        for key in keys:
            assert f"| `{key.name}` |" in generated


# --------------------------------------------------------------------------------------------- errors

LIB = '[[library]]\npath = "/srv/films"\n'

ERRORS = [
    # (config text, expected "key: why" after the file name)
    (LIB + 'watch = "fanotify"\n',
     'library[0].watch: must be "inotify" or "poll", got "fanotify"'),
    (LIB + '[[library]]\npath = "/srv/other"\nwatch = "fanotify"\n',
     'library[1].watch: must be "inotify" or "poll", got "fanotify"'),
    ('[daemon]\nrescan_intervall = 60\n' + LIB,
     'daemon.rescan_intervall: unknown key (did you mean "rescan_interval"?); known keys: rescan_interval, '
     'settle_seconds, log_format, log_level, orphans, orphan_grace_days, state_dir, video_extensions, '
     'subtitle_extensions'),
    (LIB + '[deamon]\n', 'deamon: unknown table (did you mean "daemon"?); known keys: daemon, library, control, '
                         'prewarm, metrics, webhook, queue, path_map'),
    (LIB + 'colour = "red"\n', "library[0].colour: unknown key; known keys: path, watch, poll_interval, "
                               "video_extensions, subtitle_extensions"),
    ("", "library: at least one [[library]] table with a path is required"),
    ("[daemon]\nlog_level = 'info'\n", "library: at least one [[library]] table with a path is required"),
    ('[library]\npath = "/srv/films"\n', "library: must be an array of tables: write [[library]], not [library]"),
    ("library = []\n", "library: at least one [[library]] table with a path is required"),
    ("library = [1]\n", "library[0]: must be a table: write [[library]] sections"),
    ('[[library]]\nwatch = "poll"\n', "library[0].path: is required"),
    ('[[library]]\npath = "srv/films"\n', 'library[0].path: must be an absolute path, got "srv/films"'),
    ('[[library]]\npath = "/"\n', 'library[0].path: must not be "/" (a library root is a folder of films)'),
    ('[[library]]\npath = "/srv/.."\n', 'library[0].path: must not be "/" (a library root is a folder of films)'),
    ('[[library]]\npath = ""\n', "library[0].path: must not be empty"),
    ("[[library]]\npath = 5\n", "library[0].path: must be a string, got 5"),
    (LIB + '[[library]]\npath = "/srv/films/"\n', 'library[1].path: "/srv/films" is already library[0].path'),
    (LIB + '[[library]]\npath = "/srv/films/new"\n',
     'library[1].path: "/srv/films/new" is inside library[0].path "/srv/films"'),
    (LIB + '[[library]]\npath = "/srv"\n', 'library[1].path: "/srv" contains library[0].path "/srv/films"'),
    (LIB + "poll_interval = 10\n", 'library[0].poll_interval: only applies when watch = "poll"'),
    (LIB + 'watch = "poll"\npoll_interval = 0\n', "library[0].poll_interval: must be >= 0.1, got 0"),
    (LIB + 'watch = "poll"\npoll_interval = 1e300\n', "library[0].poll_interval: must be <= 86400, got 1e+300"),
    ('[[library]]\npath = "//"\n', 'library[0].path: must not be "/" (a library root is a folder of films)'),
    ('[[library]]\npath = "//srv/.."\n', 'library[0].path: must not be "/" (a library root is a folder of films)'),
    (LIB + '[[library]]\npath = "//srv/films"\n', 'library[1].path: "/srv/films" is already library[0].path'),
    (LIB + '[[library]]\npath = "//srv/films/sub"\n',
     'library[1].path: "/srv/films/sub" is inside library[0].path "/srv/films"'),
    ('[[library]]\npath = "//srv/films/sub"\n' + LIB,
     'library[1].path: "/srv/films" contains library[0].path "/srv/films/sub"'),
    ("[daemon]\nrescan_interval = 0.5\n" + LIB, "daemon.rescan_interval: must be 0 (off) or at least 1, got 0.5"),
    ("[daemon]\nrescan_interval = 1e12\n" + LIB, "daemon.rescan_interval: must be <= 604800, got 1000000000000.0"),
    ("[daemon]\nsettle_seconds = 1e300\n" + LIB, "daemon.settle_seconds: must be <= 3600, got 1e+300"),
    ("[daemon]\norphan_grace_days = 1e300\n" + LIB, "daemon.orphan_grace_days: must be <= 3650, got 1e+300"),
    (LIB + "[control]\nrequest_timeout = 2592000\n", "control.request_timeout: must be <= 3600, got 2592000"),
    (LIB + "[prewarm]\nsettle_seconds = 1e300\n", "prewarm.settle_seconds: must be <= 604800, got 1e+300"),
    (LIB + "[prewarm]\nn_gpu_layers = 4294967296\n",
     "prewarm.n_gpu_layers: must be between -1 and 100000, got 4294967296"),
    (LIB + "[prewarm]\nmin_free_vram_mb = 9223372036854775808\n",
     "prewarm.min_free_vram_mb: must be between 0 and 16777216, got 9223372036854775808"),
    (LIB + 'watch = "poll"\npoll_interval = "30"\n', 'library[0].poll_interval: must be a number, got "30"'),
    (LIB + 'video_extensions = "mkv"\n',
     'library[0].video_extensions: must be an array of strings like [".mkv"], got "mkv"'),
    (LIB + 'video_extensions = []\n', "library[0].video_extensions: must not be empty"),
    (LIB + 'video_extensions = [".mkv", "mp4"]\n',
     'library[0].video_extensions: [1] must be a file extension like ".mkv", got "mp4"'),
    (LIB + 'subtitle_extensions = [".mkv"]\n', "library[0].subtitle_extensions: .mkv is also a video extension"),
    ('[daemon]\nsubtitle_extensions = [".srt", ".MP4"]\n' + LIB,
     "daemon.subtitle_extensions: .mp4 is also a video extension"),
    ("[daemon]\nrescan_interval = -1\n" + LIB, "daemon.rescan_interval: must be >= 0, got -1"),
    ("[daemon]\nrescan_interval = true\n" + LIB, "daemon.rescan_interval: must be a number, got true"),
    ("[daemon]\nrescan_interval = nan\n" + LIB, "daemon.rescan_interval: must be a finite number, got nan"),
    ("[daemon]\nsettle_seconds = -0.5\n" + LIB, "daemon.settle_seconds: must be >= 0, got -0.5"),
    ('[daemon]\nlog_format = "xml"\n' + LIB,
     'daemon.log_format: must be "auto", "json", "console" or "journal", got "xml"'),
    ('[daemon]\nlog_level = "verbose"\n' + LIB,
     'daemon.log_level: must be "debug", "info", "warning", "error" or "critical", got "verbose"'),
    ('[daemon]\norphans = "delete"\n' + LIB, 'daemon.orphans: must be "keep" or "reclaim", got "delete"'),
    ("[daemon]\norphan_grace_days = -3\n" + LIB, "daemon.orphan_grace_days: must be >= 0, got -3"),
    ('[daemon]\nstate_dir = "var/lib"\n' + LIB, 'daemon.state_dir: must be an absolute path, got "var/lib"'),
    ("daemon = 3\n" + LIB, "daemon: must be a table, got 3"),
    (LIB + '[control]\nsocket = "cinecutd.sock"\n', 'control.socket: must be an absolute path, got "cinecutd.sock"'),
    (LIB + '[control]\nmode = "0666"\n',
     "control.mode: must not grant access to others (0666): only the owner and the socket's group may talk "
     "to the daemon; add users to the group instead"),
    (LIB + '[control]\nmode = "rw-rw----"\n',
     'control.mode: must be an octal permission string like "0660", got "rw-rw----"'),
    (LIB + "[control]\nmode = 660\n",
     'control.mode: must be an octal permission string like "0660" (or 0o660), got 660'),
    (LIB + '[control]\nmode = "0060"\n', "control.mode: must give the owner read and write access, got 0060"),
    (LIB + '[control]\ngroup = "bad group"\n', 'control.group: must be a group name, got "bad group"'),
    (LIB + "[control]\nrequest_timeout = 0\n", "control.request_timeout: must be >= 0.1, got 0"),
    (LIB + "[control]\nmax_request_bytes = 10\n", "control.max_request_bytes: must be between 256 and 16777216, "
                                                  "got 10"),
    (LIB + "[control]\nmax_request_bytes = 1.5\n", "control.max_request_bytes: must be an integer, got 1.5"),
    (LIB + '[prewarm]\nenabled = "yes"\n', 'prewarm.enabled: must be true or false, got "yes"'),
    (LIB + "[prewarm]\nenabled = true\n", "prewarm.model: is required when prewarm.enabled = true"),
    (LIB + '[prewarm]\nenabled = true\nmodel = "/m.gguf"\n', "prewarm.mmproj: is required when prewarm.enabled = true"),
    (LIB + '[prewarm]\nmodel = "m.gguf"\n', 'prewarm.model: must be an absolute path, got "m.gguf"'),
    (LIB + '[prewarm]\nwindow = "1:00-6:00"\n',
     'prewarm.window: must be "HH:MM-HH:MM" with 00:00..23:59 (local time) or "always", got "1:00-6:00"'),
    (LIB + '[prewarm]\nwindow = "02:00-02:00"\n',
     'prewarm.window: start and end are equal in "02:00-02:00"; use "always" for a 24 h window'),
    (LIB + '[prewarm]\nwindow = "night"\n',
     'prewarm.window: must be "HH:MM-HH:MM" (local time) or "always", got "night"'),
    (LIB + "[prewarm]\nwindow = 1\n",
     'prewarm.window: must be a string like "01:00-06:00" or "always", got 1'),
    (LIB + "[prewarm]\nn_gpu_layers = -2\n", "prewarm.n_gpu_layers: must be between -1 and 100000, got -2"),
    (LIB + "[prewarm]\nn_ctx = 100\n", "prewarm.n_ctx: must be between 512 and 1048576, got 100"),
    (LIB + "[prewarm]\nmax_tokens = 0\n", "prewarm.max_tokens: must be between 16 and 65536, got 0"),
    (LIB + "[prewarm]\nsettle_seconds = -1\n", "prewarm.settle_seconds: must be >= 0, got -1"),
    (LIB + '[prewarm]\ngpu_lock = "gpu.lock"\n', 'prewarm.gpu_lock: must be an absolute path, got "gpu.lock"'),
    (LIB + "[prewarm]\nmin_free_vram_mb = -5\n", "prewarm.min_free_vram_mb: must be between 0 and 16777216, got -5"),
    (LIB + '[prewarm]\nvibe = "a/b"\n',
     'prewarm.vibe: must be a plain word without slashes or control characters, got "a/b"'),
    (LIB + '[prewarm]\npython = "python3"\n', 'prewarm.python: must be an absolute path, got "python3"'),
    (LIB + "[prewarm]\nturbo = true\n", "prewarm.turbo: unknown key; known keys: enabled, window, model, mmproj, "
                                        "n_gpu_layers, n_ctx, max_tokens, parallel, settle_seconds, gpu_lock, "
                                        "min_free_vram_mb, vibe, python, yield_to, yield_ignore, yield_vram_mb, "
                                        "encoder_busy_percent, quiet_seconds, unload_after_s"),
    ('[[library]]\npath = "/srv/films"\nwatch = \n',
     "invalid TOML: Invalid value (at line 3, column 9)"),
    ('[daemon]\nlog_level = "info"\nlog_level = "debug"\n' + LIB,
     "invalid TOML: Cannot overwrite a value (at line 3, column 20)"),
]


@pytest.mark.parametrize(("text", "expected"), ERRORS, ids=[e[1].split(":")[0] for e in ERRORS])
def test_precise_error(tmp_path: Path, text: str, expected: str) -> None:
    assert error_of(tmp_path, text) == expected


def test_file_level_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=r"nope\.toml: no such file$"):
        load_config(missing)
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
    (tmp_path / "bin.toml").write_bytes(b'[[library]]\npath = "/srv/\xff"\n')
    with pytest.raises(ConfigError, match=r"bin\.toml: invalid TOML: not UTF-8 \(at line 2\)$"):
        load_config(tmp_path / "bin.toml")
    (tmp_path / "big.toml").write_bytes(b"#" * (2 << 20))
    with pytest.raises(ConfigError, match="larger than"):
        load_config(tmp_path / "big.toml")
    (tmp_path / "deep.toml").write_text("a = " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(tmp_path / "deep.toml")
    (tmp_path / "int.toml").write_text("a = " + "9" * 5000 + "\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(tmp_path / "int.toml")


# (config text, expected "key: why") run through the installed `cinecutd run` entry point.
CLI_CASES = [e for e in ERRORS if e[1].startswith((
    "library[1].watch", "daemon.rescan_intervall", "library: at least one", "invalid TOML: Invalid value",
    "prewarm.model: is required", "control.mode: must not grant"))][:6]


@pytest.mark.parametrize(("text", "expected"), CLI_CASES, ids=[e[1].split(":")[0] for e in CLI_CASES])
def test_cinecutd_run_exits_78_with_the_precise_message(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text, "bad.toml")
    proc = subprocess.run([str(CINECUTD), "run", "--config", str(path)], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == EX_CONFIG == 78
    assert proc.stderr == f"cinecutd: {path}: {expected}\n"
    assert proc.stdout == ""


def test_cinecutd_run_reads_the_env_config(tmp_path: Path) -> None:
    path = write(tmp_path, "", "env.toml")
    env = {**os.environ, CONFIG_ENV: str(path)}
    proc = subprocess.run([str(CINECUTD), "run"], capture_output=True, text=True, timeout=30, env=env)
    assert proc.returncode == 78
    assert proc.stderr == f"cinecutd: {path}: library: at least one [[library]] table with a path is required\n"
    proc = subprocess.run([str(CINECUTD), "run", "--config", str(tmp_path / "missing.toml")],
                          capture_output=True, text=True, timeout=30)
    assert (proc.returncode, proc.stderr) == (78, f"cinecutd: {tmp_path / 'missing.toml'}: no such file\n")


toml_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
table_names = st.sampled_from(["daemon", "library", "control", "prewarm", "x"])
key_names = st.sampled_from([k.name for keys in TABLES.values() for k in keys] + ["bogus"])


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(table_names, st.dictionaries(key_names, toml_values, max_size=5)
                       | st.lists(st.dictionaries(key_names, toml_values, max_size=5), max_size=3), max_size=4))
def test_fuzzed_documents_give_a_config_or_a_config_error(doc: dict) -> None:
    try:
        cfg = parse_config(doc, Path("/fuzz.toml"))
    except ConfigError as e:
        assert str(e).startswith("/fuzz.toml: ") and e.why
    else:
        assert cfg.libraries


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_fuzzed_bytes_never_crash_the_loader(tmp_path_factory: pytest.TempPathFactory, blob: bytes) -> None:
    path = tmp_path_factory.getbasetemp() / "fuzz.toml"
    path.write_bytes(b'[[library]]\npath = "/srv/films"\n' + blob)
    try:
        load_config(path)
    except ConfigError as e:
        assert str(e).startswith(f"{path}: ")


# --------------------------------------------------------------------------------------------- window


def test_window_parse_and_examples() -> None:
    w = Window.parse("01:00-06:00")
    assert str(w) == "01:00-06:00" and not w.always
    day = datetime(2024, 3, 9)
    assert w.contains(day.replace(hour=1)) and w.contains(day.replace(hour=5, minute=59, second=59))
    assert not w.contains(day.replace(hour=6)) and not w.contains(day.replace(hour=0, minute=59))
    assert w.next_start(day.replace(hour=0, minute=30)) == day.replace(hour=1)
    assert w.next_start(day.replace(hour=1)) == day.replace(hour=1)
    assert w.next_start(day.replace(hour=7)) == day.replace(day=10, hour=1)
    assert w.current_end(day.replace(hour=3)) == day.replace(hour=6)
    assert w.current_end(day.replace(hour=7)) is None

    night = Window.parse(" 22:30-02:00 ")
    assert night.contains(day.replace(hour=23)) and night.contains(day.replace(hour=1, minute=59))
    assert not night.contains(day.replace(hour=2)) and not night.contains(day.replace(hour=12))
    assert night.next_start(day.replace(hour=23)) == day.replace(day=10, hour=22, minute=30)
    assert night.current_end(day.replace(hour=23)) == day.replace(day=10, hour=2)
    assert night.current_end(day.replace(hour=1)) == day.replace(hour=2)

    always = Window.parse("Always")
    assert always.always and str(always) == "always"
    assert always.contains(day) and always.next_start(day) is None and always.current_end(day) is None
    for bad in ("", "25:00-01:00", "01:00", "01:00-02:00-03:00", "01:60-02:00", "0100-0200", "10:00-10:00"):
        with pytest.raises(ValueError):
            Window.parse(bad)


minutes = st.integers(0, 24 * 60 - 1)
instants = st.datetimes(min_value=datetime(2000, 1, 2), max_value=datetime(2099, 12, 30))


def _reference_contains(start: int, end: int, when: datetime) -> bool:
    """Independent model: the window is [day + start, day + start + length) for every day."""
    length = timedelta(minutes=(end - start) % (24 * 60))
    for day in (when.date() - timedelta(days=1), when.date()):
        begin = datetime.combine(day, dtime()) + timedelta(minutes=start)
        if begin <= when < begin + length:
            return True
    return False


@settings(max_examples=400, deadline=None)
@given(minutes, minutes, instants)
def test_window_matches_a_reference_model(start: int, end: int, when: datetime) -> None:
    if start == end:
        return
    w = Window.parse(f"{start // 60:02d}:{start % 60:02d}-{end // 60:02d}:{end % 60:02d}")
    assert w.contains(when) == _reference_contains(start, end, when)

    nxt = w.next_start(when)
    assert nxt is not None and when <= nxt < when + timedelta(days=1)
    assert (nxt.hour, nxt.minute, nxt.second, nxt.microsecond) == (start // 60, start % 60, 0, 0)
    assert w.contains(nxt) and not w.contains(nxt - timedelta(seconds=30))

    end_at = w.current_end(when)
    if w.contains(when):
        assert end_at is not None and when < end_at <= when + timedelta(minutes=(end - start) % 1440)
        assert not w.contains(end_at) and w.contains(end_at - timedelta(microseconds=1))
    else:
        assert end_at is None


@given(instants)
def test_always_window(when: datetime) -> None:
    w = Window.parse("always")
    assert w.contains(when) and w.next_start(when) is None


def test_toml_of_the_example_is_plain_toml() -> None:
    # The example must stay loadable by any TOML reader (it is shipped as /etc/cinecut/cinecutd.toml).
    with open(REPO / "packaging" / "cinecutd.toml", "rb") as f:
        assert tomllib.load(f)["library"][0]["path"] == "/srv/media/films"


def test_roots_are_normalised_and_resolved_before_the_overlap_check(tmp_path: Path) -> None:
    """"//x", "/x/." and a symlink to /x name one root: as a root each is its realpath, and two spellings of
    one folder (or of a folder and its subfolder) are refused, like "/" behind any spelling."""
    films = tmp_path / "films"
    (films / "sub").mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(films)
    slash = tmp_path / "slash"
    slash.symlink_to("/")
    cfg = tmp_path / "c.toml"

    def load(*paths: str):
        cfg.write_text("".join(f'[[library]]\npath = "{p}"\n' for p in paths))
        return load_config(cfg)

    assert load("/" + str(films)).libraries[0].path == films
    assert load(str(link)).libraries[0].path == films
    assert load(f"{films}/./sub/").libraries[0].path == films / "sub"
    for paths, why in [((str(films), "/" + str(films)), "is already library[0].path"),
                       ((str(films), str(link)), "is already library[0].path"),
                       ((str(films), "/" + str(films / "sub")), "is inside library[0].path"),
                       ((str(link / "sub"), str(films)), "contains library[0].path"),
                       ((str(slash),), 'must not be "/"'),
                       (("//",), 'must not be "/"')]:
        with pytest.raises(ConfigError, match=re.escape(why)):
            load(*paths)
