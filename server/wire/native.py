"""The native typed events as JSON objects."""

from __future__ import annotations

import json
from typing import Any

import attrs

from ..core.events import RunEvent, Usage


def dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def usage_dict(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def _serialise(_instance: object, _field: object, value: Any) -> Any:
    if isinstance(value, Usage):
        return usage_dict(value)
    return value


def event_dict(event: RunEvent) -> dict[str, Any]:
    """``{"type": ..., "run_id", "session_id", "seq", ...fields}``; enums
    become their string values."""
    body = attrs.asdict(event, value_serializer=_serialise)
    if body.get("error_details", False) is None:
        del body["error_details"]  # present only when something went wrong
    return {"type": event.type, **body}
