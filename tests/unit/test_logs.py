"""Structured logs: one JSON object per lifecycle event with stable fields,
Hypercorn's access lines included, and nothing secret in them."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import trio
import trio.testing
from hypercorn.logging import AccessLogAtoms

from server.cli import parse_settings
from server.logs import JsonFormatter, configure_logging, log_event
from tests.unit.test_http import open_stream, read_frames, serving
from tests.unit.test_metrics import run_id_of

STABLE_FIELDS = {"ts", "level", "logger", "event", "message"}


def as_json(records: list[logging.LogRecord]) -> list[dict[str, Any]]:
    formatter = JsonFormatter()
    return [json.loads(formatter.format(record)) for record in records]


async def test_supersede_logs_one_json_line_per_lifecycle_event_in_order(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="server.lifecycle")
    session = {"X-Session-Id": "s1"}
    async with serving(token_delay=1.0, reply_words=10) as app:
        async with open_stream(app, {"prompt": "A", "stream": True}, session) as first:
            await trio.sleep(2.5)
            async with open_stream(app, {"prompt": "B", "stream": True}, session) as second:
                await read_frames(first)
                await read_frames(second)
                old, new = run_id_of(first), run_id_of(second)
    lines = as_json([r for r in caplog.records if r.name == "server.lifecycle"])
    assert all(line.keys() >= STABLE_FIELDS for line in lines)
    assert all(line["level"] == "info" and line["logger"] == "server.lifecycle" for line in lines)
    assert all(line["ts"].endswith("+00:00") for line in lines)
    story = [(line["event"], line.get("run_id")) for line in lines]
    assert story == [
        ("stream_start", old),
        ("stream_cancelled", old),
        ("stream_end", old),
        ("prev_stream_finished_cleanly", old),
        ("stream_start", new),
        ("stream_end", new),
    ]
    cancelled, ended, finished = lines[1], lines[2], lines[3]
    assert cancelled["reason"] == "superseded"
    assert ended["status"] == "cancelled" and isinstance(ended["events"], int)
    assert isinstance(ended["duration_ms"], int)
    assert finished["session_id"] == "s1" and finished["waited_ms"] == 0
    assert lines[0]["session_id"] == "s1"
    # The text form keeps the tracker's vocabulary.
    assert lines[2]["message"].startswith(f"stream_end trace={old} status=cancelled ")


def test_a_free_text_line_has_the_stable_fields_and_a_null_event(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logger = logging.getLogger("tests.free")
    with caplog.at_level(logging.WARNING, logger="tests.free"):
        logger.warning("something %s", "odd")
        try:
            raise ValueError("inside")
        except ValueError:
            logger.exception("failed")
    free, failed = as_json(caplog.records)
    assert free["event"] is None and free["message"] == "something odd"
    assert free["level"] == "warning"
    assert failed["level"] == "error" and "ValueError: inside" in failed["exc_info"]


def test_event_fields_ride_on_the_record(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("tests.events")
    with caplog.at_level(logging.INFO, logger="tests.events"):
        log_event(logger, "drained")
        log_event(logger, "listening", url="http://127.0.0.1:1")
    assert [record.getMessage() for record in caplog.records] == [
        "drained",
        "listening url=http://127.0.0.1:1",
    ]
    drained, listening = as_json(caplog.records)
    assert drained["event"] == "drained"
    assert listening == {**listening, "event": "listening", "url": "http://127.0.0.1:1"}


def test_access_lines_carry_the_request_and_never_headers_or_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STREAM_SERVER_API_KEYS", "env-secret")
    scope: Any = {
        "type": "http",
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "query_string": b"",
        "client": ("127.0.0.1", 5555),
        "headers": [(b"authorization", b"Bearer header-secret"), (b"user-agent", b"probe/1")],
    }
    response: Any = {"status": 200, "headers": [(b"content-length", b"17")]}
    atoms = AccessLogAtoms(scope, response, 0.25)
    record = logging.getLogger("hypercorn.access").makeRecord(
        "hypercorn.access", logging.INFO, __file__, 1, '%(h)s "%(r)s" %(s)s', (atoms,), None
    )
    line = JsonFormatter().format(record)
    assert "secret" not in line
    entry = json.loads(line)
    assert entry["event"] == "http_request"
    assert entry["method"] == "POST" and entry["path"] == "/v1/chat/completions"
    assert entry["status"] == 200 and entry["bytes"] == 17
    assert entry["duration_ms"] == 250.0
    assert entry["client"] == "127.0.0.1:5555" and entry["user_agent"] == "probe/1"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    hypercorn = [logging.getLogger(name) for name in ("hypercorn.access", "hypercorn.error")]
    saved_hypercorn = [(lg.handlers[:], lg.propagate, lg.level) for lg in hypercorn]
    try:
        yield
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
        for lg, (handlers, propagate, level) in zip(hypercorn, saved_hypercorn, strict=True):
            lg.handlers[:], lg.propagate, lg.level = handlers, propagate, level


def test_hypercorn_loggers_share_the_root_configuration(restore_logging: None) -> None:
    logging.getLogger("hypercorn.error").addHandler(logging.NullHandler())
    configure_logging("warning", "json")
    root = logging.getLogger()
    assert root.level == logging.WARNING
    assert [type(handler.formatter) for handler in root.handlers] == [JsonFormatter]
    for name in ("hypercorn.access", "hypercorn.error"):
        logger = logging.getLogger(name)
        assert logger.handlers == [] and logger.propagate
        assert logger.getEffectiveLevel() == logging.WARNING


def test_an_unknown_log_format_is_refused(restore_logging: None) -> None:
    with pytest.raises(ValueError, match="log format"):
        configure_logging("info", "xml")


def test_log_format_comes_from_the_flag_or_the_environment() -> None:
    assert parse_settings([], environ={}).log_format == "text"
    assert parse_settings(["--log-format", "json"], environ={}).log_format == "json"
    environ = {"STREAM_SERVER_LOG_FORMAT": "json"}
    assert parse_settings([], environ=environ).log_format == "json"
    assert parse_settings(["--log-level", "WARNING"], environ={}).log_level == "warning"


@pytest.mark.parametrize("argv", [["--log-format", "xml"], ["--log-level", "loud"]])
def test_an_unknown_log_format_or_level_is_a_usage_error(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_settings(argv, environ={})
    assert exit_info.value.code == 2
    assert argv[1] in capsys.readouterr().err
