"""Sessions: a new prompt supersedes the session's running answer, and only
that one (not another session's, not another API key's)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx2
import pytest
import trio

from .harness import FAST_REPLY, ServerProcess, running_server
from .wire import (
    CHAT_PATH,
    DEV_KEY,
    BackgroundChat,
    ChatStream,
    auth,
    chat_body,
    stream_chat,
)

pytestmark = pytest.mark.integration


def new_session_id() -> str:
    return f"it-{uuid.uuid4().hex[:12]}"


def assert_superseded(stream: ChatStream) -> None:
    assert stream.finish_reason == "cancelled", stream.final
    assert stream.final["cancel_reason"] == "superseded"
    assert stream.done
    assert stream.events_after_done == 0


async def test_new_prompt_supersedes_running_stream_after_its_cleanup(
    client: httpx2.AsyncClient, server: ServerProcess
) -> None:
    session = new_session_id()
    first = BackgroundChat(client, "first prompt A", session_id=session)
    async with trio.open_nursery() as nursery:
        await nursery.start(first.run)
        b = await stream_chat(client, "second prompt B", session_id=session)
    a = first.stream

    assert a.session_id == b.session_id == session
    assert_superseded(a)
    assert b.finish_reason == "stop"
    assert b.text.startswith("You said: second prompt B")
    assert b.done

    order = [
        await server.wait_for("stream_cancelled", trace=a.run_id, reason="superseded"),
        await server.wait_for("stream_end", trace=a.run_id, status="cancelled"),
        await server.wait_for("prev_stream_finished_cleanly", trace=a.run_id, session=session),
        await server.wait_for("stream_start", trace=b.run_id, session=session),
    ]
    assert order == sorted(order), server.log_text(last=50)


async def test_new_prompt_leaves_other_sessions_alone(
    client: httpx2.AsyncClient, server: ServerProcess
) -> None:
    one, two = new_session_id(), new_session_id()
    other = BackgroundChat(client, "session two", session_id=two)
    superseded = BackgroundChat(client, "session one", session_id=one)
    async with trio.open_nursery() as nursery:
        await nursery.start(other.run)
        await nursery.start(superseded.run)
        latest = await stream_chat(client, "session one again", session_id=one)

    assert_superseded(superseded.stream)
    assert latest.finish_reason == "stop"
    assert other.stream.finish_reason == "stop"
    assert other.stream.done
    run_id = other.stream.run_id
    await server.wait_for("stream_end", trace=run_id, status="completed")
    assert not server.find("stream_cancelled", trace=run_id)
    assert not server.find("prev_stream_finished_cleanly", session=two)


@pytest.fixture(scope="module")
def two_key_server() -> Iterator[ServerProcess]:
    with running_server(*FAST_REPLY, "--api-key", "k1", "--api-key", "k2") as process:
        yield process


async def test_api_keys_sharing_a_session_id_do_not_cancel_each_other(
    two_key_server: ServerProcess,
) -> None:
    server = two_key_server
    session = new_session_id()
    async with httpx2.AsyncClient(base_url=server.url, timeout=30.0) as client:
        first = BackgroundChat(client, "key one", session_id=session, key="k1")
        async with trio.open_nursery() as nursery:
            await nursery.start(first.run)
            second = await stream_chat(client, "key two", session_id=session, key="k2")

    for stream in (first.stream, second):
        assert stream.session_id == session
        assert stream.finish_reason == "stop"
        assert stream.done
        await server.wait_for("stream_end", trace=stream.run_id, status="completed")
        assert not server.find("stream_cancelled", trace=stream.run_id)
    assert not server.find("prev_stream_finished_cleanly", session=session)


async def test_dev_key_is_refused_once_api_keys_are_set(two_key_server: ServerProcess) -> None:
    async with httpx2.AsyncClient(base_url=two_key_server.url, timeout=30.0) as client:
        response = await client.post(CHAT_PATH, json=chat_body("hi"), headers=auth(DEV_KEY))

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"
