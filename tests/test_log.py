"""Tests for crop_clusterd.log: console, json and journald outputs, format selection."""

from __future__ import annotations

import io
import json
import logging
import re
import warnings
from pathlib import Path
from typing import Any

import pytest

import crop_clusterd.log as log_mod
from crop_clusterd.log import JournaldRenderer, configure_logging, get_logger, resolve_format


class FakeJournal:
    """Stands in for ``systemd.journal.send``: records each entry's fields."""

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []

    def __call__(self, **fields: Any) -> None:
        self.entries.append(fields)


class TtyStream(io.StringIO):
    def isatty(self) -> bool:
        return True


# main() and configure_logging() change global logging state; undo it after each test.
pytestmark = pytest.mark.usefixtures("restore_logging")


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


# --- json ---------------------------------------------------------------------


def test_json_lines_parse_and_carry_fields() -> None:
    out = io.StringIO()
    assert configure_logging("json", "info", out, environ={}) == "json"
    get_logger("crop_clusterd.embed").info(
        "batch_embedded", count=32, seconds=0.5, path=Path("/x/a.png")
    )
    (entry,) = json_lines(out)
    assert entry["event"] == "batch_embedded"
    assert entry["level"] == "info"
    assert entry["logger"] == "crop_clusterd.embed"
    assert entry["count"] == 32
    assert entry["seconds"] == 0.5
    assert entry["path"] == "/x/a.png"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z", entry["timestamp"])


def test_level_filters_structlog_and_stdlib() -> None:
    out = io.StringIO()
    configure_logging("json", "warning", out, environ={})
    log = get_logger("crop_clusterd.t")
    log.info("not_shown")
    log.warning("shown")
    logging.getLogger("transformers").info("not shown either")
    assert [e["event"] for e in json_lines(out)] == ["shown"]


def test_other_libraries_stay_at_warning_when_debugging() -> None:
    out = io.StringIO()
    configure_logging("json", "debug", out, environ={})
    logging.getLogger("PIL.PngImagePlugin").debug("STREAM b'IHDR'")
    logging.getLogger("PIL.PngImagePlugin").info("chatter")
    logging.getLogger("transformers").warning("kept")
    get_logger("crop_clusterd.embed").debug("model_loaded")
    assert [e["event"] for e in json_lines(out)] == ["kept", "model_loaded"]


def test_error_level_also_silences_library_warnings() -> None:
    out = io.StringIO()
    configure_logging("json", "error", out, environ={})
    logging.getLogger("transformers").warning("dropped")
    get_logger("crop_clusterd.t").warning("dropped_too")
    get_logger("crop_clusterd.t").error("kept")
    assert [e["event"] for e in json_lines(out)] == ["kept"]


def test_stdlib_logging_and_python_warnings_go_through_the_same_output() -> None:
    out = io.StringIO()
    configure_logging("json", "info", out, environ={})
    logging.getLogger("transformers.modeling").warning("weights %s not used", "head")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("old API", DeprecationWarning, stacklevel=1)
    first, second = json_lines(out)
    assert first["event"] == "weights head not used"
    assert first["logger"] == "transformers.modeling"
    assert first["level"] == "warning"
    assert second["logger"] == "py.warnings"
    assert "DeprecationWarning: old API" in second["event"]
    assert not second["event"].endswith("\n")


def test_json_exception_has_traceback() -> None:
    out = io.StringIO()
    configure_logging("json", "info", out, environ={})
    try:
        raise ZeroDivisionError("nope")
    except ZeroDivisionError:
        get_logger("crop_clusterd.t").exception("embed_failed", batch=3)
    (entry,) = json_lines(out)
    assert entry["level"] == "error"
    assert entry["batch"] == 3
    assert "ZeroDivisionError: nope" in entry["exception"]


def test_reconfiguring_replaces_the_handler() -> None:
    out = io.StringIO()
    configure_logging("json", "info", out, environ={})
    configure_logging("json", "info", out, environ={})
    get_logger("crop_clusterd.t").info("once")
    assert len(json_lines(out)) == 1


def test_logger_made_before_configuration_follows_it() -> None:
    log = get_logger("crop_clusterd.early")
    out = io.StringIO()
    configure_logging("json", "info", out, environ={})
    log.info("late_config")
    assert json_lines(out)[0]["event"] == "late_config"


# --- console -------------------------------------------------------------------


def test_console_lines_are_readable_without_colour_on_a_file() -> None:
    out = io.StringIO()
    assert configure_logging("console", "debug", out, environ={}) == "console"
    get_logger("crop_clusterd.watch").info("file_skipped", name="a.png", reason="truncated")
    get_logger("crop_clusterd.watch").debug("scan_done")
    first, second = out.getvalue().splitlines()
    assert "\x1b[" not in first
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[info\s*\] file_skipped", first)
    assert "name=a.png" in first
    assert "reason=truncated" in first
    assert "crop_clusterd.watch" in first
    assert "[debug" in second
    assert "scan_done" in second


def test_console_uses_colour_on_a_terminal() -> None:
    out = TtyStream()
    configure_logging("console", "info", out, environ={})
    get_logger("crop_clusterd.t").info("coloured")
    assert "\x1b[" in out.getvalue()


