"""Wire encoders are pure: events in, bytes out, no event loop."""

from __future__ import annotations

import json

import pytest

from server.core.events import (
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
    Usage,
)
from server.wire import NativeNdjsonEncoder, NativeSseEncoder, OpenAIChunkEncoder, StreamDropped
from server.wire.openai import completion
from server.wire.sse import sse_event

IDS = {"run_id": "run_1", "session_id": "s1"}


def completed_run() -> list[RunEvent]:
    return [
        RunStarted(**IDS, seq=0),
        RunDelta(**IDS, seq=1, text="Hello"),
        RunDelta(**IDS, seq=2, text=" world"),
        RunMessage(**IDS, seq=3, text="Hello world"),
        RunCompleted(**IDS, seq=4, usage=Usage(prompt_tokens=2, completion_tokens=2)),
    ]


def data_lines(frame: bytes) -> list[str]:
    return [line[6:] for line in frame.decode().splitlines() if line.startswith("data: ")]


def test_sse_event_splits_multiline_data_and_sets_id() -> None:
    assert (
        sse_event("a\nb", event_id="r:1", event="x") == b"id: r:1\nevent: x\ndata: a\ndata: b\n\n"
    )


def test_openai_chunks_for_a_completed_run() -> None:
    encoder = OpenAIChunkEncoder(created=7, model="m", include_usage=True)
    lines = data_lines(encoder.encode(completed_run()))
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    assert {chunk["id"] for chunk in chunks} == {"chatcmpl-run_1"}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [chunk["choices"][0]["delta"].get("content") for chunk in chunks[1:3]] == [
        "Hello",
        " world",
    ]
    assert chunks[3]["choices"][0]["finish_reason"] == "stop"
    assert chunks[4]["choices"] == [] and chunks[4]["usage"]["total_tokens"] == 4


def test_openai_usage_chunk_only_when_asked() -> None:
    lines = data_lines(OpenAIChunkEncoder(created=7, model="m").encode(completed_run()))
    assert not any('"usage"' in line for line in lines)


@pytest.mark.parametrize(
    ("terminal", "finish_reason", "extra"),
    [
        (
            RunCancelled(**IDS, seq=1, reason=CancelReason.SUPERSEDED),
            "cancelled",
            {"cancel_reason": "superseded"},
        ),
        (
            RunInterrupted(**IDS, seq=1, reason=CancelReason.SHUTDOWN),
            "interrupted",
            {"cancel_reason": "shutdown"},
        ),
        (
            RunFailed(**IDS, seq=1, error=ErrorInfo(code="agent_error", message="It failed.")),
            "error",
            {"error": {"code": "agent_error", "message": "It failed."}},
        ),
    ],
)
def test_openai_abnormal_end_names_why_and_still_sends_done(
    terminal: RunEvent, finish_reason: str, extra: dict[str, object]
) -> None:
    encoder = OpenAIChunkEncoder(created=7, model="m", include_usage=True)
    lines = data_lines(encoder.encode([RunStarted(**IDS, seq=0), terminal]))
    assert lines[-1] == "[DONE]"
    final = json.loads(lines[-2])
    assert final["choices"][0]["finish_reason"] == finish_reason
    assert {key: final[key] for key in extra} == extra


def test_native_sse_has_run_and_seq_id_on_every_event() -> None:
    frame = NativeSseEncoder().encode(completed_run()).decode()
    blocks = [block.splitlines() for block in frame.split("\n\n") if block]
    assert [block[0] for block in blocks] == [f"id: run_1:{seq}" for seq in range(5)]
    assert [block[1] for block in blocks][-1] == "event: run.completed"
    assert json.loads(blocks[1][2][6:]) == {
        "type": "run.delta",
        "run_id": "run_1",
        "session_id": "s1",
        "seq": 1,
        "text": "Hello",
    }


def test_native_ndjson_is_one_object_per_line_with_enums_as_strings() -> None:
    batch = [RunStarted(**IDS, seq=0), RunCancelled(**IDS, seq=1, reason=CancelReason.CLIENT_STOP)]
    lines = NativeNdjsonEncoder().encode(batch).decode().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"type": "run.started", "run_id": "run_1", "session_id": "s1", "seq": 0},
        {
            "type": "run.cancelled",
            "run_id": "run_1",
            "session_id": "s1",
            "seq": 1,
            "reason": "client_stop",
        },
    ]


def test_non_stream_completion_body() -> None:
    events = completed_run()
    terminal = events[-1]
    assert isinstance(terminal, RunCompleted)
    body = completion("run_1", created=7, model="m", text="Hello world", terminal=terminal)
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello world"}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}


def test_delta_text_with_newlines_survives_sse_framing() -> None:
    frame = OpenAIChunkEncoder(created=7, model="m").encode(
        [RunDelta(**IDS, seq=1, text="line one\nline two")]
    )
    (line,) = data_lines(frame)  # JSON escapes the newline: one data line
    assert json.loads(line)["choices"][0]["delta"]["content"] == "line one\nline two"


# --- the closing frame of a reader dropped for slowness ------------------------

DROPPED = StreamDropped(
    **IDS, after=3, error=ErrorInfo(code="slow_reader", message="Too slow; reattach.")
)
DROPPED_OBJECT = {
    "type": "stream.dropped",
    "run_id": "run_1",
    "session_id": "s1",
    "after": 3,
    "error": {"code": "slow_reader", "message": "Too slow; reattach."},
}


def test_native_sse_dropped_frame_is_an_event_without_an_id() -> None:
    # No id: the client's Last-Event-ID stays at the last run event it got.
    assert NativeSseEncoder().dropped(DROPPED) == (
        b"event: stream.dropped\ndata: "
        + json.dumps(DROPPED_OBJECT, separators=(",", ":")).encode()
        + b"\n\n"
    )


def test_native_ndjson_dropped_frame_is_one_line() -> None:
    frame = NativeNdjsonEncoder().dropped(DROPPED)
    assert frame.endswith(b"\n") and frame.count(b"\n") == 1
    assert json.loads(frame) == DROPPED_OBJECT


def test_openai_dropped_frame_is_an_error_chunk_then_done() -> None:
    lines = data_lines(OpenAIChunkEncoder(created=7, model="m").dropped(DROPPED))
    assert lines[-1] == "[DONE]"
    assert json.loads(lines[0]) == {
        "id": "chatcmpl-run_1",
        "object": "chat.completion.chunk",
        "created": 7,
        "model": "m",
        "choices": [{"index": 0, "delta": {}, "finish_reason": "error"}],
        "error": {"code": "slow_reader", "message": "Too slow; reattach."},
    }
    assert len(lines) == 2
