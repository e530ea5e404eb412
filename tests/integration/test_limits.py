"""Every limit against the real server: the status, the JSON error body (and
``Retry-After`` where it applies), and the server still serving afterwards.

Also hosts :func:`big_agent`, the ``--agent`` of the slow-reader test's
server (a module:factory agent, as an operator's own would be)."""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import attrs
import httpx2
import pytest
import trio

from server.core.agent import AgentRequest
from server.core.events import AgentOutput, TextDelta
from server.settings import Settings

from .harness import ServerProcess, running_server
from .wire import CHAT_PATH, auth, chat_body, stream_chat

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Runs of about five seconds: long enough to hold open while a test pushes
# against a limit.
SLOW_REPLY = ("--token-delay", "0.05", "--reply-words", "100")
# Where a test only needs answers, not runs held open: 100 words in 0.2 s.
QUICK_REPLY = ("--token-delay", "0.002", "--reply-words", "100")


def new_session_id() -> str:
    return f"lim-{uuid.uuid4().hex[:12]}"


def assert_json_error(
    response: httpx2.Response, status: int, code: str, *, retry_after: bool = False
) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in response.text
    if retry_after:
        assert int(response.headers["Retry-After"]) >= 1
    return error


async def assert_still_serves(url: str, key: str = "devkey") -> None:
    async with httpx2.AsyncClient(base_url=url, timeout=30.0) as client:
        ready = await client.get("/readyz")
        assert ready.status_code == 200, ready.text
        stream = await stream_chat(client, "still there?", key=key)
        assert stream.done and stream.final


async def post_chat(
    client: httpx2.AsyncClient,
    prompt: str = "hello",
    *,
    key: str = "devkey",
    session_id: str | None = None,
    **extra: Any,
) -> httpx2.Response:
    headers = auth(key)
    if session_id is not None:
        headers["X-Session-Id"] = session_id
    return await client.post(CHAT_PATH, json=chat_body(prompt, **extra), headers=headers)


@asynccontextmanager
async def open_reader(
    url: str,
    method: str,
    path: str,
    headers: Mapping[str, str],
    body: Mapping[str, Any] | None = None,
    *,
    receive_buffer: int | None = None,
) -> AsyncIterator[dict[str, str]]:
    """A bare-socket request whose response head is read and whose body is
    then left unread until the block ends: a reader that holds a stream
    open, or (with a small ``receive_buffer``) one that stopped reading. The
    response headers, lower-case names, and ``:status``."""
    target = httpx2.URL(url)
    assert target.host and target.port is not None
    payload = json.dumps(body).encode() if body is not None else b""
    head = [
        f"{method} {path} HTTP/1.1",
        f"Host: {target.host}:{target.port}",
        "Content-Type: application/json",
        f"Content-Length: {len(payload)}",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    sock = trio.socket.socket()
    if receive_buffer is not None:
        # Before connecting, so the advertised window is small from the start.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    await sock.connect((target.host, target.port))
    async with trio.SocketStream(sock) as stream:
        await stream.send_all(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
        received = b""
        while b"\r\n\r\n" not in received:
            data = await stream.receive_some(1024)
            assert data, f"server closed the connection early: {received!r}"
            received += data
        status_line, *lines = received.partition(b"\r\n\r\n")[0].decode().split("\r\n")
        headers_seen = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in lines)
        }
        yield {":status": status_line.split()[1], **headers_seen}


async def wait_ended(
    client: httpx2.AsyncClient, run_id: str, key: str = "devkey"
) -> dict[str, Any]:
    """The run's record once it has a terminal status (polled: the run lives
    in another process)."""
    with trio.fail_after(20):
        while True:
            response = await client.get(f"/v1/runs/{run_id}", headers=auth(key))
            record: dict[str, Any] = response.json()
            if record["status"] != "running":
                return record
            await trio.sleep(0.05)


# --- request size ------------------------------------------------------------


