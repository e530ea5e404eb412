"""The asyncio TaskGroup baseline (benchmarks/baselines/asyncio_taskgroup)
behaves like our server on the HTTP subset the comparison drives: real
processes on loopback (the fake upstream and the baseline), a real client.

Asserts outcomes and order, never wall time."""

from __future__ import annotations

import json
import signal
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import httpx2
import pytest
import trio

from tests.fakes import token_text
from tests.integration.harness import (
    LOG_TIMEOUT,
    POLL_INTERVAL,
    FakeUpstreamProcess,
    ServerProcess,
    poll_until,
    running_server,
)

pytestmark = pytest.mark.integration

AUTH = {"Authorization": "Bearer devkey"}

T = TypeVar("T")


class TaskGroupBaselineProcess(ServerProcess):
    module = "benchmarks.baselines.asyncio_taskgroup"


@pytest.fixture(scope="module")
def upstream() -> Iterator[ServerProcess]:
    with running_server("--delay", "0.001", kind=FakeUpstreamProcess) as process:
        yield process
    assert process.proc.returncode == 0, process.log_text(last=50)


@pytest.fixture(scope="module")
def baseline(upstream: ServerProcess) -> Iterator[ServerProcess]:
    args = ("--upstream-url", f"{upstream.url}/v1", "--model", "fake-model")
    with running_server(*args, kind=TaskGroupBaselineProcess) as process:
        yield process
    # SIGTERM ends it cleanly.
    assert process.proc.returncode == 0, process.log_text(last=50)


async def poll_async(probe: Callable[[], Awaitable[T | None]]) -> T:
    """:func:`poll_until` for a probe that asks another process over HTTP
    (the fake upstream's stats), which no trio primitive can wait for."""
    while True:
        result = await probe()
        if result is not None:
            return result
        await trio.sleep(POLL_INTERVAL)


def body(prompt: str) -> dict[str, Any]:
    return {
        "model": "fake-model",
        "stream": True,
        "messages": [{"role": "user", "content": prompt}],
    }


