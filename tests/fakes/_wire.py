"""The two upstream dialects as pure encoders: values in, bytes or JSON out.

:class:`OllamaWire` speaks ``POST /api/chat`` (NDJSON, one object per line);
:class:`OpenAIWire` speaks ``POST /v1/chat/completions`` (server-sent
events ending in ``data: [DONE]``). Both answer the same questions, so the
behaviour code in ``_app`` never looks at which dialect it is driving.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal, Protocol

import attrs

Api = Literal["ollama", "openai"]

CRASH_MESSAGE = "model crashed"
FAKE_MODEL = "fake-model"


def token_text(index: int) -> str:
    """The ``index``-th token of every reply: deterministic, so tests can assert content."""
    return f"tok{index} "


def reply_text(count: int) -> str:
    return "".join(token_text(index) for index in range(count))


def count_words(messages: list[Any]) -> int:
    """A stand-in for prompt token counting: whitespace-separated words."""
    return sum(len(message_text(message).split()) for message in messages)


def message_text(message: Any) -> str:
    """The text of a chat message whose content is a string or a list of parts."""
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


@attrs.frozen(kw_only=True)
class Usage:
    prompt: int
    completion: int


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


class Wire(Protocol):
    api: ClassVar[Api]
    media_type: ClassVar[str]

    def opening(self) -> bytes: ...
    def token(self, text: str) -> bytes: ...
    def closing(self, usage: Usage) -> bytes: ...
    def stream_error(self, message: str) -> bytes: ...
    def malformed(self) -> bytes: ...
    def error_body(self, status: int, message: str) -> Any: ...
    def completion(self, text: str, usage: Usage) -> Any: ...


@attrs.frozen(kw_only=True)
class OllamaWire:
    api: ClassVar[Api] = "ollama"
    media_type: ClassVar[str] = "application/x-ndjson"

    model: str

    def _object(self, **fields: Any) -> dict[str, Any]:
        created_at = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        return {"model": self.model, "created_at": created_at, **fields}

    def _line(self, **fields: Any) -> bytes:
        return _json(self._object(**fields)) + b"\n"

    def opening(self) -> bytes:
        return b""

    def token(self, text: str) -> bytes:
        return self._line(message={"role": "assistant", "content": text}, done=False)

    def _done(self, text: str, usage: Usage) -> dict[str, Any]:
        return {
            "message": {"role": "assistant", "content": text},
            "done": True,
            "done_reason": "stop",
            "total_duration": 0,
            "load_duration": 0,
            "prompt_eval_count": usage.prompt,
            "prompt_eval_duration": 0,
            "eval_count": usage.completion,
            "eval_duration": 0,
        }

    def closing(self, usage: Usage) -> bytes:
        return self._line(**self._done("", usage))

    def stream_error(self, message: str) -> bytes:
        return _json({"error": message}) + b"\n"

    def malformed(self) -> bytes:
        return b"{this line is not json\n"

    def error_body(self, status: int, message: str) -> Any:
        return {"error": message}

    def completion(self, text: str, usage: Usage) -> Any:
        return self._object(**self._done(text, usage))


_OPENAI_ERROR_TYPES = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("invalid_request_error", "model_not_found"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
}


def openai_error(status: int, message: str) -> dict[str, Any]:
    kind, code = _OPENAI_ERROR_TYPES.get(status, ("server_error", None))
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


@attrs.frozen(kw_only=True)
class OpenAIWire:
    api: ClassVar[Api] = "openai"
    media_type: ClassVar[str] = "text/event-stream"

    model: str
    completion_id: str
    include_usage: bool = False
    created: int = attrs.field(factory=lambda: int(time.time()))

    def _chunk(self, choices: list[Any], usage: Usage | None = None) -> bytes:
        chunk: dict[str, Any] = {
            "id": self.completion_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "fp_fake",
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = None if usage is None else _usage(usage)
        return b"data: " + _json(chunk) + b"\n\n"

    def _choice(self, delta: dict[str, Any], finish_reason: str | None = None) -> list[Any]:
        return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]

    def opening(self) -> bytes:
        return self._chunk(self._choice({"role": "assistant", "content": ""}))

    def token(self, text: str) -> bytes:
        return self._chunk(self._choice({"content": text}))

    def closing(self, usage: Usage) -> bytes:
        finish = self._chunk(self._choice({}, "stop"))
        totals = self._chunk([], usage) if self.include_usage else b""
        return finish + totals + b"data: [DONE]\n\n"

    def stream_error(self, message: str) -> bytes:
        return b"event: error\ndata: " + _json(openai_error(500, message)) + b"\n\n"

    def malformed(self) -> bytes:
        return b"data: {this line is not json\n\n"

    def error_body(self, status: int, message: str) -> Any:
        return openai_error(status, message)

    def completion(self, text: str, usage: Usage) -> Any:
        return {
            "id": self.completion_id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "fp_fake",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": _usage(usage),
        }


def _usage(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt,
        "completion_tokens": usage.completion,
        "total_tokens": usage.prompt + usage.completion,
    }
