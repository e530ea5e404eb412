"""The asyncio registry baseline (benchmarks/baselines/asyncio_registry) runs
and behaves like the design it reproduces: real processes on loopback, the
fake upstream in front of it, outcomes and order asserted (not wall time)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx2
import pytest

from tests.integration.harness import FakeUpstreamProcess, ServerProcess, running_server

pytestmark = pytest.mark.integration

AUTH = {"Authorization": "Bearer devkey"}


class BaselineProcess(ServerProcess):
    module = "benchmarks.baselines.asyncio_registry"


@pytest.fixture(scope="module")
def upstream() -> Iterator[ServerProcess]:
    with running_server("--delay", "0.005", kind=FakeUpstreamProcess) as process:
        yield process
    assert process.proc.returncode == 0, process.log_text(last=50)


@pytest.fixture(scope="module")
def baseline(upstream: ServerProcess) -> Iterator[ServerProcess]:
    with running_server("--upstream-url", f"{upstream.url}/v1", kind=BaselineProcess) as process:
        yield process
    assert process.proc.returncode == 0, process.log_text(last=50)


@pytest.fixture
async def client(baseline: ServerProcess) -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient(base_url=baseline.url, timeout=20.0) as http:
        yield http


def body(prompt: str) -> dict[str, Any]:
    return {
        "model": "fake-model",
        "stream": True,
        "messages": [{"role": "user", "content": prompt}],
    }


async def read_sse(lines: AsyncIterator[str]) -> list[Any]:
    """Every ``data:`` payload up to and including ``[DONE]`` (as the string)."""
    payloads: list[Any] = []
    async for line in lines:
        if not line.startswith("data: "):
            continue
        data = line[len("data: ") :]
        payloads.append(data if data == "[DONE]" else json.loads(data))
        if data == "[DONE]":
            break
    return payloads


def content_of(payloads: list[Any]) -> str:
    return "".join(
        chunk["choices"][0]["delta"].get("content", "")
        for chunk in payloads
        if isinstance(chunk, dict)
    )


def finish_reasons(payloads: list[Any]) -> list[str]:
    return [
        chunk["choices"][0]["finish_reason"]
        for chunk in payloads
        if isinstance(chunk, dict) and chunk["choices"][0]["finish_reason"] is not None
    ]


async def test_streams_one_answer(client: httpx2.AsyncClient, baseline: ServerProcess) -> None:
    headers = {**AUTH, "X-Session-Id": "one-answer"}
    async with client.stream(
        "POST", "/v1/chat/completions", json=body("hi @tokens=5"), headers=headers
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        trace = response.headers["X-Run-Id"]
        payloads = await read_sse(response.aiter_lines())

    assert payloads[0]["object"] == "chat.completion.chunk"
    assert payloads[0]["choices"][0]["delta"]["role"] == "assistant"
    assert content_of(payloads) == "tok0 tok1 tok2 tok3 tok4 "
    assert finish_reasons(payloads) == ["stop"]
    assert payloads[-1] == "[DONE]"
    start = await baseline.wait_for("stream_start", trace=trace, session="one-answer")
    end = await baseline.wait_for("stream_end", trace=trace, status="completed")
    assert start < end


async def test_unauthorised_is_refused(client: httpx2.AsyncClient) -> None:
    response = await client.post(
        "/v1/chat/completions", json=body("hi"), headers={"Authorization": "Bearer nope"}
    )
    assert response.status_code == 401


async def test_supersede_on_stalled_upstream_times_out_and_registers_anyway(
    client: httpx2.AsyncClient, baseline: ServerProcess
) -> None:
    """The old design's behaviour: the superseded run's model call is stuck in
    a blocking read, ``wait_for(prev_task, 2.0)`` times out, the new stream
    is registered anyway and completes; the old response gets no terminal
    frame and its thread keeps the upstream call open."""
    headers = {**AUTH, "X-Session-Id": "stalled"}
    async with client.stream(
        "POST", "/v1/chat/completions", json=body("A @stall_first"), headers=headers
    ) as first:
        trace_a = first.headers["X-Run-Id"]
        lines_a = first.aiter_lines()
        role = json.loads((await anext(lines_a)).removeprefix("data: "))
        assert role["choices"][0]["delta"]["role"] == "assistant"

        async with client.stream(
            "POST", "/v1/chat/completions", json=body("B @tokens=3"), headers=headers
        ) as second:
            assert second.status_code == 200
            trace_b = second.headers["X-Run-Id"]
            payloads_b = await read_sse(second.aiter_lines())

        assert content_of(payloads_b) == "tok0 tok1 tok2 "
        assert finish_reasons(payloads_b) == ["stop"]
        assert payloads_b[-1] == "[DONE]"

        cancelled = await baseline.wait_for("stream_cancelled", trace=trace_a, reason="superseded")
        timed_out = await baseline.wait_for(
            "prev_stream_timeout_on_cancel", session="stalled", trace=trace_a
        )
        start_b = await baseline.wait_for("stream_start", trace=trace_b, session="stalled")
        end_b = await baseline.wait_for("stream_end", trace=trace_b, status="completed")
        assert cancelled < timed_out < start_b < end_b
        assert baseline.index_of("prev_stream_finished_cleanly", trace=trace_a) is None
        # A's generator is parked on its queue: no terminal frame, no stream_end.
        assert baseline.index_of("stream_end", trace=trace_a) is None

        # The superseded call's thread still holds the stalled upstream request.
        stats = (await client.get("/debug/tasks")).json()
        assert set(stats) >= {"asyncio_tasks", "threads", "rss_bytes"}
        assert stats["model_calls_in_flight"] >= 1
        assert stats["threads"] >= 2

    # Only the client leaving ends A's response.
    await baseline.wait_for("stream_end", trace=trace_a, status="cancelled")
