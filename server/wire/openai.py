"""OpenAI Chat Completions shapes: ``chat.completion.chunk`` and
``chat.completion``.

A run that ends other than by completing still ends its chunks with a
``finish_reason`` that names why, then ``[DONE]``:

============================  =================  ===========================
terminal event                ``finish_reason``  extra field on that chunk
============================  =================  ===========================
``run.completed``             ``stop`` (or the   none
                              model's reason)
``run.cancelled``             ``cancelled``      ``"cancel_reason": reason``
``run.interrupted``           ``interrupted``    ``"cancel_reason": reason``
``run.failed``                ``error``          ``"error": {code, message}``
============================  =================  ===========================
"""

from __future__ import annotations

from typing import Any

from ..core.events import (
    RunCancelled,
    RunCompleted,
    RunDelta,
    RunEvent,
    RunFailed,
    RunInterrupted,
    RunMessage,
    RunStarted,
    TerminalEvent,
)
from .native import usage_dict


def completion_id(run_id: str) -> str:
    return f"chatcmpl-{run_id}"


def finish_fields(terminal: TerminalEvent) -> dict[str, Any]:
    """``finish_reason`` and the extra fields for a run's final chunk."""
    match terminal:
        case RunCompleted(finish_reason=finish_reason):
            return {"finish_reason": finish_reason}
        case RunCancelled(reason=reason):
            return {"finish_reason": "cancelled", "cancel_reason": reason.value}
        case RunInterrupted(reason=reason):
            return {"finish_reason": "interrupted", "cancel_reason": reason.value}
        case RunFailed(error=error):
            return {
                "finish_reason": "error",
                "error": {"code": error.code, "message": error.message},
            }


def chunk(
    run_id: str,
    *,
    created: int,
    model: str,
    delta: dict[str, Any],
    finish: dict[str, Any] | None = None,
) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": None}
    extra: dict[str, Any] = {}
    if finish is not None:
        choice["finish_reason"] = finish["finish_reason"]
        extra = {key: value for key, value in finish.items() if key != "finish_reason"}
    return {
        "id": completion_id(run_id),
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [choice],
        **extra,
    }


def chunks_for(
    event: RunEvent, *, created: int, model: str, include_usage: bool
) -> list[dict[str, Any]]:
    """The chunks one native event becomes (often none)."""

    def one(delta: dict[str, Any], finish: dict[str, Any] | None = None) -> dict[str, Any]:
        return chunk(event.run_id, created=created, model=model, delta=delta, finish=finish)

    match event:
        case RunStarted():
            return [one({"role": "assistant", "content": ""})]
        case RunDelta(text=text):
            return [one({"content": text})]
        case RunMessage():
            return []  # the deltas already carried the text
        case RunCompleted(usage=usage) if include_usage and usage is not None:
            usage_chunk = {
                "id": completion_id(event.run_id),
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [],
                "usage": usage_dict(usage),
            }
            return [one({}, finish_fields(event)), usage_chunk]
        case RunCompleted() | RunCancelled() | RunInterrupted() | RunFailed():
            return [one({}, finish_fields(event))]


def completion(
    run_id: str, *, created: int, model: str, text: str, terminal: TerminalEvent
) -> dict[str, Any]:
    """The non-streaming ``chat.completion`` body for an ended run."""
    finish = finish_fields(terminal)
    extra = {key: value for key, value in finish.items() if key != "finish_reason"}
    body: dict[str, Any] = {
        "id": completion_id(run_id),
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish["finish_reason"],
            }
        ],
        **extra,
    }
    if isinstance(terminal, RunCompleted) and terminal.usage is not None:
        body["usage"] = usage_dict(terminal.usage)
    return body
