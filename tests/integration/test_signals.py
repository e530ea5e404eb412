"""Shutdown signals on a real server process (issue 11, finding 5).

SIGHUP drains like SIGTERM (it used to end the process at once: exit -1,
no terminal frame, the row left ``running``). A second SIGTERM, SIGINT or
SIGHUP during the drain skips the rest of it: live runs are interrupted
with reason ``shutdown``, recorded, and the process exits 0 (it used to
wait the drain out, then die by the re-delivered signal: -15, or -2 with a
``KeyboardInterrupt`` traceback). A signal after the drain changes nothing.
"""

from __future__ import annotations

import signal
from pathlib import Path

import httpx2
import pytest
import trio

from tests.faults.support import stored_runs

from .harness import ServerProcess, running_server
from .wire import CHAT_PATH, BackgroundChat, ChatStream

pytestmark = pytest.mark.integration

# 2,000 words at 50 ms: far longer than any drain these tests wait for.
ENDLESS_REPLY = ("--token-delay", "0.05", "--reply-words", "2000")


async def stream_and_signal(
    server: ServerProcess, first: signal.Signals, again: signal.Signals | None = None
) -> ChatStream:
    """Stream a long answer; once it is producing, send ``first``, and once
    the drain began, ``again``. The stream as the client read it."""
    async with httpx2.AsyncClient(base_url=server.url, timeout=30.0) as client:
        chat = BackgroundChat(client, "a very long answer")
        async with trio.open_nursery() as nursery:
            await nursery.start(chat.run)
            server.send_signal(first)
            await server.wait_for_line(r" server\.launcher draining ")
            if again is not None:
                server.send_signal(again)
    return chat.stream


def line_index(server: ServerProcess, text: str) -> int:
    """The position of the first server log line containing ``text``."""
    found = [i for i, line in enumerate(server.lines) if text in line]
    assert found, f"no log line with {text!r}:\n{server.log_text()}"
    return found[0]


def assert_interrupted_by_shutdown(server: ServerProcess, stream: ChatStream) -> None:
    assert stream.finish_reason == "interrupted", stream.final
    assert stream.final["cancel_reason"] == "shutdown"
    assert stream.done and stream.events_after_done == 0
    assert server.data_dir is not None
    row = stored_runs(Path(server.data_dir))[stream.run_id]
    assert (row["status"], row["cancel_reason"]) == ("interrupted", "shutdown"), row
    assert "Traceback" not in server.log_text()


async def test_sighup_drains_like_sigterm() -> None:
    with running_server(*ENDLESS_REPLY, "--drain-timeout", "0.5") as server:
        stream = await stream_and_signal(server, signal.SIGHUP)

        assert await server.wait_exit() == 0, server.log_text()
        assert_interrupted_by_shutdown(server, stream)
        requested = line_index(server, "shutdown_requested signal=SIGHUP")
        cancelled = line_index(server, f"stream_cancelled trace={stream.run_id} reason=shutdown")
        assert requested < cancelled < line_index(server, " drained"), server.log_text()


@pytest.mark.parametrize(
    ("first", "again"),
    [
        (signal.SIGTERM, signal.SIGTERM),
        (signal.SIGINT, signal.SIGINT),
        (signal.SIGHUP, signal.SIGTERM),
    ],
    ids=["sigterm-twice", "sigint-twice", "sighup-then-sigterm"],
)
async def test_second_signal_skips_the_rest_of_the_drain(
    first: signal.Signals, again: signal.Signals
) -> None:
    # The drain timeout (30 s) outlasts every wait of this test: only the
    # second signal can end the run before the reply would.
    with running_server(*ENDLESS_REPLY, "--drain-timeout", "30") as server:
        stream = await stream_and_signal(server, first, again)

        assert await server.wait_exit() == 0, server.log_text()
        assert_interrupted_by_shutdown(server, stream)
        hurried = line_index(server, f"shutdown_hurried signal={again.name}")
        cancelled = line_index(server, f"stream_cancelled trace={stream.run_id} reason=shutdown")
        assert hurried < cancelled < line_index(server, " drained"), server.log_text()


async def test_a_signal_after_the_drain_changes_nothing() -> None:
    """After the drain Hypercorn still waits (up to its graceful timeout) for
    a request in flight; a signal then must not end the process."""
    with running_server("--drain-timeout", "0.5") as server:
        target = httpx2.URL(server.url)
        assert target.port is not None
        async with await trio.open_tcp_stream(target.host, target.port) as unfinished:
            # A request whose body never comes keeps Hypercorn waiting.
            head = f"POST {CHAT_PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
            await unfinished.send_all(head.encode() + b"\r\n{")
            server.send_signal(signal.SIGTERM)
            await server.wait_for_line(r" server\.launcher drained")
            server.send_signal(signal.SIGTERM)
            assert await server.wait_exit() == 0, server.log_text()
        assert "Traceback" not in server.log_text()
