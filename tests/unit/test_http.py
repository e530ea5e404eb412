"""The HTTP edge in process: the Quart-Trio test client over the real app,
under trio's MockClock (``autojump_clock``)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from quart.typing import TestHTTPConnectionProtocol as HTTPConnection
from quart_trio import QuartTrio

from server.core.events import CancelReason, RunCancelled, RunStatus
from server.settings import Settings
from server.web.app import create_app
from server.web.auth import principal_of
from server.web.state import app_state

AUTH = {"Authorization": "Bearer devkey"}
PATH = "/v1/chat/completions"


@asynccontextmanager
async def serving(**settings: Any) -> AsyncIterator[QuartTrio]:
    """The app with its serving lifecycle (the engine) running; no run store
    unless ``data_dir`` is given (its worker threads do not mix with MockClock)."""
    app = create_app(Settings(**{"data_dir": "", **settings}))
    async with app.test_app():
        yield app


async def read_frames(
    connection: HTTPConnection,
) -> list[tuple[float, bytes]]:
    """Every body chunk with the (fake) time it arrived, until the end."""
    frames = []
    while True:
        try:
            data = await connection.receive()
        except trio.EndOfChannel:
            return frames
        frames.append((trio.current_time(), data))


@asynccontextmanager
async def open_stream(
    app: QuartTrio, body: dict[str, object], headers: dict[str, str] | None = None
) -> AsyncIterator[HTTPConnection]:
    client = app.test_client()
    async with client.request(
        PATH, method="POST", headers={**AUTH, **(headers or {})}
    ) as connection:
        await connection.send(json.dumps(body).encode())
        await connection.send_complete()
        yield connection


async def hang_up(connection: HTTPConnection) -> None:
    """The client goes away. Quart's test connection then waits on exit for a
    response end that a cancelled response never sends, so its client side
    is closed here as a real socket's would be."""
    await connection.disconnect()
    await connection._client_receive.aclose()  # type: ignore[attr-defined]


def sse_data(frames: list[tuple[float, bytes]]) -> list[str]:
    text = b"".join(data for _, data in frames).decode()
    return [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]


async def test_heartbeats_come_at_the_configured_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with serving(token_delay=10.0, reply_words=2, heartbeat_interval=3.0) as app:
        async with open_stream(app, {"prompt": "hi", "stream": True}) as connection:
            frames = await read_frames(connection)
            pings = [at for at, data in frames if data == b": ping\n\n"]
            # Two silent ten-second gaps (before each token): pings at 3, 6, 9 in each.
            assert pings == pytest.approx([3, 6, 9, 13, 16, 19])
            chunks = sse_data(frames)
            assert chunks[-1] == "[DONE]"
            assert json.loads(chunks[-2])["choices"][0]["finish_reason"] == "stop"


async def test_stream_longer_than_quart_response_timeout_completes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with serving(token_delay=1.0, reply_words=150) as app:
        assert app.config["RESPONSE_TIMEOUT"] == 60
        async with open_stream(app, {"prompt": "hi", "stream": True}) as connection:
            frames = await read_frames(connection)
            assert frames[-1][0] >= 150
            chunks = sse_data(frames)
            assert chunks[-1] == "[DONE]"
            assert json.loads(chunks[-2])["choices"][0]["finish_reason"] == "stop"
            assert sum(1 for chunk in chunks if '"content":' in chunk) == 151


async def test_disconnect_while_agent_is_silent_cancels_run_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with serving(token_delay=100.0, reply_words=5) as app:
        async with open_stream(
            app, {"prompt": "hi", "stream": True}, {"X-Session-Id": "s1"}
        ) as connection:
            first = await connection.receive()
            assert b'"role":"assistant"' in first
            manager = app_state(app).manager
            assert manager is not None
            session = manager.find_session(principal_of("devkey"), "s1")
            assert session is not None and session.current is not None
            run = session.current
            disconnected_at = trio.current_time()
            await hang_up(connection)
            await run.wait_ended()
            assert trio.current_time() == disconnected_at
            assert isinstance(run.terminal, RunCancelled)
            assert run.terminal.reason is CancelReason.CLIENT_DISCONNECT


