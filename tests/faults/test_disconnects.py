"""Clients that go away at each phase of a request: before the response
headers (mid-body, and while the submission waits for a superseded run's
cleanup), after the first frame, and while the run is cleaning up (with a
stop request that is itself abandoned). Bare sockets, so a hang-up is a
real close of the TCP connection at exactly that point."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from tests.integration.harness import ServerProcess
from tests.integration.wire import CHAT_PATH, auth

from .support import (
    assert_nothing_running,
    assert_serves,
    fault_server,
    idle_baseline,
    ndjson_headers,
    raw_request,
    read_until,
    settle,
    stored_runs,
)

pytestmark = pytest.mark.integration

AGENT = ("--agent", "tests.faults.agents:make_agent", "--token-delay", "0.02")
CLEANUP_SECONDS = 1.5


def body(prompt: str) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": prompt}], "stream": True}


async def open_stream(server: ServerProcess, prompt: str, session_id: str) -> trio.SocketStream:
    """A native NDJSON stream whose headers and first event have arrived."""
    stream = await raw_request(server, body(prompt), ndjson_headers(session_id))
    received = await read_until(stream, b"run.started")
    assert received.startswith(b"HTTP/1.1 200"), received
    return stream


async def run_id_of(server: ServerProcess, session_id: str) -> str:
    # Waited for: the server logs stream_start just before it answers, and
    # its log arrives through another pipe than the answer.
    await server.wait_for("stream_start", session=session_id)
    return server.find("stream_start", session=session_id)[0].fields["trace"]


async def test_hang_up_mid_request_body_starts_no_run(tmp_path: Path) -> None:
    with fault_server(tmp_path, *AGENT) as server:
        baseline = await idle_baseline(server)
        target = server.url.removeprefix("http://")
        host, _, port = target.partition(":")
        for _ in range(5):
            async with await trio.open_tcp_stream(host, int(port)) as stream:
                head = (
                    f"POST {CHAT_PATH} HTTP/1.1\r\nHost: {target}\r\n"
                    "Content-Type: application/json\r\nContent-Length: 1000\r\n"
                    f"Authorization: {auth()['Authorization']}\r\n"
                    "X-Session-Id: half-body\r\n\r\n"
                )
                await stream.send_all(head.encode() + b'{"messages": [')
        await settle(server, baseline)
        await assert_serves(server)
        await settle(server, baseline)
        assert server.stop() == 0
    assert not server.find("stream_start", session="half-body")
    assert_nothing_running(stored_runs(tmp_path))


async def test_hang_up_while_waiting_for_a_superseded_runs_cleanup(tmp_path: Path) -> None:
    """The second prompt's client leaves before any response header, while its
    submission waits for the first run's (slow) cleanup: the first run still
    ends superseded, the second never starts (its submission is cancelled
    with its request)."""
    with fault_server(tmp_path, *AGENT) as server:
        baseline = await idle_baseline(server)
        first = await open_stream(server, f"tokens=500 cleanup={CLEANUP_SECONDS}", "waiting")
        first_id = await run_id_of(server, "waiting")
        second = await raw_request(server, body("tokens=5"), ndjson_headers("waiting"))
        await server.wait_for("stream_cancelled", trace=first_id, reason="superseded")
        # Mid-cleanup of the first run: nothing has been answered yet.
        with trio.move_on_after(0.2):
            assert await second.receive_some() == b""
        await second.aclose()
        await server.wait_for("stream_end", trace=first_id, status="cancelled")
        await first.aclose()
        await settle(server, baseline)
        await assert_serves(server)
        await settle(server, baseline)
        assert server.stop() == 0
    runs = stored_runs(tmp_path)
    assert_nothing_running(runs)
    assert runs[first_id]["status"] == "cancelled"
    assert runs[first_id]["cancel_reason"] == "superseded"
    # The second prompt's submission left with its client, before its turn.
    assert len(server.find("stream_start", session="waiting")) == 1
    assert [run["run_id"] for run in runs.values() if run["session_id"] == "waiting"] == [first_id]


@pytest.mark.parametrize("accept", ["ndjson", "openai"])
async def test_hang_up_after_the_first_frame_cancels_the_run(accept: str, tmp_path: Path) -> None:
    with fault_server(tmp_path, *AGENT) as server:
        baseline = await idle_baseline(server)
        sessions = [f"first-frame-{index}" for index in range(5)]
        for session_id in sessions:
            if accept == "ndjson":
                stream = await raw_request(server, body("tokens=500"), ndjson_headers(session_id))
                marker = b"\n{"  # the end of the first line
            else:
                headers = {**auth(), "X-Session-Id": session_id}
                stream = await raw_request(server, body("tokens=500"), headers)
                marker = b"data: "
            received = await read_until(stream, marker)
            assert received.startswith(b"HTTP/1.1 200"), received
            await stream.aclose()
        for session_id in sessions:
            trace = await run_id_of(server, session_id)
            await server.wait_for("stream_cancelled", trace=trace, reason="client_disconnect")
        await settle(server, baseline)
        await assert_serves(server)
        await settle(server, baseline)
        assert server.stop() == 0
    runs = stored_runs(tmp_path)
    assert_nothing_running(runs)
    mine = [run for run in runs.values() if run["session_id"] in sessions]
    assert len(mine) == len(sessions)
    assert {(run["status"], run["cancel_reason"]) for run in mine} == {
        ("cancelled", "client_disconnect")
    }


async def test_hang_up_during_cleanup(tmp_path: Path) -> None:
    """A stop request starts the run's (slow) cleanup; then both the stop
    request's client and the stream's client leave while it cleans up."""
    with fault_server(tmp_path, *AGENT) as server:
        baseline = await idle_baseline(server)
        stream = await open_stream(server, f"tokens=500 cleanup={CLEANUP_SECONDS}", "cleaning")
        run_id = await run_id_of(server, "cleaning")
        target = server.url.removeprefix("http://")
        host, _, port = target.partition(":")
        stop = await trio.open_tcp_stream(host, int(port))
        await stop.send_all(
            (
                f"POST /v1/runs/{run_id}/cancel HTTP/1.1\r\nHost: {target}\r\n"
                f"Authorization: {auth()['Authorization']}\r\nContent-Length: 0\r\n\r\n"
            ).encode()
        )
        # Cancelled, and its agent is cleaning up (for CLEANUP_SECONDS).
        await server.wait_for("stream_cancelled", trace=run_id, reason="client_stop")
        await stop.aclose()
        await stream.aclose()
        assert not server.find("stream_end", trace=run_id), "cleanup ended before the hang-ups"
        await server.wait_for("stream_end", trace=run_id, status="cancelled")
        await settle(server, baseline)
        await assert_serves(server)
        await settle(server, baseline)
        assert server.stop() == 0
    runs = stored_runs(tmp_path)
    assert_nothing_running(runs)
    assert (runs[run_id]["status"], runs[run_id]["cancel_reason"]) == ("cancelled", "client_stop")
