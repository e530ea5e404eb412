"""Run records and events as they cross the seam: plain JSON-able dicts.

A record is the run's :class:`~server.core.result.RunResult` plus who owned
it (``node``) and under which fencing token (``token``), so a new owner can
tell an orphan (a record still ``running`` under a smaller token) from a
run of its own.
"""

from __future__ import annotations

import time
from typing import Any

from ..core.events import (
    CancelReason,
    ErrorInfo,
    RunCancelled,
    RunCompleted,
    RunDelta,
    RunEvent,
    RunFailed,
    RunInterrupted,
    RunMessage,
    RunStarted,
    RunStatus,
    Usage,
)
from ..core.result import RunResult
from ..core.run import Run
from ..wire.native import event_dict, usage_dict

__all__ = ["event_dict", "event_from_dict", "orphan_ending", "record_of", "result_of"]


def record_of(run: Run, *, node: str, token: int) -> dict[str, Any]:
    result = run.result
    error = result.error
    return {
        "run_id": result.run_id,
        "principal": result.principal,
        "session_id": result.session_id,
        "agent": result.agent,
        "status": result.status.value,
        "cancel_reason": result.cancel_reason,
        "finish_reason": result.finish_reason,
        "text": result.text,
        "usage": usage_dict(result.usage) if result.usage is not None else None,
        "error": None if error is None else {"code": error.code, "message": error.message},
        "events": result.events,
        "created_at": result.created_at,
        "finished_at": result.finished_at,
        "node": node,
        "token": token,
    }


def result_of(record: dict[str, Any]) -> RunResult:
    """A record read back as a result (what the records API renders)."""
    usage = record.get("usage")
    error = record.get("error")
    return RunResult(
        run_id=record["run_id"],
        principal=record["principal"],
        session_id=record["session_id"],
        agent=record.get("agent", ""),
        status=RunStatus(record["status"]),
        cancel_reason=record.get("cancel_reason"),
        finish_reason=record.get("finish_reason"),
        text=record.get("text", ""),
        usage=None
        if usage is None
        else Usage(
            prompt_tokens=usage["prompt_tokens"], completion_tokens=usage["completion_tokens"]
        ),
        error=None if error is None else ErrorInfo(code=error["code"], message=error["message"]),
        events=record.get("events"),
        created_at=record["created_at"],
        finished_at=record.get("finished_at"),
    )


def orphan_ending(record: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The terminal event (its ``seq`` is the backend's to set) and the
    record of a run whose owner lost its lease mid-run."""
    reason = CancelReason.OWNER_LOST.value
    terminal = {
        "type": "run.interrupted",
        "run_id": record["run_id"],
        "session_id": record["session_id"],
        "reason": reason,
    }
    ended = {
        **record,
        "status": RunStatus.INTERRUPTED.value,
        "cancel_reason": reason,
        "finish_reason": None,
        "finished_at": time.time(),
    }
    if isinstance(ended.get("events"), int):
        ended["events"] += 1
    return terminal, ended


_EVENT_TYPES: dict[str, type[RunEvent]] = {
    kind.type: kind
    for kind in (
        RunStarted,
        RunDelta,
        RunMessage,
        RunCompleted,
        RunCancelled,
        RunInterrupted,
        RunFailed,
    )
}


def _error(value: dict[str, Any] | None) -> ErrorInfo | None:
    return None if value is None else ErrorInfo(code=value["code"], message=value["message"])


def event_from_dict(body: dict[str, Any]) -> RunEvent:
    """An event read back from the shared state (the inverse of
    :func:`~server.wire.native.event_dict`), for the wire encoders."""
    kind = _EVENT_TYPES[body["type"]]
    fields: dict[str, Any] = {
        "run_id": body["run_id"],
        "session_id": body["session_id"],
        "seq": int(body["seq"]),
    }
    if kind in (RunDelta, RunMessage):
        fields["text"] = body.get("text", "")
    if kind.terminal:
        fields["error_details"] = _error(body.get("error_details"))
    if kind in (RunCancelled, RunInterrupted):
        fields["reason"] = CancelReason(body["reason"])
    if kind is RunFailed:
        fields["error"] = _error(body["error"])
    if kind is RunCompleted:
        usage = body.get("usage")
        fields["finish_reason"] = body.get("finish_reason", "stop")
        fields["usage"] = (
            None
            if usage is None
            else Usage(
                prompt_tokens=usage["prompt_tokens"],
                completion_tokens=usage["completion_tokens"],
            )
        )
    return kind(**fields)
