"""Logging for cinecutd: one structlog pipeline, three sinks.

- journald (under systemd): every bound key becomes a structured field (`film` -> FILM=,
  `stages` -> STAGES=proxy,keyframes) and the event name becomes EVENT=, so that
  `journalctl -u cinecut-cache EVENT=invalidated FILM=...` answers "what happened to this film".
- JSON lines (not a TTY, not systemd): for log shippers and `jq`.
- console (a TTY): for people.

Logging must never take the daemon down: values are turned into plain, printable data first
(film names that are not UTF-8 arrive as surrogate-escaped str and are rendered as \\xNN,
objects whose __str__ raises are rendered as a placeholder), and every sink swallows its own
failures (a full pipe, a journald that went away) after trying a plainer fallback.
"""

from __future__ import annotations

import datetime as _dt
import enum
import json
import logging
import math
import os
import re
import sys
from collections.abc import Mapping, MutableMapping
from pathlib import PurePath
from typing import Any, TextIO

import structlog

__all__ = [
    "FORMATS",
    "configure_logging",
    "journal_fields",
    "render_json",
    "resolve_format",
    "safe_text",
    "sanitize",
    "under_systemd",
]

FORMATS = ("auto", "json", "console", "journal")
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
# syslog priorities (journald PRIORITY=) for structlog's level names
PRIORITIES = {
    "critical": 2,
    "fatal": 2,
    "exception": 3,
    "error": 3,
    "warning": 4,
    "warn": 4,
    "notice": 5,
    "info": 6,
    "debug": 7,
}
SYSLOG_IDENTIFIER = "cinecutd"
# libsystemd drops entries silently when this socket is missing (no journald): then log JSON.
JOURNAL_SOCKET = "/run/systemd/journal/socket"
# Fields this module sets itself, and fields journald/journalctl give a meaning to: a bound key
# that maps onto one of them is renamed CINECUT_<NAME> instead of overriding it.
RESERVED_FIELDS = frozenset({
    "MESSAGE", "MESSAGE_ID", "PRIORITY", "EVENT", "TRACEBACK", "CODE_FILE", "CODE_LINE",
    "CODE_FUNC", "SYSLOG_IDENTIFIER", "SYSLOG_FACILITY", "SYSLOG_PID", "SYSLOG_TIMESTAMP",
    "SYSLOG_RAW", "TID", "ERRNO", "DOCUMENTATION", "UNIT", "USER_UNIT", "OBJECT_PID",
    "OBJECT_SYSTEMD_UNIT", "COREDUMP_UNIT", "COREDUMP_USER_UNIT",
})
_FIELD_BAD = re.compile(r"[^A-Z0-9_]")
_MAX_DEPTH = 4
_MAX_FIELD = 64 * 1024  # one log field; a runaway value must not flood the journal


# --- values -> plain printable data ---------------------------------------------------------

def safe_text(value: str) -> str:
    """str that always encodes to UTF-8: surrogate-escaped bytes become \\xNN."""
    try:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeError:  # lone surrogates that surrogateescape cannot map back to bytes
        return value.encode("utf-8", "backslashreplace").decode("utf-8")


def _fallback_str(value: object) -> str:
    for conv in (str, repr):
        try:
            return safe_text(conv(value))
        except Exception:
            continue
    return f"<unprintable {type(value).__name__}>"


def sanitize(value: Any, _depth: int = 0) -> Any:
    """JSON-able, UTF-8-safe copy of a log value (str, int, float, bool, None, list, dict)."""
    try:
        if value is None or isinstance(value, bool | int):
            return int(value) if isinstance(value, enum.IntEnum) else value
        if isinstance(value, float):
            return value if math.isfinite(value) else str(value)
        if isinstance(value, str):
            return safe_text(str(value))
        if isinstance(value, PurePath):
            return safe_text(str(value))
        if isinstance(value, bytes | bytearray | memoryview):
            return bytes(value).decode("utf-8", "backslashreplace")
        if isinstance(value, enum.Enum):
            return sanitize(value.value, _depth + 1) if _depth < _MAX_DEPTH else _fallback_str(value)
        if isinstance(value, _dt.datetime | _dt.date | _dt.time):
            return value.isoformat()
        if _depth >= _MAX_DEPTH:
            return _fallback_str(value)
        if isinstance(value, Mapping):
            return {_fallback_str(k) if not isinstance(k, str) else safe_text(k): sanitize(v, _depth + 1)
                    for k, v in value.items()}
        if isinstance(value, set | frozenset):
            return sorted((sanitize(v, _depth + 1) for v in value), key=_fallback_str)
        if isinstance(value, list | tuple):
            return [sanitize(v, _depth + 1) for v in value]
        if isinstance(value, BaseException):
            return _fallback_str(value)
    except Exception:
        pass
    return _fallback_str(value)


