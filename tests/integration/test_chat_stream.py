"""One run, read over the wire: OpenAI chunks, native events, disconnects."""

from __future__ import annotations

import json
from contextlib import aclosing

import httpx2
import pytest
import trio

from .harness import REPLY_WORDS, ServerProcess
from .wire import (
    CHAT_PATH,
    DONE,
    ChatStream,
    auth,
    chat_body,
    iter_sse,
    read_then_hang_up,
    stream_chat,
)

pytestmark = pytest.mark.integration


async def test_stream_ends_with_stop_then_done(client: httpx2.AsyncClient) -> None:
    stream = await stream_chat(client, "tell me about structured concurrency")

    assert stream.run_id.startswith("run_")
    assert stream.session_id
    assert stream.ids == {f"chatcmpl-{stream.run_id}"}
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in stream.chunks)
    assert stream.chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert stream.finish_reason == "stop"
    assert stream.text.startswith("You said: tell me about")
    assert len(stream.text.split()) == REPLY_WORDS
    assert stream.done
    assert stream.events_after_done == 0


async def test_client_disconnect_cancels_the_run(server: ServerProcess) -> None:
    body = chat_body("I will hang up early", stream=True)
    headers = await read_then_hang_up(server.url, body, auth(), events=3)
    run_id = headers["x-run-id"]

    end = await server.wait_for("stream_end", trace=run_id)
    cancelled = server.index_of("stream_cancelled", trace=run_id, reason="client_disconnect")
    assert cancelled is not None and cancelled < end, server.log_text(last=50)
    assert server.lifecycle()[end].fields["status"] == "cancelled"


async def test_concurrent_requests_without_session_all_complete(
    client: httpx2.AsyncClient,
) -> None:
    results: dict[int, ChatStream] = {}

    async def one(index: int) -> None:
        await trio.sleep(0.05 * index)
        results[index] = await stream_chat(client, f"anonymous prompt number {index}")

    async with trio.open_nursery() as nursery:
        for index in range(5):
            nursery.start_soon(one, index)

    assert sorted(results) == list(range(5))
    assert [stream.finish_reason for stream in results.values()] == ["stop"] * 5
    assert all(stream.done for stream in results.values())
    assert len({stream.run_id for stream in results.values()}) == 5
    assert len({stream.session_id for stream in results.values()}) == 5


async def test_ndjson_gives_native_events_with_gap_free_seq(client: httpx2.AsyncClient) -> None:
    headers = {**auth(), "Accept": "application/x-ndjson"}
    body = {"prompt": "native events please"}
    async with client.stream("POST", CHAT_PATH, json=body, headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        run_id = response.headers["X-Run-Id"]
        session_id = response.headers["X-Session-Id"]
        events = [json.loads(line) async for line in response.aiter_lines() if line.strip()]

    types = [event["type"] for event in events]
    assert types[0] == "run.started"
    assert types[-2:] == ["run.message", "run.completed"]
    assert set(types[1:-2]) == {"run.delta"}
    assert [event["seq"] for event in events] == list(range(len(events)))
    assert {(event["run_id"], event["session_id"]) for event in events} == {(run_id, session_id)}
    deltas = "".join(event["text"] for event in events if event["type"] == "run.delta")
    assert events[-2]["text"] == deltas
    assert deltas.startswith("You said: native events please")
    assert events[-1]["usage"]["completion_tokens"] == REPLY_WORDS


async def test_events_over_sse_carry_run_id_and_seq_as_event_id(
    client: httpx2.AsyncClient,
) -> None:
    headers = {**auth(), "X-Stream-Format": "events"}
    body = chat_body("native events over sse", stream=True)
    async with client.stream("POST", CHAT_PATH, json=body, headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        run_id = response.headers["X-Run-Id"]
        async with aclosing(iter_sse(response)) as sse:
            received = [event async for event in sse]

    assert DONE not in [event.data for event in received]
    events = [json.loads(event.data) for event in received]
    assert [event.id for event in received] == [f"{run_id}:{seq}" for seq in range(len(events))]
    assert [event["seq"] for event in events] == list(range(len(events)))
    assert [event.event for event in received] == [event["type"] for event in events]
    assert events[0]["type"] == "run.started"
    assert events[-1]["type"] == "run.completed"
