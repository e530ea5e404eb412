"""Property tests of the request parsers: whatever bytes or JSON a client
sends, the parser answers a value or an :class:`ApiError` with a 4xx (never
another exception), and valid requests come through unchanged."""

from __future__ import annotations

import json
from typing import Any

import attrs
import hypothesis
import pytest
from hypothesis import strategies as st

from server.web.errors import ApiError
from server.web.requests import (
    SESSION_ID_PATTERN,
    ChatRequest,
    parse_chat_request,
    parse_session_id,
)

from .strategies import any_text, chat_bodies, json_values, valid_chat_requests

CHAT_REQUEST_FIELDS = {field.name for field in attrs.fields(ChatRequest)}
PROPERTY = hypothesis.settings(max_examples=300, derandomize=True, database=None, deadline=None)


def parse_or_error(body: bytes) -> ChatRequest | ApiError:
    try:
        return parse_chat_request(body)
    except ApiError as error:
        assert error.status in {400, 422}, error.status
        assert error.code in {"invalid_json", "invalid_request"}, error.code
        # Messages are ours: fixed phrases, never an exception's repr.
        assert "Traceback" not in error.message and "<class" not in error.message
        return error


@PROPERTY
@hypothesis.given(body=st.binary(max_size=64))
def test_any_bytes_parse_or_are_a_client_error(body: bytes) -> None:
    parse_or_error(body)


@PROPERTY
@hypothesis.given(value=json_values)
def test_any_json_parses_or_is_a_client_error(value: Any) -> None:
    result = parse_or_error(json.dumps(value).encode())
    if not isinstance(value, dict):
        assert isinstance(result, ApiError) and result.status == 422


@PROPERTY
@hypothesis.given(body=chat_bodies())
def test_near_valid_bodies_parse_or_are_a_client_error(body: dict[str, Any]) -> None:
    parse_or_error(json.dumps(body).encode())


@PROPERTY
@hypothesis.given(prompt=any_text, text=any_text)
def test_unpaired_surrogates_are_refused_anywhere(prompt: str, text: str) -> None:
    # ensure_ascii escapes an unpaired surrogate as "\ud800", as a client would.
    body = json.dumps({"prompt": prompt, "messages": [{"role": "user", "content": text}]})
    result = parse_or_error(body.encode())
    has_surrogate = any(0xD800 <= ord(char) <= 0xDFFF for char in prompt + text)
    assert isinstance(result, ApiError) == has_surrogate
    if isinstance(result, ChatRequest):
        assert result.prompt == prompt


@pytest.mark.parametrize(
    "body",
    [b"[" * 100_000, b'{"a":' * 100_000, b"\xff\xfe", b"", b"\x00", b'"\\ud800"', b"1e999999"],
)
def test_pathological_bodies_are_client_errors(body: bytes) -> None:
    assert isinstance(parse_or_error(body), ApiError)


def content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part["type"] == "text")


@PROPERTY
@hypothesis.given(
    body=valid_chat_requests,
    # Unknown fields are ignored; a known one in ``extra`` could be invalid.
    extra=st.dictionaries(
        st.text(max_size=5).filter(lambda key: key not in CHAT_REQUEST_FIELDS), json_values
    ),
)
def test_valid_requests_round_trip(body: dict[str, Any], extra: dict[str, Any]) -> None:
    request = parse_chat_request(json.dumps({**extra, **body}).encode())
    for field in ("prompt", "model", "stream_format"):
        assert getattr(request, field) == body.get(field)
    assert request.stream == body.get("stream", False)
    assert request.on_disconnect == body.get("on_disconnect", "cancel")
    assert request.on_conflict == body.get("on_conflict", "interrupt")
    options = body.get("stream_options")
    assert (request.stream_options is None) == (options is None)
    if request.stream_options is not None and options is not None:
        assert request.stream_options.include_usage == options.get("include_usage", False)
    messages = body.get("messages") or []
    assert [(m.role, m.text) for m in request.messages or []] == [
        (m["role"], content_text(m.get("content"))) for m in messages
    ]
    # The prompt: the explicit one, else the last user message; blank is a 422.
    users = [content_text(m.get("content")) for m in messages if m["role"] == "user"]
    prompt = body.get("prompt")
    if prompt is None and users:
        prompt = users[-1]
    if prompt is None or not prompt.strip():
        with pytest.raises(ApiError, match="missing_prompt"):
            request.agent_request()
    else:
        assert request.agent_request().prompt == prompt


@PROPERTY
@hypothesis.given(header=st.text(max_size=140) | st.from_regex(SESSION_ID_PATTERN, fullmatch=True))
def test_session_ids_are_the_pattern_or_a_400(header: str) -> None:
    if SESSION_ID_PATTERN.fullmatch(header):
        assert parse_session_id(header) == header
    else:
        with pytest.raises(ApiError) as raised:
            parse_session_id(header)
        assert (raised.value.status, raised.value.code) == (400, "invalid_session_id")
        # Refused before the body is read, so the connection must close.
        assert raised.value.headers.get("Connection") == "close"