async def test_disconnect_before_non_stream_answer_cancels_run(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with serving(token_delay=100.0, reply_words=5) as app:
        async with open_stream(app, {"prompt": "hi"}, {"X-Session-Id": "s1"}) as connection:
            await trio.testing.wait_all_tasks_blocked()
            manager = app_state(app).manager
            assert manager is not None
            session = manager.find_session(principal_of("devkey"), "s1")
            assert session is not None and session.current is not None
            run = session.current
            await hang_up(connection)
            await run.wait_ended()
            assert run.status is RunStatus.CANCELLED
            assert isinstance(run.terminal, RunCancelled)
            assert run.terminal.reason is CancelReason.CLIENT_DISCONNECT


async def test_non_stream_returns_one_chat_completion(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with serving(token_delay=0.5, reply_words=6) as app:
        response = await app.test_client().post(
            PATH, headers=AUTH, json={"messages": [{"role": "user", "content": "hello"}]}
        )
        assert response.status_code == 200
        body = await response.get_json()
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["finish_reason"] == "stop"
        assert len(body["choices"][0]["message"]["content"].split()) == 6
        assert body["usage"] == {"prompt_tokens": 1, "completion_tokens": 6, "total_tokens": 7}
        assert response.headers["X-Run-Id"].startswith("run_")


async def test_ndjson_streams_native_events(autojump_clock: trio.testing.MockClock) -> None:
    async with serving(token_delay=0.5, reply_words=3) as app:
        async with open_stream(
            app, {"prompt": "hi"}, {"Accept": "application/x-ndjson"}
        ) as connection:
            frames = await read_frames(connection)
            events = [
                json.loads(line)
                for _, data in frames
                for line in data.decode().splitlines()
                if line
            ]
            assert [event["type"] for event in events] == [
                "run.started",
                "run.delta",
                "run.delta",
                "run.delta",
                "run.message",
                "run.completed",
            ]
            assert [event["seq"] for event in events] == list(range(6))
            assert len({event["run_id"] for event in events}) == 1


async def test_events_over_sse_carry_run_and_seq_ids(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with serving(token_delay=0.5, reply_words=2) as app:
        async with open_stream(app, {"prompt": "hi"}, {"X-Stream-Format": "events"}) as connection:
            frames = await read_frames(connection)
            text = b"".join(data for _, data in frames).decode()
            blocks = [block for block in text.split("\n\n") if block.strip()]
            run_id = json.loads(blocks[0].splitlines()[-1][len("data: ") :])["run_id"]
            assert [block.splitlines()[0] for block in blocks] == [
                f"id: {run_id}:{seq}" for seq in range(5)
            ]
            assert blocks[-1].splitlines()[1] == "event: run.completed"


async def test_superseded_stream_ends_with_cancelled_finish_reason(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with serving(token_delay=1.0, reply_words=10) as app:
        async with open_stream(
            app, {"prompt": "A", "stream": True}, {"X-Session-Id": "s1"}
        ) as first:
            await trio.sleep(2.5)
            async with open_stream(
                app, {"prompt": "B", "stream": True}, {"X-Session-Id": "s1"}
            ) as second:
                first_chunks = sse_data(await read_frames(first))
                second_chunks = sse_data(await read_frames(second))
        final = json.loads(first_chunks[-2])
        assert final["choices"][0]["finish_reason"] == "cancelled"
        assert final["cancel_reason"] == "superseded"
        assert first_chunks[-1] == second_chunks[-1] == "[DONE]"
        assert json.loads(second_chunks[-2])["choices"][0]["finish_reason"] == "stop"
        # None of A's text in B's answer.
        first_ids = {json.loads(chunk)["id"] for chunk in first_chunks[:-1]}
        second_ids = {json.loads(chunk)["id"] for chunk in second_chunks[:-1]}
        assert len(first_ids) == len(second_ids) == 1 and first_ids != second_ids


@pytest.mark.parametrize(
    ("headers", "body", "status", "code"),
    [
        ({}, b'{"prompt": "x"}', 401, "unauthorized"),
        ({"Authorization": "Bearer nope"}, b'{"prompt": "x"}', 401, "unauthorized"),
        ({"Authorization": "Basic devkey"}, b'{"prompt": "x"}', 401, "unauthorized"),
        (AUTH, b'{"prompt": ', 400, "invalid_json"),
        (AUTH, b"\xff\xfe", 400, "invalid_json"),
        (AUTH, b"[1, 2]", 422, "invalid_request"),
        (AUTH, b'{"prompt": "x", "stream": "yes"}', 422, "invalid_request"),
        (AUTH, b'{"messages": [{"role": 1, "content": "x"}]}', 422, "invalid_request"),
        (AUTH, b"{}", 422, "missing_prompt"),
        (AUTH, b'{"prompt": "   "}', 422, "missing_prompt"),
        (AUTH, b'{"messages": [{"role": "system", "content": "x"}]}', 422, "missing_prompt"),
        ({**AUTH, "X-Session-Id": "a b"}, b'{"prompt": "x"}', 400, "invalid_session_id"),
        ({**AUTH, "X-Session-Id": "s" * 129}, b'{"prompt": "x"}', 400, "invalid_session_id"),
        (AUTH, b'{"prompt": "' + b"x" * 2048 + b'"}', 413, "payload_too_large"),
    ],
)
async def test_bad_input_gets_json_error_and_server_keeps_serving(
    autojump_clock: trio.testing.MockClock,
    headers: dict[str, str],
    body: bytes,
    status: int,
    code: str,
) -> None:
    async with serving(token_delay=0.1, reply_words=2, max_body_bytes=1024) as app:
        client = app.test_client()
        response = await client.post(PATH, headers=headers, data=body)
        assert response.status_code == status
        error = (await response.get_json())["error"]
        assert error["code"] == code and error["message"]
        assert "Traceback" not in await response.get_data(as_text=True)
        again = await client.post(PATH, headers=AUTH, json={"prompt": "still there?"})
        assert again.status_code == 200


async def test_error_responses_carry_the_headers_their_status_needs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with serving() as app:
        client = app.test_client()
        unauthorised = await client.post(PATH, json={"prompt": "x"})
        assert unauthorised.headers["WWW-Authenticate"] == "Bearer"
        wrong_method = await client.get(PATH, headers=AUTH)
        assert wrong_method.status_code == 405
        assert "POST" in wrong_method.headers["Allow"]
        assert (await wrong_method.get_json())["error"]["code"] == "method_not_allowed"


async def test_validation_messages_name_fields_without_internals(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with serving() as app:
        client = app.test_client()
        cases = {
            b'{"prompt": "x", "stream_format": "foo"}': (
                "expected one of 'openai', 'events' @ $.stream_format"
            ),
            b'{"prompt": "x", "stream_options": [1]}': "expected an object @ $.stream_options",
            b'{"messages": "hello"}': "expected a list @ $.messages",
        }
        for body, detail in cases.items():
            response = await client.post(PATH, headers=AUTH, data=body)
            assert response.status_code == 422
            message = (await response.get_json())["error"]["message"]
            assert detail in message
            assert "typing" not in message and "server." not in message


async def test_unknown_path_is_a_json_404(autojump_clock: trio.testing.MockClock) -> None:
    async with serving() as app:
        response = await app.test_client().get("/nope")
        assert response.status_code == 404
        assert (await response.get_json())["error"]["code"] == "not_found"


async def test_draining_server_answers_503_with_retry_after(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with serving(token_delay=1.0, reply_words=3) as app:
        manager = app_state(app).manager
        assert manager is not None
        await manager.drain(grace_period=0)
        response = await app.test_client().post(PATH, headers=AUTH, json={"prompt": "x"})
        assert response.status_code == 503
        assert response.headers["Retry-After"]
        assert (await response.get_json())["error"]["code"] == "draining"


async def test_configured_keys_replace_the_dev_key(autojump_clock: trio.testing.MockClock) -> None:
    async with serving(api_keys=("k1", "k2"), token_delay=0.1, reply_words=2) as app:
        client = app.test_client()
        assert (await client.post(PATH, headers=AUTH, json={"prompt": "x"})).status_code == 401
        for key in ("k1", "k2"):
            response = await client.post(
                PATH, headers={"Authorization": f"Bearer {key}"}, json={"prompt": "x"}
            )
            assert response.status_code == 200


async def test_client_gone_before_the_first_body_write_still_cancels_the_run(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Drives the ASGI app directly: the client disconnects while the server
    is still sending the response headers, so the body is never iterated."""
    async with serving(token_delay=1.0, reply_words=50) as app:
        headers_sent = trio.Event()
        client_gone = trio.Event()
        body = json.dumps({"prompt": "hi", "stream": True}).encode()
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict[str, object]:
            if messages:
                return messages.pop()
            await client_gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, object]) -> None:
            if message["type"] == "http.response.start":
                headers_sent.set()
                await trio.sleep_forever()  # the client never takes them

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": PATH,
            "raw_path": PATH.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [(b"authorization", b"Bearer devkey"), (b"x-session-id", b"s1")],
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 2),
            "extensions": {},
        }
        async with trio.open_nursery() as nursery:
            nursery.start_soon(app, scope, receive, send)
            await headers_sent.wait()
            manager = app_state(app).manager
            assert manager is not None
            session = manager.find_session(principal_of("devkey"), "s1")
            assert session is not None and session.current is not None
            run = session.current
            client_gone.set()
            await run.wait_ended()
        assert isinstance(run.terminal, RunCancelled)
        assert run.terminal.reason is CancelReason.CLIENT_DISCONNECT
        assert run.ended_at == 0
