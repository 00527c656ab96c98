"""cinecutd.logs: journald field mapping, JSON and console rendering, format selection, robustness.

journald itself is not running outside the sd-sandbox, so the journal path is tested through
journal_fields() (what is sent) here and end to end in test_systemd_e2e.py (`journalctl -o json`).
"""

from __future__ import annotations

import io
import json
import logging
import os
import pty
import socket
from pathlib import Path

import pytest
import structlog

from cinecutd import logs


@pytest.fixture(autouse=True)
def _reset_logging():
    yield
    structlog.reset_defaults()
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, logs._StdlibBridge):
            root.removeHandler(h)


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("boom")

    def __repr__(self) -> str:
        raise RuntimeError("boom")


def _lines(buf: io.StringIO) -> list[str]:
    return [line for line in buf.getvalue().splitlines() if line]


# --- journald fields --------------------------------------------------------------------------

def test_invalidated_event_maps_every_key_to_an_upper_case_field():
    f = logs.journal_fields({
        "event": "invalidated", "level": "info", "film": "/srv/films/Heat (1995)/Heat (1995).mkv",
        "reason": "video-changed", "stages": ["proxy", "keyframes", "inference"], "files_removed": 3,
        "bytes_reclaimed": 1_234_567, "latency_ms": 1.2,
    })
    assert f["EVENT"] == "invalidated"
    assert f["FILM"] == "/srv/films/Heat (1995)/Heat (1995).mkv"
    assert f["REASON"] == "video-changed"
    assert f["STAGES"] == "proxy,keyframes,inference"
    assert f["FILES_REMOVED"] == "3"
    assert f["BYTES_RECLAIMED"] == "1234567"
    assert f["LATENCY_MS"] == "1.2"
    assert f["PRIORITY"] == "6"
    assert f["SYSLOG_IDENTIFIER"] == "cinecutd"
    # the human line that plain `journalctl -u cinecut-cache` shows
    assert f["MESSAGE"] == ('invalidated film="/srv/films/Heat (1995)/Heat (1995).mkv" reason=video-changed '
                            "stages=proxy,keyframes,inference files_removed=3 bytes_reclaimed=1234567 "
                            "latency_ms=1.2")
    assert "LEVEL" not in f and "TIMESTAMP" not in f


@pytest.mark.parametrize(("level", "priority"), [
    ("debug", "7"), ("info", "6"), ("warning", "4"), ("error", "3"), ("critical", "2"), ("weird", "6"),
])
def test_levels_become_syslog_priorities(level, priority):
    assert logs.journal_fields({"event": "e", "level": level})["PRIORITY"] == priority


def test_field_names_are_valid_and_never_override_reserved_fields():
    f = logs.journal_fields({"event": "e", "message": "m", "priority": 0, "bad-key.x": 1, "2pass": True,
                             "_SYSTEMD_UNIT": "evil.service", "ünï": "x", "none_value": None})
    assert f["MESSAGE"].startswith("e ")
    assert f["PRIORITY"] == "6"
    assert f["CINECUT_MESSAGE"] == "m"
    assert f["CINECUT_PRIORITY"] == "0"
    assert f["BAD_KEY_X"] == "1"
    assert f["F_2PASS"] == "true"
    assert f["SYSTEMD_UNIT"] == "evil.service"  # never the trusted _SYSTEMD_UNIT
    assert "NONE_VALUE" not in f and "none_value=null" in f["MESSAGE"]
    for name in f:
        assert name[0] != "_" and not name[0].isdigit() and len(name) <= 64
        assert all(c.isupper() or c.isdigit() or c == "_" for c in name), name


def test_non_utf8_film_names_render_as_escapes_not_crashes():
    film = os.fsdecode(b"/srv/films/Caf\xe9 Society (2016)/Caf\xe9.mkv")  # latin-1 bytes on disk
    f = logs.journal_fields({"event": "invalidated", "film": film, "reason": Unprintable()})
    assert f["FILM"] == "/srv/films/Caf\\xe9 Society (2016)/Caf\\xe9.mkv"
    assert f["REASON"] == "<unprintable Unprintable>"
    for value in f.values():
        value.encode("utf-8")  # strict: sendable to journald


def test_exception_goes_to_traceback_and_message():
    try:
        raise ValueError("disk on fire")
    except ValueError as exc:
        ev = structlog.processors.format_exc_info(None, "error", {"event": "scan_failed", "exc_info": exc})
    f = logs.journal_fields({**ev, "level": "error"})
    assert "ValueError: disk on fire" in f["TRACEBACK"]
    assert f["MESSAGE"].startswith("scan_failed\n") and "disk on fire" in f["MESSAGE"]
    assert f["PRIORITY"] == "3"


def test_nested_values_and_special_floats_are_sendable():
    f = logs.journal_fields({"event": "e", "roots": {"b": 2, "a": [1, 2]}, "ratio": float("nan"),
                             "path": Path("/srv/x y"), "raw": b"\xff\x00ok"})
    assert json.loads(f["ROOTS"]) == {"a": [1, 2], "b": 2}
    assert f["RATIO"] == "nan"
    assert f["PATH"] == "/srv/x y"
    assert f["RAW"] == "\\xff\x00ok"


def test_journal_sink_falls_back_to_json_when_journald_refuses():
    def sendv(*args: str) -> None:
        raise FileNotFoundError(2, "No such file or directory: /run/systemd/journal/socket")

    buf = io.StringIO()
    logs._JournalSink(sendv, buf).msg({"MESSAGE": "invalidated film=x", "FILM": "x", "EVENT": "invalidated"})
    assert json.loads(buf.getvalue()) == {"message": "invalidated film=x", "film": "x", "event": "invalidated"}


