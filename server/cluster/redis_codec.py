"""How :class:`~server.cluster.redis_backend.RedisBackend` reads and writes
values in Redis (intents, replies, events, lease replies), and which Redis
errors are an outage rather than a bug."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import coredis.exceptions

from .backend import Holder, Intent, IntentKind, Reply, ReplyStatus, SessionRef

logger = logging.getLogger(__name__)


# Error replies that say Redis cannot serve now (loading, a read-only
# replica after a failover, out of memory under noeviction, a busy script):
# an outage, not a bug.
UNAVAILABLE_REPLIES = (
    "LOADING",
    "READONLY",
    "OOM",
    "MASTERDOWN",
    "BUSY",
    "TRYAGAIN",
    "NOREPLICAS",
)


def is_outage(error: BaseException) -> bool:
    """A refused/lost connection, a timeout, or an error reply that says
    Redis cannot serve now (all of a group). Other error replies (WRONGTYPE,
    a script error) are bugs: :class:`BackendError`."""
    if isinstance(error, BaseExceptionGroup):
        return all(is_outage(inner) for inner in error.exceptions)
    if isinstance(error, coredis.exceptions.ResponseError):
        return str(error).startswith(UNAVAILABLE_REPLIES) or isinstance(
            error, coredis.exceptions.BusyLoadingError | coredis.exceptions.ReadOnlyError
        )
    return isinstance(error, coredis.exceptions.RedisError | OSError | TimeoutError)


def holder_of(reply: list[Any]) -> Holder:
    _, node, token, pttl, busy, run = reply
    return Holder(
        node=str(node),
        token=int(token),
        expires_in=max(0.0, int(pttl) / 1000),
        busy=busy == "1",
        run_id=run or None,
    )


def intent_json(intent: Intent) -> str:
    return json.dumps(
        {
            "kind": intent.kind.value,
            "principal": intent.session.principal,
            "session_id": intent.session.session_id,
            "from_node": intent.from_node,
            "reply_to": intent.reply_to,
            "run_id": intent.run_id,
            "token": intent.token,
        }
    )


def parsed_intent(entry: Any) -> Intent | None:
    """One inbox entry's intent; None (logged) if it is none."""
    try:
        return intent_of(entry.field_values["i"])
    except (KeyError, TypeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        logger.error("a malformed intent %s skipped: %r", entry.identifier, exc)
        return None


def intent_of(text: str) -> Intent:
    body = json.loads(text)
    return Intent(
        kind=IntentKind(body["kind"]),
        session=SessionRef(principal=body["principal"], session_id=body["session_id"]),
        from_node=body["from_node"],
        reply_to=body["reply_to"],
        run_id=body.get("run_id"),
        token=body.get("token"),
    )


def reply_of(text: str) -> Reply:
    body = json.loads(text)
    return Reply(
        status=ReplyStatus(body["status"]), token=body.get("token"), record=body.get("record")
    )


def event_of(fields: dict[str, str]) -> dict[str, Any]:
    event: dict[str, Any] = json.loads(fields["e"])
    event["seq"] = int(fields["seq"])
    return event


def created_at_of(record: dict[str, Any]) -> float:
    value = record.get("created_at")
    return float(value) if isinstance(value, int | float) else time.time()
