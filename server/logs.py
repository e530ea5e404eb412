"""Logging set-up shared by our loggers and Hypercorn's (stdlib logging).

One handler on the root logger, writing to stderr, in one of two formats:

* ``text``: ``<time> <LEVEL> <logger> <message>``; lifecycle events read
  ``stream_end trace=<run_id> status=completed ...`` (the old tracker's
  vocabulary, which tools grep for);
* ``json``: one JSON object per line with the stable fields ``ts`` (UTC,
  ISO 8601), ``level``, ``logger``, ``event`` (``null`` for free-text
  lines), ``message``, then the event's own fields. The lifecycle keys
  ``trace`` and ``session`` are written as ``run_id`` and ``session_id``,
  the names the API uses. Hypercorn's access log lines become
  ``event: "http_request"`` with ``client``, ``method``, ``path``,
  ``status``, ``duration_ms``, ``bytes``, ``user_agent`` (never request
  headers or the environment, which Hypercorn's access atoms also carry).

A ``--workers`` worker (:mod:`server.supervisor`) adds its index to every
line: ``worker=<i>`` after the level in text, a ``worker`` field in JSON.

Hypercorn's ``hypercorn.access`` and ``hypercorn.error`` loggers are given no
handler of their own and propagate to the root, so they share this
configuration (see :func:`server.launcher.hypercorn_config`).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")
HYPERCORN_LOGGERS = ("hypercorn.access", "hypercorn.error")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
WORKER_TEXT_FORMAT = "%(asctime)s %(levelname)s worker={worker} %(name)s %(message)s"
# Lifecycle keys (the tracker's vocabulary) -> JSON field names.
JSON_FIELD_NAMES = {"trace": "run_id", "session": "session_id"}
# Hypercorn access-log atoms worth a field (others hold headers and the
# environment, which must not be logged).
ACCESS_ATOMS = {"h": "client", "m": "method", "U": "path", "s": "status", "b": "bytes"}


def log_event(
    logger: logging.Logger, name: str, level: int = logging.INFO, /, **fields: object
) -> None:
    """Log the event ``name`` with ``fields``: ``name key=value ...`` as
    text, and the fields themselves on the record for the JSON format."""
    text = " ".join([name, *(f"{key}={value}" for key, value in fields.items())])
    logger.log(level, "%s", text, extra={"event": name, "fields": fields})


class JsonFormatter(logging.Formatter):
    """One JSON object per record; see the module docstring for the fields."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        if self.worker is not None:
            entry["worker"] = self.worker
        entry |= {
            "event": getattr(record, "event", None),
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            for key, value in fields.items():
                entry.setdefault(JSON_FIELD_NAMES.get(str(key), str(key)), value)
        if record.name == "hypercorn.access" and isinstance(record.args, Mapping):
            entry.update(access_fields(record.args))
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def access_fields(atoms: Mapping[str, Any]) -> dict[str, Any]:
    fields: dict[str, Any] = {"event": "http_request"}
    for atom, name in ACCESS_ATOMS.items():
        value = atoms[atom]
        fields[name] = None if value in ("-", None) else value
    for name in ("status", "bytes"):
        if isinstance(fields[name], str) and fields[name].isdigit():
            fields[name] = int(fields[name])
    fields["duration_ms"] = round(int(atoms["D"]) / 1000, 3)  # D: microseconds
    user_agent = atoms["a"]
    fields["user_agent"] = None if user_agent == "-" else user_agent
    return fields


# coredis logs every retry at INFO (a script loaded again after a Redis
# restart, each refused connect while Redis is away): routine for a node,
# noise on its stderr (a node that cannot reach Redis at start would print
# two of them before its one-line error). Shown with --log-level debug.
QUIET_LOGGERS = ("coredis",)


def configure_logging(
    level: str = "info", log_format: str = "text", *, worker: int | None = None
) -> None:
    """``worker``: the index of a ``--workers`` worker process, on each of
    its lines (text: ``worker=<i>`` after the level, before the logger's
    name; JSON: a ``worker`` field), so that the supervisor's stderr, which
    all its workers share, says whose line is whose."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(worker))
    elif worker is None:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    else:
        handler.setFormatter(logging.Formatter(WORKER_TEXT_FORMAT.format(worker=worker)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in HYPERCORN_LOGGERS:
        hypercorn_logger = logging.getLogger(name)
        hypercorn_logger.handlers.clear()
        hypercorn_logger.propagate = True
        hypercorn_logger.setLevel(logging.NOTSET)
    for name in QUIET_LOGGERS:
        quiet = logging.NOTSET if root.level <= logging.DEBUG else logging.WARNING
        logging.getLogger(name).setLevel(quiet)