def test_journal_sink_sends_field_assignments():
    sent: list[tuple[str, ...]] = []
    logs._JournalSink(lambda *a: sent.append(a)).msg({"MESSAGE": "m\nsecond line", "FILM": "f"})
    assert sent == [("MESSAGE=m\nsecond line", "FILM=f")]


# --- the real pipelines -----------------------------------------------------------------------

def test_json_pipeline_writes_one_parseable_line_per_event():
    buf = io.StringIO()
    logs.configure_logging("json", "info", stream=buf)
    log = structlog.get_logger()
    log.info("invalidated", film="/srv/f/A.mkv", stages=["proxy", "keyframes"], latency_ms=1.25)
    log.debug("hidden")  # below the level
    log.warning("odd", value=Unprintable(), film=os.fsdecode(b"/srv/\xff.mkv"), ratio=float("inf"))
    lines = _lines(buf)
    assert len(lines) == 2
    first, second = (json.loads(x) for x in lines)
    assert list(first)[:3] == ["timestamp", "level", "event"]
    assert first["event"] == "invalidated" and first["level"] == "info"
    assert first["stages"] == ["proxy", "keyframes"] and first["latency_ms"] == 1.25
    assert first["timestamp"].endswith("Z")
    assert second["value"] == "<unprintable Unprintable>"
    assert second["film"] == "/srv/\\xff.mkv" and second["ratio"] == "inf"


def test_json_pipeline_renders_exceptions():
    buf = io.StringIO()
    logs.configure_logging("json", "info", stream=buf)
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError:
        structlog.get_logger().exception("rescan_failed", root="/srv/films")
    entry = json.loads(_lines(buf)[0])
    assert entry["level"] == "error" and "ZeroDivisionError" in entry["exception"]


def test_console_pipeline_is_readable_and_uncoloured_off_a_tty():
    buf = io.StringIO()
    logs.configure_logging("console", "debug", stream=buf)
    structlog.get_logger().debug("invalidated", film="/srv/f/Heat.mkv", reason="video-changed")
    out = buf.getvalue()
    assert "invalidated" in out and "film=/srv/f/Heat.mkv" in out and "reason=video-changed" in out
    assert "\x1b[" not in out


def test_stdlib_logging_goes_through_the_same_pipeline():
    buf = io.StringIO()
    logs.configure_logging("json", "info", stream=buf)
    logging.getLogger("watchdog.observers").warning("inotify watch limit reached: %d", 8192)
    logging.getLogger("watchdog.observers").debug("not shown")
    (entry,) = (json.loads(x) for x in _lines(buf))
    assert entry["event"] == "inotify watch limit reached: 8192"
    assert entry["logger"] == "watchdog.observers" and entry["level"] == "warning"


def test_reconfiguring_replaces_the_bridge_instead_of_doubling_output():
    buf = io.StringIO()
    logs.configure_logging("json", "info", stream=buf)
    logs.configure_logging("json", "info", stream=buf)
    logging.getLogger("x").error("once")
    assert len(_lines(buf)) == 1


def test_a_broken_stream_never_raises():
    class Broken(io.StringIO):
        def write(self, s: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    logs.configure_logging("json", "info", stream=Broken())
    structlog.get_logger().error("still_alive", film=Unprintable())


@pytest.mark.parametrize("fmt", ["xml", ""])
def test_bad_format_and_level_are_refused_clearly(fmt):
    with pytest.raises(ValueError, match="log format must be one of"):
        logs.configure_logging(fmt)
    with pytest.raises(ValueError, match="log level must be one of"):
        logs.configure_logging("json", "loud")


# --- format selection -------------------------------------------------------------------------

@pytest.fixture
def journald_socket(tmp_path, monkeypatch):
    """A listening datagram socket standing in for /run/systemd/journal/socket's existence."""
    path = tmp_path / "journal.socket"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    monkeypatch.setattr(logs, "JOURNAL_SOCKET", str(path))
    yield path
    sock.close()


def test_auto_is_journal_under_systemd(tmp_path, journald_socket):
    stream = open(tmp_path / "stderr", "w")  # noqa: SIM115
    try:
        st = os.fstat(stream.fileno())
        assert logs.resolve_format("auto", {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, stream) == "journal"
        assert logs.resolve_format("auto", {"INVOCATION_ID": "0123abcd"}, stream) == "journal"
        # a JOURNAL_STREAM inherited by a process whose stderr is elsewhere does not count
        assert logs.resolve_format("auto", {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}, stream) == "json"
        assert logs.resolve_format("auto", {"JOURNAL_STREAM": "garbage"}, stream) == "json"
        assert logs.resolve_format("auto", {}, stream) == "json"
        assert logs.resolve_format("console", {"INVOCATION_ID": "x"}, stream) == "console"
    finally:
        stream.close()


def test_without_journald_the_journal_format_degrades_to_json_lines(tmp_path, monkeypatch):
    # libsystemd silently drops entries when journald is absent: logging must not vanish
    monkeypatch.setattr(logs, "JOURNAL_SOCKET", str(tmp_path / "no-such-socket"))
    assert logs.resolve_format("auto", {"INVOCATION_ID": "0123abcd"}, io.StringIO()) == "json"
    buf = io.StringIO()
    logs.configure_logging("journal", "info", stream=buf)
    structlog.get_logger().info("invalidated", film="/srv/f/A.mkv")
    assert json.loads(buf.getvalue())["film"] == "/srv/f/A.mkv"


def test_auto_is_console_on_a_terminal():
    master, slave = pty.openpty()
    try:
        with os.fdopen(slave, "w", closefd=False) as tty:
            assert logs.resolve_format("auto", {}, tty) == "console"
    finally:
        os.close(master)
        os.close(slave)