async def read_stream(
    client: httpx2.AsyncClient,
    session_id: str,
    prompt: str,
    frames: list[str],
    first_frame: trio.Event | None = None,
) -> None:
    """POST ``prompt`` and append each SSE ``data:`` payload to ``frames``."""
    headers = {**AUTH, "X-Session-Id": session_id}
    async with client.stream(
        "POST", "/v1/chat/completions", json=body(prompt), headers=headers
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                frames.append(line.removeprefix("data: "))
                if first_frame is not None:
                    first_frame.set()


def chunks(frames: list[str]) -> list[dict[str, Any]]:
    """The chunks before ``[DONE]``, which must be the last frame, once."""
    assert frames[-1] == "[DONE]", frames
    assert frames.count("[DONE]") == 1
    return [json.loads(frame) for frame in frames[:-1]]


def text_of(parsed: list[dict[str, Any]]) -> str:
    return "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in parsed)


def finishes(parsed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [chunk for chunk in parsed if chunk["choices"][0]["finish_reason"] is not None]


async def test_streams_one_answer(baseline: ServerProcess) -> None:
    frames: list[str] = []
    async with httpx2.AsyncClient(base_url=baseline.url, timeout=30.0) as client:
        await read_stream(client, f"one-{uuid.uuid4().hex}", "hello @tokens=5", frames)
    parsed = chunks(frames)
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in parsed)
    assert parsed[0]["choices"][0]["delta"]["role"] == "assistant"
    assert text_of(parsed) == "".join(token_text(index) for index in range(5))
    [final] = finishes(parsed)
    assert final is parsed[-1]
    assert final["choices"][0]["finish_reason"] == "stop"


async def test_supersede_with_upstream_stalled(
    baseline: ServerProcess, upstream: ServerProcess
) -> None:
    session_id = f"sup-{uuid.uuid4().hex}"
    old: list[str] = []
    new: list[str] = []
    async with httpx2.AsyncClient(base_url=baseline.url, timeout=30.0) as client:

        async def upstream_active() -> dict[str, Any] | None:
            stats = (await client.get(f"{upstream.url}/_fake/stats")).json()
            session = stats["sessions"].get(session_id)
            return session if session and session["active"] == 1 else None

        with baseline.deadline(LOG_TIMEOUT, "the supersede to play out"):
            async with trio.open_nursery() as nursery:
                first_frame = trio.Event()
                nursery.start_soon(
                    read_stream, client, session_id, "A @stall_first", old, first_frame
                )
                await first_frame.wait()
                # A's upstream request is open and stalled before its first token.
                await poll_async(upstream_active)
                await read_stream(client, session_id, "B @tokens=3", new)

    # The old stream ends with one final "cancelled" chunk, then [DONE].
    old_chunks = chunks(old)
    assert text_of(old_chunks) == ""
    [old_final] = finishes(old_chunks)
    assert old_final is old_chunks[-1]
    assert old_final["choices"][0]["finish_reason"] == "cancelled"
    assert old_final["cancel_reason"] == "superseded"
    # The new one completes.
    new_chunks = chunks(new)
    assert text_of(new_chunks) == "".join(token_text(index) for index in range(3))
    assert [c["choices"][0]["finish_reason"] for c in finishes(new_chunks)] == ["stop"]

    # The log: cancelled(A) -> end(A) -> prev_stream_finished_cleanly -> start(B).
    run_a = old_chunks[0]["id"].removeprefix("chatcmpl-")
    run_b = new_chunks[0]["id"].removeprefix("chatcmpl-")
    assert run_a != run_b
    with baseline.deadline(LOG_TIMEOUT, "B's stream_end"):
        await poll_until(lambda: baseline.index_of("stream_end", trace=run_b))
    order = [
        baseline.index_of("stream_start", trace=run_a, session=session_id),
        baseline.index_of("stream_cancelled", trace=run_a, reason="superseded"),
        baseline.index_of("stream_end", trace=run_a, status="cancelled"),
        baseline.index_of("prev_stream_finished_cleanly", session=session_id, trace=run_a),
        baseline.index_of("stream_start", trace=run_b, session=session_id),
        baseline.index_of("stream_end", trace=run_b, status="completed"),
    ]
    assert None not in order, baseline.log_text(last=40)
    positions = [index for index in order if index is not None]
    assert positions == sorted(positions), baseline.log_text(last=40)

    # Cancelling A closed its upstream connection; B's request was the second.
    async with httpx2.AsyncClient(timeout=30.0) as client:

        async def disconnected() -> dict[str, Any] | None:
            stats = (await client.get(f"{upstream.url}/_fake/stats")).json()
            session = stats["sessions"][session_id]
            return session if session["disconnected"] == 1 and session["active"] == 0 else None

        with upstream.deadline(LOG_TIMEOUT, "A's upstream connection to close"):
            session = await poll_async(disconnected)
    assert session["requests"] == 2


async def test_sigterm_interrupts_live_streams_and_exits_cleanly(upstream: ServerProcess) -> None:
    args = ("--upstream-url", f"{upstream.url}/v1", "--model", "fake-model")
    session_id = f"term-{uuid.uuid4().hex}"
    frames: list[str] = []
    with running_server(*args, kind=TaskGroupBaselineProcess) as process:
        async with httpx2.AsyncClient(base_url=process.url, timeout=30.0) as client:
            with process.deadline(LOG_TIMEOUT, "the stream to end on SIGTERM"):
                async with trio.open_nursery() as nursery:
                    first_frame = trio.Event()
                    nursery.start_soon(
                        read_stream, client, session_id, "A @stall_first", frames, first_frame
                    )
                    await first_frame.wait()
                    await process.wait_for("stream_start", session=session_id)
                    process.send_signal(signal.SIGTERM)
        assert await process.wait_exit() == 0, process.log_text(last=40)
    parsed = chunks(frames)
    [final] = finishes(parsed)
    assert final is parsed[-1]
    assert final["choices"][0]["finish_reason"] == "interrupted"
    assert final["cancel_reason"] == "shutdown"
    assert process.find("stream_end", status="interrupted")
