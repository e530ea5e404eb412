"""The fake upstream, driven over real loopback HTTP with httpx2 (the
project's test client; flake8-async's ASYNC127 rules out httpx here).

Time: these tests use the real clock, because the fake is a real socket
server and a jumping clock could fire a timeout while bytes are still in the
kernel. Token delays are tiny; the only waits that cost time are the read
timeouts that prove a stall (``STALL_READ_TIMEOUT``). Timing is asserted
only as a lower bound (``trio.sleep`` never returns early).

Partial reads: abandoning httpx2's async generators mid-stream leaves them to
the garbage collector (a ResourceWarning, an error here). Tests that leave a
stream early either never iterate it (they wait on the fake's side, then
close the response) or stop with :func:`read_lines`, which cancels the read
so the generators unwind.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx2
import pytest
import trio

from tests.fakes import (
    DirectiveError,
    Directives,
    FakeUpstream,
    open_fake_upstream,
    parse_directives,
    token_text,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
PATHS = {"ollama": "/api/chat", "openai": "/v1/chat/completions"}
APIS = list(PATHS)
WAIT = 5.0  # bound on every wait for the fake; never reached when things work
STALL_READ_TIMEOUT = 0.2  # how long "no byte arrives" must last to count as a stall
STALLING = httpx2.Timeout(WAIT, read=STALL_READ_TIMEOUT)


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    async with open_fake_upstream(default_delay=0.001) as upstream:
        yield upstream


@pytest.fixture
async def client(fake: FakeUpstream) -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient(base_url=fake.url, timeout=WAIT) as http:
        yield http


def chat(prompt: str, *, stream: bool = True, **extra: Any) -> dict[str, Any]:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "an earlier question @tokens=1"},
        {"role": "assistant", "content": "tok0"},
        {"role": "user", "content": prompt},
    ]
    return {"model": "m1", "messages": messages, "stream": stream, **extra}


def expected_text(count: int) -> str:
    return "".join(token_text(index) for index in range(count))


def sse_data(lines: list[str]) -> list[str]:
    return [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]


def streamed_text(api: str, lines: list[str]) -> str:
    """The content deltas of a stream, up to the first line that is not a token."""
    text = []
    payloads = [line for line in lines if line] if api == "ollama" else sse_data(lines)
    for payload in payloads:
        try:
            value = json.loads(payload)
        except ValueError:
            break
        if api == "ollama" and not value.get("done", True):
            text.append(value["message"]["content"])
        elif api == "openai" and value.get("choices"):
            text.append(value["choices"][0]["delta"].get("content", ""))
    return "".join(text)


async def read_lines(response: httpx2.Response, *, stop_after: int | None = None) -> list[str]:
    """The body's lines; with ``stop_after``, the first that many non-empty
    ones, stopping by cancelling the read (see the module docstring)."""
    lines: list[str] = []
    with trio.CancelScope() as reading:
        async for line in response.aiter_lines():
            if reading.cancel_called:
                continue  # lines httpx2 had already buffered
            lines.append(line)
            if stop_after is not None and len([line for line in lines if line]) == stop_after:
                reading.cancel()
    return lines


# --- directives (pure) ---------------------------------------------------


def test_directives_are_read_from_words_in_the_prompt() -> None:
    directives = parse_directives("hi @tokens=50 @delay=0.02 mail a@b.c @session=s1 @stall_after=3")
    assert directives == Directives(tokens=50, delay=0.02, session="s1", stall_after=3)
    assert directives.fault == "stall_after"
    assert directives.tokens_before_fault == 3
    assert parse_directives("@tokens=2 @close_after=9").tokens_before_fault == 2
    assert parse_directives("plain prompt") == Directives()


@pytest.mark.parametrize(
    "prompt",
    [
        "@nonsense",
        "@tokens",
        "@tokens=many",
        "@tokens=-1",
        "@delay=nan",
        "@status=200",
        "@stall_first=1",
        "@tokens=1 @tokens=2",
        "@stall_first @close_after=2",
    ],
)
def test_bad_directives_are_refused(prompt: str) -> None:
    with pytest.raises(DirectiveError):
        parse_directives(prompt)


# --- normal replies ------------------------------------------------------


async def test_ollama_stream_sends_one_line_per_token_then_done(
    fake: FakeUpstream, client: httpx2.AsyncClient
) -> None:
    async with client.stream("POST", "/api/chat", json=chat("hello @tokens=3")) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) for line in await read_lines(response) if line]

    assert [line["message"] for line in lines[:3]] == [
        {"role": "assistant", "content": token_text(index)} for index in range(3)
    ]
    assert [line["done"] for line in lines] == [False, False, False, True]
    assert all(line["model"] == "m1" and line["created_at"] for line in lines)
    assert lines[-1]["message"] == {"role": "assistant", "content": ""}
    assert lines[-1]["done_reason"] == "stop"
    assert (lines[-1]["prompt_eval_count"], lines[-1]["eval_count"]) == (9, 3)
    [record] = fake.requests
    assert (record.api, record.prompt, record.tokens_sent) == ("ollama", "hello @tokens=3", 3)
    assert record.finished and record.status == 200


async def test_ollama_streams_unless_told_otherwise(client: httpx2.AsyncClient) -> None:
    body = chat("@tokens=2")
    del body["stream"]
    response = await client.post("/api/chat", json=body)
    assert len(response.text.splitlines()) == 3


async def test_ollama_without_stream_answers_one_object(
    fake: FakeUpstream, client: httpx2.AsyncClient
) -> None:
    response = await client.post("/api/chat", json=chat("@tokens=4", stream=False))
    assert response.headers["content-type"] == "application/json"
    reply = response.json()
    assert reply["message"] == {"role": "assistant", "content": expected_text(4)}
    assert (reply["done"], reply["done_reason"], reply["eval_count"]) == (True, "stop", 4)
    assert fake.requests[0].finished


@pytest.mark.parametrize("include_usage", [False, True])
async def test_openai_stream_sends_role_then_deltas_then_stop_then_done(
    fake: FakeUpstream, client: httpx2.AsyncClient, include_usage: bool
) -> None:
    body = chat("hi @tokens=3", stream_options={"include_usage": include_usage})
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"] == "text/event-stream"
        data = sse_data(await read_lines(response))

    assert data[-1] == "[DONE]"
    chunks = [json.loads(payload) for payload in data[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert len({chunk["id"] for chunk in chunks}) == 1
    choices = [chunk["choices"] for chunk in chunks]
    assert choices[0][0]["delta"] == {"role": "assistant", "content": ""}
    assert [choice[0]["delta"] for choice in choices[1:4]] == [
        {"content": token_text(index)} for index in range(3)
    ]
    assert choices[4][0]["delta"] == {} and choices[4][0]["finish_reason"] == "stop"
    if include_usage:
        assert choices[5:] == [[]]
        assert chunks[-1]["usage"] == {
            "prompt_tokens": 9,
            "completion_tokens": 3,
            "total_tokens": 12,
        }
    else:
        assert len(chunks) == 5 and "usage" not in chunks[-1]
    assert fake.requests[0].finished


async def test_openai_without_stream_answers_a_chat_completion(client: httpx2.AsyncClient) -> None:
    response = await client.post("/v1/chat/completions", json=chat("@tokens=2", stream=False))
    reply = response.json()
    assert reply["object"] == "chat.completion"
    assert reply["choices"][0]["message"]["content"] == expected_text(2)
    assert reply["choices"][0]["finish_reason"] == "stop"
    assert reply["usage"]["completion_tokens"] == 2


async def test_openai_lists_the_fake_model(client: httpx2.AsyncClient) -> None:
    response = await client.get("/v1/models")
    assert [model["id"] for model in response.json()["data"]] == ["fake-model"]


async def test_default_reply_has_twenty_tokens(client: httpx2.AsyncClient) -> None:
    response = await client.post("/api/chat", json=chat("hello", stream=False))
    assert response.json()["message"]["content"] == expected_text(20)


@pytest.mark.parametrize("api", APIS)
async def test_delay_is_paid_before_every_token(
    fake: FakeUpstream, client: httpx2.AsyncClient, api: str
) -> None:
    response = await client.post(PATHS[api], json=chat("@tokens=3 @delay=0.02"))
    assert streamed_text(api, response.text.splitlines()) == expected_text(3)
    [record] = fake.requests
    assert record.ended_at is not None
    assert record.ended_at - record.started_at >= 3 * 0.02


@pytest.mark.parametrize("api", APIS)
async def test_unusable_requests_get_a_400_in_the_api_shape(
    fake: FakeUpstream, client: httpx2.AsyncClient, api: str
) -> None:
    typo = await client.post(PATHS[api], json=chat("@tokenz=3"))
    no_user = await client.post(PATHS[api], json={"messages": [{"role": "system"}]})
    not_json = await client.post(PATHS[api], content=b"{")

    for response in (typo, no_user, not_json):
        assert response.status_code == 400
        error = response.json()["error"]
        message = error if api == "ollama" else error["message"]
        assert isinstance(message, str) and message
    assert "unknown directive @tokenz" in typo.text
    assert [record.status for record in fake.requests] == [400, 400, 400]


# --- scripted faults -----------------------------------------------------


@pytest.mark.parametrize("api", APIS)
async def test_stall_first_sends_headers_and_no_body_until_the_client_leaves(
    fake: FakeUpstream, client: httpx2.AsyncClient, api: str
) -> None:
    body = chat("@stall_first")
    async with client.stream("POST", PATHS[api], json=body, timeout=STALLING) as response:
        assert response.status_code == 200
        with pytest.raises(httpx2.ReadTimeout):
            await response.aread()
        [record] = fake.requests
        assert not record.ended

    with trio.fail_after(WAIT):
        await fake.wait_disconnected(record)
    assert (record.status, record.tokens_sent) == (200, 0)


@pytest.mark.parametrize("api", APIS)
async def test_stall_headers_never_answers(
    fake: FakeUpstream, client: httpx2.AsyncClient, api: str
) -> None:
    with pytest.raises(httpx2.ReadTimeout):
        await client.post(PATHS[api], json=chat("@stall_headers"), timeout=STALLING)

    with trio.fail_after(WAIT):
        await fake.wait_disconnected(fake.requests[0])
    assert fake.requests[0].status is None


@pytest.mark.parametrize("api", APIS)
async def test_stall_after_streams_that_many_tokens_then_nothing(
    fake: FakeUpstream, client: httpx2.AsyncClient, api: str
) -> None:
    lines: list[str] = []
    body = chat("@stall_after=2 @delay=0")
    async with client.stream("POST", PATHS[api], json=body, timeout=STALLING) as response:
        with pytest.raises(httpx2.ReadTimeout):
            async for line in response.aiter_lines():
                lines.append(line)

    assert streamed_text(api, lines) == expected_text(2)
    assert "[DONE]" not in lines and not any('"done":true' in line for line in lines)
    with trio.fail_after(WAIT):
        await fake.wait_disconnected(fake.requests[0])
    assert fake.requests[0].tokens_sent == 2


@pytest.mark.parametrize("status", [400, 429, 500, 503])
@pytest.mark.parametrize("api", APIS)
async def test_status_answers_that_code_with_an_error_in_the_api_shape(
    fake: FakeUpstream, client: httpx2.AsyncClient, api: str, status: int
) -> None:
    response = await client.post(PATHS[api], json=chat(f"@status={status}"))
    assert response.status_code == status
    error = response.json()["error"]
    if api == "ollama":
        assert isinstance(error, str)
    else:
        assert set(error) >= {"message", "type", "code"}
    assert fake.requests[0].finished and fake.requests[0].status == status


async def test_ollama_error_after_sends_an_error_line_and_ends(client: httpx2.AsyncClient) -> None:
    response = await client.post("/api/chat", json=chat("@error_after=2"))
    lines = response.text.splitlines()
    assert streamed_text("ollama", lines) == expected_text(2)
    assert len(lines) == 3 and json.loads(lines[-1]) == {"error": "model crashed"}


async def test_openai_error_after_sends_an_error_event_and_no_done(
    client: httpx2.AsyncClient,
) -> None:
    response = await client.post("/v1/chat/completions", json=chat("@error_after=2"))
    lines = response.text.splitlines()
    assert streamed_text("openai", lines) == expected_text(2)
    assert lines[-3] == "event: error"
    assert json.loads(lines[-2].removeprefix("data: "))["error"]["message"] == "model crashed"
    assert "data: [DONE]" not in lines


@pytest.mark.parametrize("api", APIS)
async def test_malformed_after_sends_a_line_that_is_not_json(
    fake: FakeUpstream, client: httpx2.AsyncClient, api: str
) -> None:
    response = await client.post(PATHS[api], json=chat("@malformed_after=1"))
    lines = response.text.splitlines()
    assert streamed_text(api, lines) == expected_text(1)
    last = [line for line in lines if line][-1]
    with pytest.raises(ValueError):
        json.loads(last.removeprefix("data: "))
    assert fake.requests[0].finished


@pytest.mark.parametrize("api", APIS)
async def test_without_stream_error_after_is_a_500_and_malformed_after_is_not_json(
    fake: FakeUpstream, client: httpx2.AsyncClient, api: str
) -> None:
    error = await client.post(PATHS[api], json=chat("@error_after=1", stream=False))
    malformed = await client.post(PATHS[api], json=chat("@malformed_after=1", stream=False))

    assert error.status_code == 500
    assert "model crashed" in json.dumps(error.json()["error"])
    assert malformed.status_code == 200
    with pytest.raises(ValueError):
        malformed.json()
    assert [record.outcome for record in fake.requests] == ["finished", "finished"]


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("api", APIS)
async def test_close_after_breaks_the_connection_mid_body(
    fake: FakeUpstream, client: httpx2.AsyncClient, api: str, stream: bool
) -> None:
    lines: list[str] = []
    body = chat("@close_after=2", stream=stream)
    async with client.stream("POST", PATHS[api], json=body) as response:
        assert response.status_code == 200
        with pytest.raises(httpx2.RemoteProtocolError, match=r"incomplete|complete message body"):
            async for line in response.aiter_lines():
                lines.append(line)

    if stream:
        assert streamed_text(api, lines) == expected_text(2)
    [record] = fake.requests
    assert (record.outcome, record.tokens_sent) == ("closed", 2)


# --- auth ----------------------------------------------------------------


async def test_openai_routes_require_the_key_when_one_is_set() -> None:
    async with (
        open_fake_upstream(api_key="sk-test", default_delay=0) as fake,
        httpx2.AsyncClient(base_url=fake.url, timeout=WAIT) as client,
    ):
        missing = await client.get("/v1/models")
        wrong = await client.post(
            "/v1/chat/completions", json=chat("hi"), headers={"Authorization": "Bearer sk-no"}
        )
        right = await client.post(
            "/v1/chat/completions", json=chat("hi"), headers={"Authorization": "Bearer sk-test"}
        )
        ollama = await client.post("/api/chat", json=chat("hi"))

    for refused in (missing, wrong):
        assert refused.status_code == 401
        assert set(refused.json()["error"]) >= {"message", "type", "code"}
    assert (right.status_code, ollama.status_code) == (200, 200)
    assert len(fake.requests) == 2  # refused requests never reach the registry


# --- observability -------------------------------------------------------


@pytest.mark.parametrize("api", APIS)
async def test_client_closing_mid_stream_is_recorded_as_a_disconnect(
    fake: FakeUpstream, client: httpx2.AsyncClient, api: str
) -> None:
    async with client.stream("POST", PATHS[api], json=chat("@tokens=100000")) as response:
        assert response.status_code == 200
        with trio.fail_after(WAIT):
            record = await fake.wait_for_request(lambda record: record.tokens_sent >= 3)
        assert not record.ended

    with trio.fail_after(WAIT):
        await fake.wait_disconnected(record)
    assert 3 <= record.tokens_sent < 100000
    assert fake.active == 0
    assert (fake.stats()["disconnected"], fake.stats()["finished"]) == (1, 0)


async def test_reading_part_of_a_stream_then_leaving_is_a_disconnect(
    fake: FakeUpstream, client: httpx2.AsyncClient
) -> None:
    async with client.stream("POST", "/api/chat", json=chat("@tokens=100000")) as response:
        lines = await read_lines(response, stop_after=2)
    assert streamed_text("ollama", lines) == expected_text(2)
    with trio.fail_after(WAIT):
        await fake.wait_disconnected(fake.requests[0])


async def test_wait_disconnected_fails_fast_for_a_request_that_finished(
    fake: FakeUpstream, client: httpx2.AsyncClient
) -> None:
    await client.post("/api/chat", json=chat("@tokens=1"))
    with trio.fail_after(WAIT), pytest.raises(AssertionError, match="ended finished"):
        await fake.wait_disconnected(fake.requests[0])


async def test_overlapping_streams_of_one_session_are_counted(
    fake: FakeUpstream, client: httpx2.AsyncClient
) -> None:
    # Session "a": two streams open at once. Session "b" (tagged by header):
    # two streams one after the other.
    endless = chat("@session=a @tokens=100000")
    async with client.stream("POST", "/api/chat", json=endless) as first:
        with trio.fail_after(WAIT):
            await fake.wait_for_request(lambda record: record.tokens_sent >= 1)
        async with client.stream("POST", "/v1/chat/completions", json=endless) as second:
            with trio.fail_after(WAIT):
                await fake.wait_for_request(
                    lambda record: record.api == "openai" and record.tokens_sent >= 1
                )
            assert fake.stats()["sessions"]["a"]["active"] == 2
            assert (first.status_code, second.status_code) == (200, 200)
    for _ in range(2):
        await client.post("/api/chat", json=chat("@tokens=1"), headers={"X-Session-Id": "b"})
    with trio.fail_after(WAIT):
        await fake.wait_idle()

    sessions = fake.stats()["sessions"]
    assert sessions["a"] == {
        "active": 0,
        "max_concurrency": 2,
        "overlaps": 1,
        "requests": 2,
        "disconnected": 2,
    }
    assert sessions["b"] == {
        "active": 0,
        "max_concurrency": 1,
        "overlaps": 0,
        "requests": 2,
        "disconnected": 0,
    }
    assert fake.stats()["max_active"] == 2


async def test_stats_and_reset_over_http(fake: FakeUpstream, client: httpx2.AsyncClient) -> None:
    await client.post("/api/chat", json=chat("@tokens=1 @session=s"))
    stats = (await client.get("/_fake/stats")).json()
    assert (stats["total"], stats["finished"], stats["active"]) == (1, 1, 0)
    assert stats["requests"][0]["outcome"] == "finished"
    assert stats["sessions"]["s"]["requests"] == 1

    assert (await client.post("/_fake/reset")).json() == {"ok": True}
    stats = (await client.get("/_fake/stats")).json()
    assert (stats["total"], stats["max_active"], stats["sessions"]) == (0, 0, {})


async def test_closing_the_fake_ends_stalled_requests() -> None:
    responses: list[httpx2.Response] = []

    async def stalled_request(url: str) -> None:
        responses.append(await client.post(f"{url}/api/chat", json=chat("@stall_headers")))

    fake = FakeUpstream()
    async with httpx2.AsyncClient(timeout=WAIT) as client, trio.open_nursery() as nursery:
        await nursery.start(fake.serve)
        nursery.start_soon(stalled_request, fake.url)
        with trio.fail_after(WAIT):
            record = await fake.wait_for_request()
        fake.close()
    # serve() returned, so every handler and connection is gone.
    assert record.outcome == "shutdown"
    # hypercorn's answer for a handler that ended without answering
    assert [response.status_code for response in responses] == [500]


# --- as a process --------------------------------------------------------

_LISTENING = re.compile(rb"listening url=(?P<url>http://\S+)\n")


async def test_runs_as_a_process_that_serves_stats_and_stops_on_sigterm() -> None:
    command = [sys.executable, "-m", "tests.fakes.upstream", "--port", "0", "--delay", "0"]
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(
            partial(trio.run_process, command, cwd=REPO_ROOT, stderr=subprocess.PIPE, check=False)
        )
        assert process.stderr is not None
        async with process.stderr as stderr:
            output = b""
            with trio.fail_after(20):  # a cold interpreter start
                while (match := _LISTENING.search(output)) is None:
                    chunk = await stderr.receive_some()
                    assert chunk, f"exited before listening: {output!r}"
                    output += chunk
            url = match["url"].decode()

            async with httpx2.AsyncClient(base_url=url, timeout=WAIT) as client:
                await client.post("/api/chat", json=chat("@tokens=2 @session=bench"))
                stats = (await client.get("/_fake/stats")).json()
            assert (stats["total"], stats["finished"]) == (1, 1)
            assert stats["sessions"]["bench"]["max_concurrency"] == 1

            process.terminate()
            with trio.fail_after(WAIT):
                while chunk := await stderr.receive_some():
                    output += chunk
                assert await process.wait() == 0
    assert output == match.group(0), output.decode(errors="replace")