def _sanitize_processor(logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> Any:
    return {safe_text(str(k)): sanitize(v) for k, v in event_dict.items()}


# --- journald fields ------------------------------------------------------------------------

def field_name(key: str) -> str:
    """A journald field name for a bound key: FILM, LATENCY_MS, never a reserved or trusted one."""
    name = _FIELD_BAD.sub("_", safe_text(key).upper()).lstrip("_")
    if not name or name[0].isdigit():
        name = "F_" + name
    if name in RESERVED_FIELDS:
        name = "CINECUT_" + name
    return name[:64]


def _field_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list):
        return ",".join(_field_value(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)
    return str(value)


def _message_value(value: Any) -> str:
    if value is None:
        return "null"
    text = _field_value(value)
    if not isinstance(value, str | list) or (text and not re.search(r'[\s"=\\]', text)):
        return text
    return json.dumps(text, ensure_ascii=False)


_NOT_FIELDS = {"event", "level", "timestamp", "exception", "pathname", "lineno", "func_name"}


def journal_fields(event_dict: Mapping[str, Any]) -> dict[str, str]:
    """The journald entry for one structlog event: MESSAGE, PRIORITY, EVENT and a field per key.

    MESSAGE repeats the keys as key=value so that plain `journalctl -u` output reads well;
    the fields are what `journalctl FIELD=value` and `-o json` see.
    """
    ev = {safe_text(str(k)): sanitize(v) for k, v in event_dict.items()}
    event = _fallback_str(ev.get("event", ""))
    level = str(ev.get("level", "info")).lower()
    fields: dict[str, str] = {}
    pairs: list[str] = []
    for key, value in ev.items():
        if key in _NOT_FIELDS:
            continue
        pairs.append(f"{key}={_message_value(value)}")
        if value is None:
            continue
        fields[field_name(key)] = _field_value(value)[:_MAX_FIELD]
    message = " ".join([event, *pairs]) if pairs else event
    out = {
        "MESSAGE": message[:_MAX_FIELD],
        "PRIORITY": str(PRIORITIES.get(level, 6)),
        "EVENT": event,
        "SYSLOG_IDENTIFIER": SYSLOG_IDENTIFIER,
    }
    if ev.get("exception"):
        out["TRACEBACK"] = str(ev["exception"])[:_MAX_FIELD]
        out["MESSAGE"] = (message + "\n" + out["TRACEBACK"])[:_MAX_FIELD]
    if ev.get("pathname"):
        out["CODE_FILE"] = str(ev["pathname"])
    if ev.get("lineno") is not None:
        out["CODE_LINE"] = str(ev["lineno"])
    if ev.get("func_name"):
        out["CODE_FUNC"] = str(ev["func_name"])
    out.update(fields)
    return out


def _journal_renderer(logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> Any:
    return {"fields": journal_fields(event_dict)}


# --- JSON and console -----------------------------------------------------------------------

def render_json(event_dict: Mapping[str, Any]) -> str:
    """One JSON object per line; timestamp, level and event first."""
    ev = {safe_text(str(k)): sanitize(v) for k, v in event_dict.items()}
    head = {k: ev.pop(k) for k in ("timestamp", "level", "event") if k in ev}
    return json.dumps({**head, **ev}, ensure_ascii=False, allow_nan=False, default=_fallback_str)


def _json_renderer(logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> str:
    return render_json(event_dict)


def _guarded(renderer: Any) -> Any:
    """A renderer that falls back to a minimal JSON line instead of raising."""
    def render(logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> Any:
        try:
            return renderer(logger, method, event_dict)
        except Exception as exc:
            return json.dumps({"level": "error", "event": "log_render_failed",
                               "original_event": _fallback_str(event_dict.get("event")),
                               "error": _fallback_str(exc)})
    return render


# --- sinks ----------------------------------------------------------------------------------

class _StreamSink:
    """Writes rendered lines to a stream (stderr by default, looked up at write time)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream

    def msg(self, message: str) -> None:
        stream = self._stream if self._stream is not None else sys.stderr
        try:
            stream.write(message + "\n")
            stream.flush()
        except Exception:
            pass

    debug = info = warning = warn = error = critical = fatal = exception = log = msg


class _JournalSink:
    """Sends field dicts to journald; falls back to a JSON line on the stream if that fails."""

    def __init__(self, sendv: Any, stream: TextIO | None = None) -> None:
        self._sendv = sendv
        self._fallback = _StreamSink(stream)

    def msg(self, fields: Mapping[str, str] | str) -> None:
        if isinstance(fields, str):  # the guarded renderer's fallback line
            self._fallback.msg(fields)
            return
        try:
            self._sendv(*(f"{k}={v}" for k, v in fields.items()))
        except Exception:
            try:
                self._fallback.msg(json.dumps({k.lower(): v for k, v in fields.items()}, ensure_ascii=False))
            except Exception:
                pass

    debug = info = warning = warn = error = critical = fatal = exception = log = msg


class _StdlibBridge(logging.Handler):
    """Routes stdlib logging (watchdog, llama-cpp-python, ...) into the same structlog pipeline."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            try:
                message = record.getMessage()
            except Exception:
                message = _fallback_str(record.msg)
            kw: dict[str, Any] = {"logger": record.name}
            if record.exc_info:
                kw["exc_info"] = record.exc_info
            structlog.get_logger().log(record.levelno, message, **kw)
        except Exception:
            pass


# --- format selection -----------------------------------------------------------------------

def under_systemd(environ: Mapping[str, str] | None = None, stream: TextIO | None = None) -> bool:
    """True when started by systemd: stderr is the journal stream, or INVOCATION_ID is set."""
    env = os.environ if environ is None else environ
    if env.get("INVOCATION_ID"):
        return True
    js = env.get("JOURNAL_STREAM", "")
    if not js:
        return False
    try:
        dev, ino = (int(x) for x in js.split(":", 1))
        st = os.fstat((stream if stream is not None else sys.stderr).fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def _journal_sendv() -> Any:
    """systemd.journal.sendv when journald can be reached, else None."""
    if not os.path.exists(JOURNAL_SOCKET):
        return None
    try:
        from systemd import journal
    except Exception:
        return None
    return journal.sendv


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except Exception:
        return False


def resolve_format(fmt: str = "auto", environ: Mapping[str, str] | None = None,
                   stream: TextIO | None = None) -> str:
    """auto -> journal under systemd (systemd-python importable, journald listening), console on a
    TTY, else json."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if fmt != "auto":
        return fmt
    stream = stream if stream is not None else sys.stderr
    if under_systemd(environ, stream) and _journal_sendv() is not None:
        return "journal"
    return "console" if _isatty(stream) else "json"


def configure_logging(fmt: str = "auto", level: str = "info", *, stream: TextIO | None = None) -> None:
    """Configure structlog (and route stdlib logging through it). Safe to call again on reload."""
    if level.lower() not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, not {level!r}")
    min_level = LEVELS[level.lower()]
    chosen = resolve_format(fmt, stream=stream)
    sendv = _journal_sendv() if chosen == "journal" else None
    if chosen == "journal" and sendv is None:
        chosen = "json"  # no systemd-python or no journald: still log, as JSON lines on stderr

    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
    ]
    if chosen != "journal":  # journald stamps entries itself
        processors.append(structlog.processors.TimeStamper(fmt="iso", utc=True))
    processors += [
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
        _sanitize_processor,
    ]
    sink: Any
    if chosen == "journal":
        CP = structlog.processors.CallsiteParameter
        processors.append(structlog.processors.CallsiteParameterAdder(
            [CP.PATHNAME, CP.LINENO, CP.FUNC_NAME], additional_ignores=["cinecutd.logs", "logging"]))
        processors.append(_guarded(_journal_renderer))
        sink = _JournalSink(sendv, stream)
    elif chosen == "console":
        out = stream if stream is not None else sys.stderr
        processors.append(_guarded(structlog.dev.ConsoleRenderer(
            colors=_isatty(out), exception_formatter=structlog.dev.plain_traceback)))
        sink = _StreamSink(stream)
    else:
        processors.append(_guarded(_json_renderer))
        sink = _StreamSink(stream)

    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(min_level),
        logger_factory=lambda *args: sink,
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _StdlibBridge):
            root.removeHandler(handler)
    root.addHandler(_StdlibBridge())
    root.setLevel(min_level)