async def test_prompt_over_the_character_limit_gets_413(server: ServerProcess) -> None:
    limit = Settings().max_prompt_chars
    async with httpx2.AsyncClient(base_url=server.url, timeout=30.0) as client:
        response = await post_chat(client, "a" * (limit + 1))
        error = assert_json_error(response, 413, "prompt_too_large")
        assert str(limit) in error["message"]
        # Counted over every message, not just the prompt.
        half = "b" * (limit // 2 + 1)
        messages = [{"role": "system", "content": half}, {"role": "user", "content": half}]
        response = await client.post(CHAT_PATH, json={"messages": messages}, headers=auth())
        assert_json_error(response, 413, "prompt_too_large")
        assert "X-Run-Id" not in response.headers
    await assert_still_serves(server.url)


async def test_chunked_body_over_the_limit_gets_413(server: ServerProcess) -> None:
    """Without a Content-Length the limit holds while the body streams in."""
    limit = Settings().max_body_bytes

    async def body() -> AsyncIterator[bytes]:  # noqa: ASYNC124  (httpx2 streams async iterables)
        yield b'{"prompt": "'
        for _ in range(limit // 65536 + 2):
            yield b"a" * 65536
        yield b'"}'

    async with httpx2.AsyncClient(base_url=server.url, timeout=30.0) as client:
        response = await client.post(
            CHAT_PATH, content=body(), headers={**auth(), "Content-Type": "application/json"}
        )
        assert_json_error(response, 413, "payload_too_large")
        assert response.headers["Connection"] == "close"
    await assert_still_serves(server.url)


async def test_too_many_messages_gets_413(server: ServerProcess) -> None:
    limit = Settings().max_messages
    messages = [{"role": "user", "content": "hi"}] * (limit + 1)
    async with httpx2.AsyncClient(base_url=server.url, timeout=30.0) as client:
        response = await client.post(CHAT_PATH, json={"messages": messages}, headers=auth())
        error = assert_json_error(response, 413, "too_many_messages")
        assert str(limit) in error["message"]
        at_limit = await client.post(CHAT_PATH, json={"messages": messages[:limit]}, headers=auth())
        assert at_limit.status_code == 200, at_limit.text
    await assert_still_serves(server.url)


async def send_head(url: str, header_bytes: int, *, complete: bool = True) -> tuple[int, bytes]:
    """A request with one header of ``header_bytes`` (``complete=False``:
    the head never ends): the response's status and the body that came with
    its head."""
    target = httpx2.URL(url)
    assert target.host and target.port is not None
    head = f"GET /healthz HTTP/1.1\r\nHost: {target.host}\r\nX-Padding: {'p' * header_bytes}"
    if complete:
        head += "\r\n\r\n"
    received = b""
    async with await trio.open_tcp_stream(target.host, target.port) as stream:
        with trio.fail_after(10):
            await stream.send_all(head.encode())
            while b"\r\n\r\n" not in received or (
                b"application/json" in received and not received.rstrip().endswith(b"}")
            ):
                data = await stream.receive_some()
                assert data, received
                received += data
    status_line, _, rest = received.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


async def test_oversized_headers_get_431_and_the_server_keeps_serving(
    server: ServerProcess,
) -> None:
    """A head that reaches the app whole gets our JSON 431; one that
    Hypercorn cannot complete within the limit gets Hypercorn's own bare 431
    before the app sees anything. Either way the connection closes and the
    server goes on."""
    limit = Settings().max_header_bytes
    status, body = await send_head(server.url, limit + 4096)
    assert status == 431
    assert json.loads(body)["error"]["code"] == "headers_too_large"
    status, body = await send_head(server.url, limit + 4096, complete=False)
    assert (status, body) == (431, b"")
    assert (await send_head(server.url, limit // 2))[0] == 200
    await assert_still_serves(server.url)


# --- sessions ----------------------------------------------------------------


async def test_sessions_per_key_and_in_total_get_429_and_body_size_is_configurable() -> None:
    with running_server(
        *QUICK_REPLY,
        "--api-key",
        "k1",
        "--api-key",
        "k2",
        "--max-sessions-per-key",
        "2",
        "--max-sessions",
        "3",
        "--max-body-bytes",
        "2000",
    ) as server:
        async with httpx2.AsyncClient(base_url=server.url, timeout=30.0) as client:
            mine = [new_session_id(), new_session_id()]
            for session_id in mine:
                assert (await post_chat(client, key="k1", session_id=session_id)).status_code == 200
            response = await post_chat(client, key="k1", session_id=new_session_id())
            error = assert_json_error(response, 429, "too_many_sessions", retry_after=True)
            assert "API key" in error["message"]
            # Without a session id a request is a session too.
            assert_json_error(await post_chat(client, key="k1"), 429, "too_many_sessions")
            # An open session still takes prompts.
            assert (await post_chat(client, key="k1", session_id=mine[0])).status_code == 200

            assert (await post_chat(client, key="k2", session_id="b1")).status_code == 200
            response = await post_chat(client, key="k2", session_id="b2")
            error = assert_json_error(response, 429, "too_many_sessions", retry_after=True)
            assert "server" in error["message"]

            too_big = await client.post(
                CHAT_PATH,
                content=json.dumps(chat_body("x" * 3000)),
                headers={**auth("k2"), "Content-Type": "application/json"},
            )
            assert_json_error(too_big, 413, "payload_too_large")
        async with httpx2.AsyncClient(base_url=server.url, timeout=30.0) as client:
            stream = await stream_chat(client, "still there?", session_id="b1", key="k2")
            assert stream.finish_reason == "stop"


# --- concurrent runs and readers ---------------------------------------------


async def test_concurrent_runs_per_key_and_in_total_and_readers_per_run_get_429() -> None:
    with running_server(
        *SLOW_REPLY,
        "--api-key",
        "k1",
        "--api-key",
        "k2",
        "--max-runs-per-key",
        "2",
        "--max-runs",
        "3",
        "--max-subscribers",
        "2",
    ) as server:
        async with httpx2.AsyncClient(base_url=server.url, timeout=30.0) as client:
            # Runs that go on without their requester (on_disconnect=continue):
            # nothing holds them but the limit under test.
            runs: dict[str, str] = {}
            for key, session_id in (("k1", "a1"), ("k1", "a2"), ("k2", "b1")):
                async with open_reader(
                    server.url,
                    "POST",
                    CHAT_PATH,
                    {**auth(key), "X-Session-Id": session_id},
                    chat_body("go on", stream=True, on_disconnect="continue"),
                ) as head:
                    assert head[":status"] == "200"
                    runs[session_id] = head["x-run-id"]

            response = await post_chat(client, key="k1", session_id="a3")
            error = assert_json_error(response, 429, "too_many_runs", retry_after=True)
            assert "API key" in error["message"]
            response = await post_chat(client, key="k2", session_id="b2")
            error = assert_json_error(response, 429, "too_many_runs", retry_after=True)
            assert "server" in error["message"]
            # A refused prompt made no session.
            missing = await client.get("/v1/sessions/a3", headers=auth("k1"))
            assert_json_error(missing, 404, "session_not_found")

            # Readers per run: two may watch, a third is refused.
            events_path = f"/v1/runs/{runs['a1']}/events"
            async with open_reader(server.url, "GET", events_path, auth("k1")) as first:
                async with open_reader(server.url, "GET", events_path, auth("k1")) as second:
                    assert first[":status"] == second[":status"] == "200"
                    third = await client.get(events_path, headers=auth("k1"))
                    assert_json_error(third, 429, "too_many_subscribers", retry_after=True)

            # Once a run ends there is room again.
            stopped = await client.post(f"/v1/runs/{runs['a1']}/cancel", headers=auth("k1"))
            assert stopped.json()["status"] == "cancelled"
            async with open_reader(
                server.url,
                "POST",
                CHAT_PATH,
                {**auth("k1"), "X-Session-Id": "a3"},
                chat_body("room again", stream=True, on_disconnect="continue"),
            ) as head:
                assert head[":status"] == "200"
                runs["a3"] = head["x-run-id"]
            for session_id, run_id in runs.items():
                key = "k2" if session_id.startswith("b") else "k1"
                await client.post(f"/v1/runs/{run_id}/cancel", headers=auth(key))
        await assert_still_serves(server.url, key="k2")


# --- the run deadline and the run log ---------------------------------------


async def test_run_timeout_interrupts_the_run_with_reason_deadline() -> None:
    with running_server(*SLOW_REPLY, "--run-timeout", "0.5") as server:
        async with httpx2.AsyncClient(base_url=server.url, timeout=30.0) as client:
            stream = await stream_chat(client, "take your time")
            assert stream.finish_reason == "interrupted", stream.final
            assert stream.final["cancel_reason"] == "deadline"
            assert stream.done
            record = (await client.get(f"/v1/runs/{stream.run_id}", headers=auth())).json()
            assert (record["status"], record["cancel_reason"]) == ("interrupted", "deadline")
            await server.wait_for("stream_cancelled", trace=stream.run_id, reason="deadline")
            await server.wait_for("stream_end", trace=stream.run_id, status="interrupted")

            # Non-streaming: 200 with the partial text, like any interrupted run.
            response = await post_chat(client, "again")
            assert response.status_code == 200
            assert response.json()["choices"][0]["finish_reason"] == "interrupted"
            assert response.json()["cancel_reason"] == "deadline"
        await assert_still_serves(server.url)


@pytest.mark.parametrize(
    "limit",
    [("--max-run-bytes", "200"), ("--max-run-events", "10", "--coalesce-ms", "0")],
    ids=["bytes", "events"],
)
async def test_a_run_past_its_log_limit_ends_failed_with_run_too_large(
    limit: tuple[str, ...],
) -> None:
    with running_server(*QUICK_REPLY, *limit) as server:
        async with httpx2.AsyncClient(base_url=server.url, timeout=30.0) as client:
            stream = await stream_chat(client, "say a lot")
            assert stream.finish_reason == "error", stream.final
            assert stream.final["error"]["code"] == "run_too_large"
            if limit[0] == "--max-run-bytes":
                assert len(stream.text.encode()) <= 200
            else:  # run.started, deltas, run.failed: at most 10 events
                assert len(stream.chunks) <= 10
            record = (await client.get(f"/v1/runs/{stream.run_id}", headers=auth())).json()
            assert record["status"] == "failed"
            assert record["error"]["code"] == "run_too_large"
            # Non-streaming: the failed run's error with 502, as for any failed run.
            assert_json_error(await post_chat(client, "again"), 502, "run_too_large")
        await assert_still_serves(server.url)


# --- slow readers -------------------------------------------------------------

BIG_DELTA = 200_000
BIG_DELTAS = 40  # 8 MB: more than the loopback socket buffers hold


@attrs.frozen
class BigAgent:
    """Answers "big" with 8 MB in 2 s; anything else with one word."""

    name: str = "big"

    async def run(
        self, request: AgentRequest, send_channel: trio.MemorySendChannel[AgentOutput]
    ) -> None:
        if request.prompt != "big":
            await send_channel.send(TextDelta("ok"))
            return
        for _ in range(BIG_DELTAS):
            await trio.sleep(0.05)
            await send_channel.send(TextDelta("x" * BIG_DELTA))


def big_agent(settings: Settings) -> BigAgent:
    return BigAgent()


async def test_reader_that_stops_reading_is_dropped_and_its_run_completes() -> None:
    with running_server(
        "--agent",
        f"{__name__}:big_agent",
        "--send-timeout",
        "1",
        "--max-run-bytes",
        str(64 * 1024 * 1024),
    ) as server:
        async with httpx2.AsyncClient(base_url=server.url, timeout=30.0) as client:
            # on_disconnect is "cancel" (the default): still, a reader dropped
            # for slowness does not stop the run.
            async with open_reader(
                server.url,
                "POST",
                CHAT_PATH,
                {**auth(), "X-Session-Id": new_session_id()},
                chat_body("big", stream=True),
                receive_buffer=4096,
            ) as head:
                assert head[":status"] == "200"
                run_id = head["x-run-id"]
                record = await wait_ended(client, run_id)
                assert record["status"] == "completed", record
                assert len(record["text"]) == BIG_DELTA * BIG_DELTAS
                line = await server.wait_for_line(
                    rf"subscriber_dropped trace={run_id} reason=slow_reader"
                )
                assert "write_s=" in line
            stream = await stream_chat(client, "small")
            assert (stream.finish_reason, stream.text) == ("stop", "ok")
        await assert_still_serves(server.url)