# --- journald -----------------------------------------------------------------


def test_journald_renderer_sends_message_priority_event_and_fields() -> None:
    journal = FakeJournal()
    render = JournaldRenderer(journal)
    message = render(
        None,
        "warning",
        {
            "event": "file_skipped",
            "level": "warning",
            "logger": "crop_clusterd.watch",
            "timestamp": "2024-01-01T00:00:00Z",
            "path": Path("/in/a.png"),
            "reason": "truncated",
            "crop_index": 3,
        },
    )
    (entry,) = journal.entries
    assert entry["MESSAGE"] == message
    assert message == "file_skipped path=/in/a.png reason=truncated crop_index=3"
    assert entry["PRIORITY"] == "4"
    assert entry["EVENT"] == "file_skipped"
    assert entry["LOGGER"] == "crop_clusterd.watch"
    assert entry["PATH"] == "/in/a.png"
    assert entry["REASON"] == "truncated"
    assert entry["CROP_INDEX"] == "3"
    # The journal stamps entries itself.
    assert "TIMESTAMP" not in entry


@pytest.mark.parametrize(("level", "priority"), [("debug", "7"), ("info", "6"), ("error", "3")])
def test_journald_priorities(level: str, priority: str) -> None:
    journal = FakeJournal()
    JournaldRenderer(journal)(None, level, {"event": "e", "level": level})
    assert journal.entries[0]["PRIORITY"] == priority


def test_journald_field_names_are_sanitised_and_never_clobber_reserved_ones() -> None:
    journal = FakeJournal()
    JournaldRenderer(journal)(
        None,
        "info",
        {"event": "e", "message": "user text", "_private": 1, "2nd": 2, "a-b.c": 3},
    )
    (entry,) = journal.entries
    assert entry["MESSAGE"].startswith("e ")
    assert entry["EVENT"] == "e"
    assert entry["F_MESSAGE"] == "user text"
    assert entry["PRIVATE"] == "1"
    assert entry["F_2ND"] == "2"
    assert entry["A_B_C"] == "3"
    assert all(re.fullmatch(r"[A-Z][A-Z0-9_]{0,63}", k) for k in entry)


def test_journald_end_to_end_with_injected_sender() -> None:
    journal = FakeJournal()
    out = io.StringIO()
    chosen = configure_logging("journald", "info", out, environ={}, sender=journal)
    assert chosen == "journald"
    get_logger("crop_clusterd.cluster").info("cluster_merged", from_cluster=7, into_cluster=2)
    logging.getLogger("transformers").error("boom")
    first, second = journal.entries
    assert first["EVENT"] == "cluster_merged"
    assert first["PRIORITY"] == "6"
    assert first["FROM_CLUSTER"] == "7"
    assert first["INTO_CLUSTER"] == "2"
    assert second["MESSAGE"] == "boom"
    assert second["PRIORITY"] == "3"
    assert second["LOGGER"] == "transformers"
    # Nothing goes to the stream: systemd would store it twice.
    assert out.getvalue() == ""


# --- choosing the format --------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "environ", "available", "expected"),
    [
        ("auto", {}, True, "console"),
        ("auto", {"JOURNAL_STREAM": "8:123"}, True, "journald"),
        ("auto", {"INVOCATION_ID": "abc"}, True, "journald"),
        ("auto", {"INVOCATION_ID": "abc"}, False, "console"),
        ("journald", {}, True, "journald"),
        ("journald", {}, False, "console"),
        ("json", {"INVOCATION_ID": "abc"}, True, "json"),
        ("console", {"JOURNAL_STREAM": "8:1"}, True, "console"),
    ],
)
def test_resolve_format(fmt: Any, environ: dict[str, str], available: bool, expected: str) -> None:
    assert resolve_format(fmt, environ, available) == expected


def test_auto_picks_console_outside_systemd_even_with_journal_available() -> None:
    journal = FakeJournal()
    out = io.StringIO()
    assert configure_logging("auto", "info", out, environ={}, sender=journal) == "console"
    get_logger("crop_clusterd.t").info("hello")
    assert journal.entries == []
    assert "hello" in out.getvalue()


def test_auto_picks_journald_under_systemd() -> None:
    journal = FakeJournal()
    env = {"INVOCATION_ID": "x"}
    assert configure_logging("auto", "info", io.StringIO(), environ=env, sender=journal) == (
        "journald"
    )


def test_missing_systemd_falls_back_to_console_with_one_warning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(log_mod, "journal_sender", lambda: None)
    env = {"JOURNAL_STREAM": "8:1"}
    out = io.StringIO()
    assert configure_logging("auto", "info", out, environ=env) == "console"
    assert configure_logging("journald", "info", out, environ=env) == "console"
    warnings_seen = [line for line in out.getvalue().splitlines() if "journald_unavailable" in line]
    assert len(warnings_seen) == 1
    assert "[warning" in warnings_seen[0]


def test_bad_level_and_format_raise() -> None:
    with pytest.raises(ValueError, match="unknown log level 'loud'"):
        configure_logging("console", "loud", io.StringIO(), environ={})
    with pytest.raises(ValueError, match="unknown log format 'xml'"):
        configure_logging("xml", "info", io.StringIO(), environ={})  # type: ignore[arg-type]
