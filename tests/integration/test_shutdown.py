"""SIGTERM drains: running answers get the drain timeout to finish, new runs
are refused with 503 meanwhile, the rest end as interrupted; exit code 0.

Hypercorn keeps accepting connections while the launcher drains (the drain
runs inside its shutdown trigger), so a request during the drain is answered
503 ``draining`` rather than refused at the socket."""

from __future__ import annotations

import re
import signal
from collections.abc import Awaitable, Callable, Iterator

import httpx2
import pytest
import trio

from .harness import ServerProcess, running_server
from .wire import CHAT_PATH, BackgroundChat, ChatStream, auth, chat_body

pytestmark = pytest.mark.integration

DRAINING = re.compile(r" server\.launcher draining ")


@pytest.fixture
def impatient_server() -> Iterator[ServerProcess]:
    """A reply (400 words at 50 ms) far longer than the drain timeout."""
    with running_server(
        "--token-delay", "0.05", "--reply-words", "400", "--drain-timeout", "0.5"
    ) as process:
        yield process


@pytest.fixture
def patient_server() -> Iterator[ServerProcess]:
    """A reply (40 words at 50 ms) far shorter than the drain timeout."""
    with running_server(
        "--token-delay", "0.05", "--reply-words", "40", "--drain-timeout", "30"
    ) as process:
        yield process


async def sigterm_mid_stream(
    server: ServerProcess,
    prompt: str,
    *,
    while_draining: Callable[[httpx2.AsyncClient], Awaitable[None]] | None = None,
) -> ChatStream:
    """Stream ``prompt``; once chunks arrive, SIGTERM the server, then run
    ``while_draining`` (after the drain began). The stream as read to its end;
    the client is closed on return, so nothing holds the server open."""
    async with httpx2.AsyncClient(base_url=server.url, timeout=30.0) as client:
        chat = BackgroundChat(client, prompt)
        async with trio.open_nursery() as nursery:
            await nursery.start(chat.run)
            server.send_signal(signal.SIGTERM)
            await server.wait_for_line(DRAINING.pattern)
            if while_draining is not None:
                await while_draining(client)
    return chat.stream


async def test_sigterm_interrupts_runs_that_outlast_the_drain(
    impatient_server: ServerProcess,
) -> None:
    server = impatient_server

    stream = await sigterm_mid_stream(server, "a very long answer")

    assert await server.wait_exit() == 0
    assert stream.finish_reason == "interrupted", stream.final
    assert stream.final["cancel_reason"] == "shutdown"
    assert stream.done
    assert stream.events_after_done == 0
    cancelled = server.index_of("stream_cancelled", trace=stream.run_id, reason="shutdown")
    end = server.index_of("stream_end", trace=stream.run_id, status="interrupted")
    assert cancelled is not None and end is not None and cancelled < end, server.log_text()


async def test_sigterm_lets_short_runs_finish_and_refuses_new_ones(
    patient_server: ServerProcess,
) -> None:
    server = patient_server
    late: list[httpx2.Response] = []

    async def submit_late(client: httpx2.AsyncClient) -> None:
        late.append(await client.post(CHAT_PATH, json=chat_body("too late"), headers=auth()))

    stream = await sigterm_mid_stream(server, "finish me please", while_draining=submit_late)

    assert await server.wait_exit() == 0
    assert stream.finish_reason == "stop"
    assert stream.done
    [refused] = late
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "draining"
    assert refused.headers["Retry-After"]
    # The run was still live when the drain began, and was left to finish.
    lines = server.lines
    draining = next(i for i, line in enumerate(lines) if DRAINING.search(line))
    ended = next(i for i, line in enumerate(lines) if f"stream_end trace={stream.run_id} " in line)
    assert draining < ended, server.log_text()
    assert not server.find("stream_cancelled", trace=stream.run_id)
    assert server.find("stream_end", trace=stream.run_id, status="completed")
