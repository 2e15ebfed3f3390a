"""Structured logging for crop-clusterd (structlog over stdlib ``logging``).

Conventions:

- The event is a stable snake_case identifier naming what happened
  (``batch_embedded``, ``file_skipped``, ``cluster_merged``), never a sentence
  with values pasted in. Values go in keyword fields
  (``log.info("file_skipped", path=str(p), reason="truncated")``), so json and
  journald consumers can filter on the event name and fields without parsing
  text. Renaming an event is a breaking change for whoever alerts on it.
- Field names are snake_case too; under journald they become upper-case
  journal fields (``reason`` -> ``REASON``).

Outputs (`configure_logging`): ``console`` (readable lines with timestamps),
``json`` (one JSON object per line: ``event``, ``level``, ``timestamp``,
``logger`` and the fields) and ``journald`` (native journal entries with
``MESSAGE``, ``PRIORITY``, ``EVENT`` and one field per key). ``auto`` picks
journald when systemd started the process and python-systemd is installed,
else console. Records from stdlib loggers (e.g. transformers' warnings) and
Python warnings go through the same output; loggers outside ``crop_clusterd``
are held at warning and above whatever the configured level.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import re
import sys
from collections.abc import Callable, Mapping, MutableMapping
from pathlib import Path
from typing import Any, Literal, TextIO, cast

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

__all__ = [
    "APP_LOGGER",
    "JournaldRenderer",
    "configure_logging",
    "get_logger",
    "journal_sender",
    "resolve_format",
]

LogFormat = Literal["auto", "console", "json", "journald"]
JournalSender = Callable[..., object]

_LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

# syslog priorities as journald expects them in PRIORITY.
_PRIORITY: dict[str, int] = {
    "critical": 2,
    "exception": 3,
    "error": 3,
    "warning": 4,
    "warn": 4,
    "notice": 5,
    "info": 6,
    "debug": 7,
}

APP_LOGGER = "crop_clusterd"
"""Parent of the package's loggers; only these log below warning."""

_handler: logging.Handler | None = None
_warned_no_journal = False


def journal_sender() -> JournalSender | None:
    """Return ``systemd.journal.send``, or ``None`` when python-systemd is missing."""
    try:
        from systemd import journal  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return None
    return cast(JournalSender, journal.send)


def resolve_format(
    fmt: LogFormat, environ: Mapping[str, str], journal_available: bool
) -> Literal["console", "json", "journald"]:
    """Turn the configured format into the one to use.

    ``auto`` means journald when systemd started the process (it sets
    ``JOURNAL_STREAM`` for services whose output goes to the journal, and
    ``INVOCATION_ID`` for every unit) and the journal can be reached, else
    console. An explicit ``journald`` without the library degrades to console.
    """
    if fmt == "auto":
        under_systemd = bool(environ.get("JOURNAL_STREAM") or environ.get("INVOCATION_ID"))
        return "journald" if under_systemd and journal_available else "console"
    if fmt == "journald" and not journal_available:
        return "console"
    if fmt not in ("console", "json", "journald"):
        raise ValueError(f"unknown log format {fmt!r}; choose auto, console, json or journald")
    return fmt


_FIELD_BAD = re.compile(r"[^A-Z0-9_]")
# Fields the renderer sets itself; a user field of that name is prefixed instead.
_RESERVED = frozenset(
    {
        "MESSAGE",
        "PRIORITY",
        "EVENT",
        "LOGGER",
        "SYSLOG_IDENTIFIER",
        "CODE_FILE",
        "CODE_LINE",
        "CODE_FUNC",
    }
)
# Event-dict key carrying the log call's (file, line, function) to the renderer.
_CODE_KEY = "_journal_code"


def _journal_field(key: str) -> str:
    """Map an event-dict key to a valid journal field name.

    Journal fields are upper-case ASCII letters, digits and underscores, must
    not start with an underscore (reserved for trusted fields) or a digit, and
    are at most 64 characters.
    """
    name = _FIELD_BAD.sub("_", key.upper()).lstrip("_")
    if not name or name[0].isdigit():
        name = "F_" + name
    if name in _RESERVED:
        name = "F_" + name
    return name[:64]


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, Path):
        return str(value)
    return repr(value) if not isinstance(value, int | float | bool) else str(value)


