"""Request bodies and headers, validated into values (cattrs, strict types).

Malformed JSON is a 400; well-formed JSON of the wrong shape is a 422 whose
message names the offending fields. Unknown fields are ignored, as OpenAI
clients send many (``temperature``, ``max_tokens``, ...).
"""

from __future__ import annotations

import json
import re
import typing
from collections.abc import Iterable
from typing import Any, Literal

import attrs
import cattrs
import cattrs.cols
import cattrs.gen

from ..core.agent import AgentRequest, ChatTurn
from ..wire.sse import LONE_SURROGATE
from .errors import CLOSE_CONNECTION, ApiError

SESSION_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")


@attrs.frozen(kw_only=True)
class TextPart:
    type: str
    text: str = ""


@attrs.frozen(kw_only=True)
class ChatMessage:
    role: str
    content: str | list[TextPart] | None = None

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content if part.type == "text")


@attrs.frozen(kw_only=True)
class StreamOptions:
    include_usage: bool = False


@attrs.frozen(kw_only=True)
class ChatRequest:
    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Native typed events over SSE instead of OpenAI chunks (same as the
    # ``X-Stream-Format: events`` header).
    stream_format: Literal["openai", "events"] | None = None
    # "continue": the run goes on (and can be reattached) after the client leaves.
    on_disconnect: Literal["cancel", "continue"] = "cancel"
    # What this prompt does to a run its session is still producing.
    on_conflict: Literal["interrupt", "reject", "enqueue", "rollback"] = "interrupt"

    def agent_request(
        self, *, max_chars: int | None = None, max_messages: int | None = None
    ) -> AgentRequest:
        """The engine's request; 413 past ``max_messages`` messages or
        ``max_chars`` characters of prompt and message contents together."""
        messages = self.messages or ()
        if max_messages is not None and len(messages) > max_messages:
            raise ApiError(
                413,
                "too_many_messages",
                f"The request has {len(messages)} messages; the server accepts {max_messages}.",
            )
        turns = tuple(ChatTurn(role=m.role, content=m.text) for m in messages)
        chars = len(self.prompt or "") + sum(len(turn.content) for turn in turns)
        if max_chars is not None and chars > max_chars:
            raise ApiError(
                413,
                "prompt_too_large",
                f"The prompt and messages hold {chars} characters; the server accepts {max_chars}.",
            )
        prompt = self.prompt
        if prompt is None:
            prompt = next((turn.content for turn in reversed(turns) if turn.role == "user"), None)
        if prompt is None or not prompt.strip():
            raise ApiError(
                422,
                "missing_prompt",
                "Send a non-empty 'prompt' or 'messages' ending in a user message.",
            )
        return AgentRequest(prompt=prompt, messages=turns, model=self.model)


class _WrongType(TypeError):
    """Raised by our hooks; its text is ours and safe to show to clients."""


_TYPE_NAMES = {str: "a string", bool: "a boolean", int: "an integer"}


def _strict(expected: type) -> Any:
    def structure(value: Any, _type: Any) -> Any:
        # bool is an int in Python; neither may stand in for the other here.
        if type(value) is not expected:
            raise _WrongType(f"expected {_TYPE_NAMES[expected]}")
        return value

    return structure


def _is_list_type(type_: Any) -> bool:
    return typing.get_origin(type_) is list


def _strict_list(list_type: Any, converter: cattrs.BaseConverter) -> Any:
    structure_items = cattrs.cols.list_structure_factory(list_type, converter)

    def structure(value: Any, type_: Any) -> Any:
        if not isinstance(value, list):  # a string is iterable, but not a list
            raise _WrongType("expected a list")
        return structure_items(value, type_)

    return structure


def _strict_object(cls: Any, converter: cattrs.BaseConverter) -> Any:
    structure_fields = cattrs.gen.make_dict_structure_fn(cls, converter)

    def structure(value: Any, type_: Any) -> Any:
        if not isinstance(value, dict):
            raise _WrongType("expected an object")
        return structure_fields(value, type_)

    return structure


def _content(value: Any, _type: Any) -> str | list[TextPart] | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        return _converter.structure(value, list[TextPart])
    raise _WrongType("expected a string or a list of content parts")


def _describe(exc: BaseException, type_: Any) -> str:
    """Client-facing wording for one validation failure: fixed phrases, never
    the exception's own text (which can quote internals)."""
    if isinstance(exc, _WrongType):
        return str(exc)
    if isinstance(exc, KeyError):
        return "required field missing"
    candidates = typing.get_args(type_) if typing.get_origin(type_) is not Literal else (type_,)
    choices = [
        repr(choice)
        for candidate in candidates
        if typing.get_origin(candidate) is Literal
        for choice in typing.get_args(candidate)
    ]
    return "expected one of " + ", ".join(choices) if choices else "invalid value"


_converter = cattrs.Converter(forbid_extra_keys=False)
for _type in (str, bool, int):
    _converter.register_structure_hook(_type, _strict(_type))
_converter.register_structure_hook_factory(_is_list_type, _strict_list)
_converter.register_structure_hook_factory(attrs.has, _strict_object)
_converter.register_structure_hook(str | list[TextPart] | None, _content)


# A surrogate code point in a decoded ``str`` is a lone one (JSON's
# ``"\ud800"`` escape): no UTF-8 can carry it, so the agent, the run store and
# the wire encoders would each fail on it (LONE_SURROGATE, shared with the
# encoders).


def _has_lone_surrogate(value: Any) -> bool:
    pending = [value]  # iterative: the parser allows nesting deeper than our stack
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if LONE_SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False


def parse_chat_request(body: bytes) -> ChatRequest:
    try:
        raw = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        # RecursionError: nesting deeper than the parser's stack allows.
        raise ApiError(400, "invalid_json", "The request body is not valid JSON.") from None
    if _has_lone_surrogate(raw):
        raise ApiError(
            400,
            "invalid_json",
            "The request body is not valid JSON: a string holds an unpaired surrogate escape.",
        )
    if not isinstance(raw, dict):
        raise ApiError(422, "invalid_request", "The request body must be a JSON object.")
    try:
        return _converter.structure(raw, ChatRequest)
    except cattrs.BaseValidationError as exc:
        problems = cattrs.transform_error(exc, format_exception=_describe)
        detail = "; ".join(problems[:5])
        raise ApiError(422, "invalid_request", f"Invalid request: {detail}.") from None


def check_head_size(raw_path: bytes, headers: Iterable[tuple[str, str]], limit: int) -> None:
    """431 for a request line and headers over ``limit`` bytes.

    Hypercorn enforces the same limit only on a head that arrives in pieces
    (h11 bounds what it buffers while waiting for the rest); a head that
    arrives in one read (up to 64 KiB) reaches us whole and is checked here.
    """
    size = len(raw_path) + sum(len(name) + len(value) + 4 for name, value in headers)
    if size > limit:
        raise ApiError(
            431,
            "headers_too_large",
            f"The request line and headers exceed {limit} bytes.",
            headers=CLOSE_CONNECTION,  # the body, if any, is not read
        )


def parse_session_id(header: str | None) -> str | None:
    if header is None:
        return None
    if not SESSION_ID_PATTERN.fullmatch(header):
        # Refused before the body is read: without the close, a body still
        # on its way would hang the kept-alive connection's next request.
        raise ApiError(
            400,
            "invalid_session_id",
            "X-Session-Id must be 1-128 characters of A-Z a-z 0-9 . _ : -",
            headers=CLOSE_CONNECTION,
        )
    return header
