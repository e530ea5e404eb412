"""Request bodies and headers, validated into values (strict types).

Malformed JSON is a 400; well-formed JSON of the wrong shape is a 422 whose
message names the first offending fields. Unknown fields are ignored, as
OpenAI clients send many (``temperature``, ``max_tokens``, ...).

Cost: whatever a body within ``--max-body-bytes`` holds, the trio thread
spends at most a few milliseconds on it (see :func:`read_chat_request`), and
validation stops at the first :data:`MAX_PROBLEMS` problems.
"""

from __future__ import annotations

import functools
import json
import json.scanner
import re
from collections.abc import Iterable
from typing import Any, Literal

import attrs
import trio

from ..core.agent import AgentRequest, ChatTurn
from ..wire.sse import LONE_SURROGATE
from .errors import CLOSE_CONNECTION, ApiError
from .validation import Problems, ShapeError, Structurer

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
        _check_message_count(len(messages), max_messages)
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


def _check_message_count(count: int, max_messages: int | None) -> None:
    if max_messages is not None and count > max_messages:
        raise ApiError(
            413,
            "too_many_messages",
            f"The request has {count} messages; the server accepts {max_messages}.",
        )


def _content(value: Any, path: str, problems: Problems) -> Any:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        return _structurer.at(value, list[TextPart], path, problems)
    return problems.report("expected a string or a list of content parts", path)


_structurer = Structurer(hooks={str | list[TextPart] | None: _content})

# Bodies up to this size are decoded and validated on the trio thread: at
# most ~2 ms whatever they hold (tests/unit/test_request_cost.py). Larger
# ones are parsed in a worker thread, by json's pure-Python scanner: C's
# json.loads holds the GIL throughout (20-60 ms for 1 MiB of small values),
# a Python-level parse lets the trio thread take the GIL back every
# switch interval (5 ms).
INLINE_BODY_BYTES = 16 * 1024
# One worker: under the GIL a second parsing thread adds no throughput, only
# another contender for the trio thread's GIL.
PARSE_THREADS = 1
# Problems named in a 422; the walk stops at the last one.
MAX_PROBLEMS = 5
# Objects and arrays in one body (413 past it; a large body's parse stops
# there). Far above what a request within --max-messages needs, and above
# what INLINE_BODY_BYTES can hold (3 bytes each), so both paths agree. Each
# is an object the garbage collector walks: 350,000 of them (1 MiB of
# ``[],``) cost 30-50 ms pauses of every thread while they live.
MAX_JSON_CONTAINERS = 20_000


def parse_limiter() -> trio.CapacityLimiter:
    """The limiter :func:`read_chat_request` takes: one per app."""
    return trio.CapacityLimiter(PARSE_THREADS)


async def read_chat_request(
    body: bytes, *, max_messages: int | None, limiter: trio.CapacityLimiter
) -> ChatRequest:
    """:func:`parse_chat_request`, off the trio thread for a large body.

    The worker thread is never abandoned (``abandon_on_cancel=False``): a
    cancelled request waits for its parse to end, so no thread outlives the
    request that started it, and the limiter counts every thread running.
    The wait is bounded: the body is at most ``--max-body-bytes`` and the
    parse linear in it (~0.5 s of CPU for 1 MiB of the smallest values).
    """
    if len(body) <= INLINE_BODY_BYTES:
        return parse_chat_request(body, max_messages=max_messages)
    outcome = await trio.to_thread.run_sync(
        functools.partial(_parse_in_worker, body, max_messages=max_messages),
        limiter=limiter,
        abandon_on_cancel=False,
    )
    if isinstance(outcome, ApiError):
        raise outcome
    return outcome


def _parse_in_worker(body: bytes, *, max_messages: int | None) -> ChatRequest | ApiError:
    try:
        return parse_chat_request(body, max_messages=max_messages, yield_gil=True)
    except ApiError as error:
        # A fresh error, without the traceback and context whose frames hold
        # the decoded body: that is freed here, in this thread (hundreds of
        # thousands of objects: tens of ms), not where the error is handled.
        return ApiError(error.status, error.code, error.message, headers=error.headers)


# A surrogate code point in a decoded ``str`` is a lone one (JSON's
# ``"\ud800"`` escape): no UTF-8 can carry it, so the agent, the run store and
# the wire encoders would each fail on it (LONE_SURROGATE, shared with the
# encoders). One can only come from an escape of one or from the text itself
# (utf-8 is decoded with surrogatepass, as json.loads does).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _has_lone_surrogate(text: str, value: Any) -> bool:
    if not (_SURROGATE_ESCAPE.search(text) or LONE_SURROGATE.search(text)):
        return False
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


class _TooManyContainers(Exception):
    pass


def _decode(text: str, *, yield_gil: bool) -> Any:
    if not yield_gil:
        return json.loads(text)
    # A decoder per call: the Python scanner's memo and our count are per body.
    decoder = json.JSONDecoder()
    containers = 0

    def counted(parse: Any) -> Any:
        def parse_counted(*args: Any) -> Any:
            nonlocal containers
            containers += 1
            if containers > MAX_JSON_CONTAINERS:
                raise _TooManyContainers
            return parse(*args)

        return parse_counted

    # py_make_scanner takes these from its context: every object and array.
    decoder.parse_object = counted(decoder.parse_object)  # type: ignore[attr-defined]
    decoder.parse_array = counted(decoder.parse_array)  # type: ignore[attr-defined]
    decoder.scan_once = json.scanner.py_make_scanner(decoder)  # type: ignore[attr-defined]
    return decoder.decode(text)


def parse_chat_request(
    body: bytes, *, max_messages: int | None = None, yield_gil: bool = False
) -> ChatRequest:
    """The request in ``body``, or an :class:`ApiError`: 400 for anything
    but JSON, 413 past ``max_messages`` messages, 422 for the wrong shape
    (naming the first :data:`MAX_PROBLEMS` problems).

    ``yield_gil``: parse with the Python scanner (for a worker thread)."""
    try:
        # What json.loads does with bytes, kept so both parsers see one text.
        text = body.decode(json.detect_encoding(body), "surrogatepass")
        raw = _decode(text, yield_gil=yield_gil)
    except _TooManyContainers:
        raise ApiError(
            413,
            "too_many_values",
            f"The request body holds more than {MAX_JSON_CONTAINERS} JSON objects and arrays.",
        ) from None
    except (ValueError, RecursionError):
        # ValueError: UnicodeDecodeError, JSONDecodeError, and an integer of
        # more than sys.get_int_max_str_digits() digits. RecursionError:
        # nesting deeper than the parser's stack allows.
        raise ApiError(400, "invalid_json", "The request body is not valid JSON.") from None
    if _has_lone_surrogate(text, raw):
        raise ApiError(
            400,
            "invalid_json",
            "The request body is not valid JSON: a string holds an unpaired surrogate escape.",
        )
    if not isinstance(raw, dict):
        raise ApiError(422, "invalid_request", "The request body must be a JSON object.")
    messages = raw.get("messages")
    if isinstance(messages, list):  # counted before a single one is validated
        _check_message_count(len(messages), max_messages)
    try:
        return _structurer.structure(raw, ChatRequest, max_problems=MAX_PROBLEMS)
    except ShapeError as exc:
        detail = "; ".join(exc.problems)
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