class JournaldRenderer:
    """Final processor that sends each event to the systemd journal.

    ``sender`` is called as ``sender(MESSAGE=..., PRIORITY=..., EVENT=...,
    LOGGER=..., SYSLOG_IDENTIFIER=..., <FIELD>=...)``, the signature of
    ``systemd.journal.send``; tests inject a fake. Returns the message text,
    which the journald handler discards.
    """

    def __init__(self, sender: JournalSender, identifier: str = "crop-clusterd") -> None:
        self._send = sender
        self._identifier = identifier

    def __call__(self, logger: WrappedLogger, method_name: str, event_dict: EventDict) -> str:
        """Send ``event_dict`` as one journal entry; return its MESSAGE."""
        ed = dict(event_dict)
        event = _text(ed.pop("event", ""))
        level = str(ed.pop("level", method_name)).lower()
        logger_name = ed.pop("logger", None)
        ed.pop("timestamp", None)  # the journal stamps entries itself
        exception = ed.pop("exception", None)
        code = ed.pop(_CODE_KEY, None)
        parts = [event, *(f"{k}={_text(v)}" for k, v in ed.items())]
        message = " ".join(p for p in parts if p)
        if exception:
            message += "\n" + _text(exception)
        fields: dict[str, str | int] = {
            "MESSAGE": message,
            "PRIORITY": str(_PRIORITY.get(level, 6)),
            "EVENT": event,
            "SYSLOG_IDENTIFIER": self._identifier,
        }
        if logger_name is not None:
            fields["LOGGER"] = _text(logger_name)
        if exception:
            fields["EXCEPTION"] = _text(exception)
        if code is not None:
            # Without these, python-systemd records this method as every entry's origin.
            # Its send() wants CODE_LINE as an int.
            fields["CODE_FILE"], fields["CODE_LINE"], fields["CODE_FUNC"] = code
        for key, value in ed.items():
            fields.setdefault(_journal_field(key), _text(value))
        self._send(**fields)
        return message


class _JournaldHandler(logging.Handler):
    """Handler whose formatter (ending in `JournaldRenderer`) does the sending."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.format(record)
        except Exception:
            self.handleError(record)


def _add_code_location(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Pass the log call's location from the stdlib record on to `JournaldRenderer`.

    Must run before ``remove_processors_meta``, which drops ``_record``.
    """
    record = event_dict.get("_record")
    if isinstance(record, logging.LogRecord):
        event_dict[_CODE_KEY] = (record.pathname, record.lineno, record.funcName)
    return event_dict


def _json_default(value: Any) -> Any:
    """Make common non-JSON values readable instead of ``repr`` noise."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, _dt.datetime | _dt.date):
        return value.isoformat()
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        try:
            return value.item()
        except (TypeError, ValueError):
            pass
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return repr(value)


def _drop_record_leftovers(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    # ExtraAdder copies every non-standard record attribute. "message" and
    # "asctime" appear when another handler formatted the record first (logging
    # forbids them as real extras); uvicorn-style libraries add "color_message".
    # All duplicate the event text.
    if event_dict.get("_from_structlog") is False:
        for key in ("message", "asctime", "color_message"):
            event_dict.pop(key, None)
    return event_dict


def _ensure_str_event(_: WrappedLogger, __: str, event_dict: MutableMapping[str, Any]) -> Any:
    # Foreign records (stdlib, Python warnings) carry free text, often with a
    # trailing newline; structlog events are already identifiers.
    event = event_dict.get("event")
    if event is not None and not isinstance(event, str):
        event_dict["event"] = str(event)
    elif isinstance(event, str) and event_dict.get("_from_structlog") is False:
        event_dict["event"] = event.rstrip()
    return event_dict


def _event_first(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Order keys event, level, timestamp, logger, then fields, for readable json."""
    head = {
        k: event_dict.pop(k) for k in ("event", "level", "timestamp", "logger") if k in event_dict
    }
    return {**head, **event_dict}


