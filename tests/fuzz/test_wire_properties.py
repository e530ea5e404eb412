"""Property tests of the wire encoders: whatever text a run carries, every
frame parses back the way a client reads it, and every payload is of the
schema the OpenAPI document gives it."""

from __future__ import annotations

import json
import re
from typing import Any

import hypothesis
import jsonschema_rs
import pytest
from hypothesis import strategies as st

from server.core.events import RunDelta, RunEvent
from server.web.openapi import openapi_document
from server.wire import NativeNdjsonEncoder, NativeSseEncoder, OpenAIChunkEncoder
from server.wire.native import dumps, event_dict
from server.wire.sse import SSE_HEARTBEAT, SseDecoder, sse_event

from .strategies import any_text, batches, ids, runs

PROPERTY = hypothesis.settings(max_examples=150, derandomize=True, database=None, deadline=None)

SURROGATE = re.compile("[\ud800-\udfff]")


def schema_validator(name: str) -> jsonschema_rs.Validator:
    document = openapi_document()
    return jsonschema_rs.Draft202012Validator(
        {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
    )


NATIVE_EVENT = schema_validator("NativeEvent")
CHUNK = schema_validator("ChatCompletionChunk")


def as_sent(text: str) -> str:
    """What a client reads back of ``text``: line breaks as LF, unpaired
    surrogates (which UTF-8 cannot carry) as U+FFFD."""
    return SURROGATE.sub("\ufffd", re.sub("\r\n|\r|\n", "\n", text))


def sse_lines(stream: bytes) -> list[str]:
    """Split as the SSE spec does: at CRLF, LF or CR."""
    return re.split("\r\n|\r|\n", stream.decode("utf-8"))


def decode_sse(stream: bytes) -> list[tuple[str, str]]:
    decoder = SseDecoder()
    events = [decoder.feed(line) for line in sse_lines(stream)]
    return [event for event in events if event is not None]


def decode_json(text: str) -> Any:
    value = json.loads(text)
    # The decoded payload carries no unpaired surrogate (it went out as UTF-8).
    assert not SURROGATE.search(json.dumps(value, ensure_ascii=False))
    return value


event_names = st.text(st.characters(exclude_characters="\r\n"), min_size=1, max_size=10).filter(
    lambda name: name.strip() == name and ":" not in name
)


@PROPERTY
@hypothesis.given(
    events=st.lists(
        st.tuples(any_text, st.none() | ids, st.none() | event_names, st.booleans()), max_size=5
    )
)
def test_sse_events_round_trip_through_the_decoder(
    events: list[tuple[str, str | None, str | None, bool]],
) -> None:
    stream = b"".join(
        (SSE_HEARTBEAT if heartbeat else b"") + sse_event(data, event_id=event_id, event=event)
        for data, event_id, event, heartbeat in events
    )
    assert decode_sse(stream) == [
        (event or "message", as_sent(data)) for data, _, event, _ in events
    ]


@pytest.mark.parametrize(
    ("data", "lines"),
    [
        ("", [b"data: "]),
        ("a\rb", [b"data: a", b"data: b"]),
        ("a\r\nb", [b"data: a", b"data: b"]),
        ("a\n\nb", [b"data: a", b"data: ", b"data: b"]),
        ("\ud800", ["data: \ufffd".encode()]),
    ],
)
def test_sse_data_with_line_breaks_and_surrogates(data: str, lines: list[bytes]) -> None:
    # Regression: a CR in data once went out raw, and a client (which ends a
    # line at CR too) read the rest as a field of its own; an unpaired
    # surrogate failed the whole frame with UnicodeEncodeError.
    assert sse_event(data) == b"\n".join(lines) + b"\n\n"


@PROPERTY
@hypothesis.given(data=st.data(), events=runs())
def test_ndjson_is_one_json_object_per_line(data: st.DataObject, events: list[RunEvent]) -> None:
    encoder = NativeNdjsonEncoder()
    stream = b"".join(encoder.encode(batch) for batch in data.draw(batches(events)))
    stream = stream.replace(b"\n", b"\n" + encoder.heartbeat(), 1)  # a heartbeat mid-stream
    text = stream.decode("utf-8")
    assert text.endswith("\n")
    decoded = [decode_json(line) for line in text.split("\n") if line]
    expected = [json.loads(as_sent(dumps(event_dict(event)))) for event in events]
    assert decoded == expected
    for value in decoded:
        NATIVE_EVENT.validate(value)


@PROPERTY
@hypothesis.given(data=st.data(), events=runs())
def test_native_sse_events_carry_id_type_and_the_event(
    data: st.DataObject, events: list[RunEvent]
) -> None:
    encoder = NativeSseEncoder()
    stream = b"".join(encoder.encode(batch) for batch in data.draw(batches(events)))
    lines = sse_lines(stream)
    assert [line for line in lines if line.startswith("id: ")] == [
        f"id: {event.run_id}:{event.seq}" for event in events
    ]
    decoded = decode_sse(stream)
    assert [name for name, _ in decoded] == [event.type for event in events]
    for (_, payload), event in zip(decoded, events, strict=True):
        value = decode_json(payload)
        assert value == json.loads(as_sent(dumps(event_dict(event))))
        NATIVE_EVENT.validate(value)


@PROPERTY
@hypothesis.given(data=st.data(), events=runs(), include_usage=st.booleans(), model=any_text)
def test_openai_chunks_are_json_per_data_line_then_done(
    data: st.DataObject, events: list[RunEvent], include_usage: bool, model: str
) -> None:
    encoder = OpenAIChunkEncoder(created=1, model=model, include_usage=include_usage)
    stream = b"".join(encoder.encode(batch) for batch in data.draw(batches(events)))
    payloads = [payload for _, payload in decode_sse(stream)]
    assert payloads[-1] == "[DONE]"
    chunks = [decode_json(payload) for payload in payloads[:-1]]
    for chunk in chunks:
        CHUNK.validate(chunk)
    text = "".join(
        choice["delta"].get("content", "") for chunk in chunks for choice in chunk["choices"]
    )
    deltas = "".join(event.text for event in events if isinstance(event, RunDelta))
    assert text == SURROGATE.sub("\ufffd", deltas)  # JSON escapes line breaks
    finishes = [chunk["choices"][0]["finish_reason"] for chunk in chunks if chunk["choices"]]
    assert all(reason is None for reason in finishes[:-1])
    assert finishes[-1] is not None