def configure_logging(
    fmt: LogFormat = "auto",
    level: str = "info",
    stream: TextIO | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    sender: JournalSender | None = None,
) -> Literal["console", "json", "journald"]:
    """Route structlog and stdlib logging to one output; return the format chosen.

    ``stream`` (default ``sys.stderr``) receives console and json lines.
    ``environ`` (default ``os.environ``) decides ``auto``; ``sender`` replaces
    ``systemd.journal.send`` (tests). Calling it again replaces the previous
    setup. Raises `ValueError` for an unknown level or format.
    """
    global _warned_no_journal
    if level.lower() not in _LEVELS:
        raise ValueError(f"unknown log level {level!r}; choose debug, info, warning or error")
    stream = sys.stderr if stream is None else stream
    environ = os.environ if environ is None else environ
    if sender is None and fmt in ("auto", "journald"):
        sender = journal_sender()
    chosen = resolve_format(fmt, environ, sender is not None)
    wanted_journal = fmt == "journald" or (
        fmt == "auto" and bool(environ.get("JOURNAL_STREAM") or environ.get("INVOCATION_ID"))
    )
    fell_back = wanted_journal and chosen != "journald"

    shared = _shared_processors(chosen)
    handler = _make_handler(chosen, stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared, processors=_final_processors(chosen, stream, sender)
        )
    )
    _install_handler(handler, _LEVELS[level.lower()])
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached, so loggers created at import time follow a later reconfiguration.
        cache_logger_on_first_use=False,
    )

    if fell_back and not _warned_no_journal:
        _warned_no_journal = True
        get_logger(__name__).warning(
            "journald_unavailable",
            reason="python-systemd (systemd.journal) is not importable",
            fallback="console",
        )
    return chosen


def _shared_processors(chosen: Literal["console", "json", "journald"]) -> list[Processor]:
    """Processors that both structlog and foreign (stdlib) records go through."""
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.stdlib.ExtraAdder(),
        _drop_record_leftovers,
        _ensure_str_event,
    ]
    # json is for machines: ISO 8601 in UTC. console is for people on this host:
    # local time. The journal stamps entries itself.
    if chosen == "json":
        shared.append(structlog.processors.TimeStamper(fmt="iso", utc=True))
    elif chosen == "console":
        shared.append(structlog.processors.TimeStamper(fmt="%Y-%m-%d %H:%M:%S", utc=False))
    shared.append(structlog.processors.StackInfoRenderer())
    return shared


def _final_processors(
    chosen: Literal["console", "json", "journald"],
    stream: TextIO,
    sender: JournalSender | None,
) -> list[Processor]:
    """The formatter's processors for ``chosen``, ending in its renderer.

    Raises ``RuntimeError`` for journald without a ``sender``.
    """
    final: list[Processor] = [structlog.stdlib.ProcessorFormatter.remove_processors_meta]
    if chosen == "json":
        final += [
            structlog.processors.format_exc_info,
            _event_first,
            structlog.processors.JSONRenderer(default=_json_default),
        ]
    elif chosen == "journald":
        if sender is None:  # resolve_format only picks journald with a sender
            raise RuntimeError("journald chosen without a journal sender")
        final.insert(0, _add_code_location)
        final += [structlog.processors.format_exc_info, JournaldRenderer(sender)]
    else:
        isatty = getattr(stream, "isatty", None)
        colors = bool(isatty()) if callable(isatty) else False
        final.append(structlog.dev.ConsoleRenderer(colors=colors))
    return final


def _make_handler(
    chosen: Literal["console", "json", "journald"], stream: TextIO
) -> logging.Handler:
    """The stdlib handler for ``chosen``: the journal, or a stream handler on ``stream``."""
    if chosen == "journald":
        return _JournaldHandler()
    return logging.StreamHandler(stream)


def _install_handler(handler: logging.Handler, wanted: int) -> None:
    """Replace the previous handler on the root logger and set the levels."""
    global _handler
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
        _handler.close()
    root.addHandler(handler)
    # Our own loggers log at the configured level; other libraries only from
    # warning up, or a debug run drowns in e.g. PIL's per-chunk PNG messages.
    root.setLevel(max(wanted, logging.WARNING))
    logging.getLogger(APP_LOGGER).setLevel(wanted)
    _handler = handler
    logging.captureWarnings(True)
    adopt_library_loggers()


# Libraries that install their own stderr handler and stop propagation on import.
_SELF_HANDLING = ("transformers",)


def adopt_library_loggers() -> None:
    """Send libraries that log on their own (transformers) through our output.

    Call again after importing such a library lazily: it resets its logger then.
    """
    for name in _SELF_HANDLING:
        if name not in sys.modules:
            continue
        library = logging.getLogger(name)
        for handler in list(library.handlers):
            library.removeHandler(handler)
        library.propagate = True
        library.setLevel(logging.NOTSET)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """Return a structlog logger named ``name``.

    Use the module's ``__name__`` (``crop_clusterd.<module>``): loggers outside
    `APP_LOGGER` only pass warnings and errors.
    """
    return structlog.stdlib.get_logger(name)
