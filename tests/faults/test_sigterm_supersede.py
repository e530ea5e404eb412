"""SIGTERM while a session is in the middle of a supersede: the old run has
been cancelled (``superseded``) and is still cleaning up, the new prompt is
waiting for that cleanup. The process must exit 0 with every run recorded
in a terminal state: the old one ``cancelled``/``superseded``; the new one
``interrupted``/``shutdown`` if it had started, and if its turn came only
after the drain began, refused with 503 ``draining`` (``Session.submit``
admits nothing new once draining) and never recorded."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.integration.harness import ServerProcess

from .support import (
    TERMINAL,
    assert_nothing_running,
    fault_server,
    ndjson_headers,
    raw_request,
    read_until,
    stored_runs,
)

pytestmark = pytest.mark.integration

AGENT = ("--agent", "tests.faults.agents:make_agent", "--token-delay", "0.02")
CLEANUP_SECONDS = 1.5


def body(prompt: str) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": prompt}], "stream": True}


def _parse(received: bytes) -> tuple[int, list[dict[str, Any]]] | None:
    """The status and the JSON values of a response, once it is complete:
    a native NDJSON stream up to its terminal event, or an error body."""
    head, separator, payload = received.partition(b"\r\n\r\n")
    if not separator:
        return None
    status = int(head.split()[1])
    if status != 200:
        length = int(re.search(rb"(?i)content-length: *(\d+)", head)[1])  # type: ignore[index]
        return (status, [json.loads(payload[:length])]) if len(payload) >= length else None
    values = [json.loads(line) for line in payload.split(b"\n") if line.startswith(b"{")]
    return (status, values) if values and values[-1]["type"] in TERMINAL else None


async def read_response(
    stream: trio.SocketStream, received: bytes = b""
) -> tuple[int, list[dict[str, Any]]]:
    """Read until the response is complete (see :func:`_parse`), ``received``
    being what was read before. Not until EOF: hypercorn keeps a connection
    open after a complete response until the client closes it."""
    with trio.fail_after(20):
        while (response := _parse(received)) is None:
            data = await stream.receive_some()
            assert data, f"connection closed before the response was complete: {received!r}"
            received += data
    return response


async def supersede_then_sigterm(
    server: ServerProcess, *, after_second_started: bool
) -> tuple[str, tuple[int, list[dict[str, Any]]], tuple[int, list[dict[str, Any]]]]:
    headers = ndjson_headers("sigterm")
    first = await raw_request(server, body(f"tokens=500 cleanup={CLEANUP_SECONDS}"), headers)
    async with first:
        first_head = await read_until(first, b"run.started")
        # (logged just before the answer, through another pipe)
        await server.wait_for("stream_start", session="sigterm")
        first_id = server.find("stream_start", session="sigterm")[0].fields["trace"]
        second = await raw_request(server, body("tokens=500"), headers)
        async with second:
            await server.wait_for("stream_cancelled", trace=first_id, reason="superseded")
            second_head = b""
            if after_second_started:
                await server.wait_for("prev_stream_finished_cleanly", trace=first_id)
                second_head = await read_until(second, b"run.started")
            else:
                assert not server.find("stream_end", trace=first_id)  # still cleaning up
            server.send_signal(signal.SIGTERM)
            first_response = await read_response(first, first_head)
            second_response = await read_response(second, second_head)
    assert await server.wait_exit() == 0
    return first_id, first_response, second_response


async def test_sigterm_while_the_new_prompt_waits_for_the_old_runs_cleanup(
    tmp_path: Path,
) -> None:
    with fault_server(tmp_path, *AGENT) as server:
        first_id, first, second = await supersede_then_sigterm(server, after_second_started=False)
    assert first[0] == 200 and first[1][-1]["type"] == "run.cancelled", first
    assert first[1][-1]["reason"] == "superseded"
    runs = stored_runs(tmp_path)
    assert_nothing_running(runs)
    assert (runs[first_id]["status"], runs[first_id]["cancel_reason"]) == (
        "cancelled",
        "superseded",
    )
    # Its turn came after the drain began: refused with a clear 503 (the
    # engine admits no new run while draining), so there is no run to record.
    assert second[0] == 503, second
    assert second[1][0]["error"]["code"] == "draining", second
    assert list(runs) == [first_id]


async def test_sigterm_just_after_the_new_run_started_interrupts_it(tmp_path: Path) -> None:
    with fault_server(tmp_path, *AGENT) as server:
        first_id, first, second = await supersede_then_sigterm(server, after_second_started=True)
    assert first[1][-1]["type"] == "run.cancelled" and first[1][-1]["reason"] == "superseded"
    assert second[0] == 200
    assert second[1][-1]["type"] == "run.interrupted", second
    assert second[1][-1]["reason"] == "shutdown"
    runs = stored_runs(tmp_path)
    assert_nothing_running(runs)
    second_id = second[1][0]["run_id"]
    assert (runs[first_id]["status"], runs[first_id]["cancel_reason"]) == (
        "cancelled",
        "superseded",
    )
    assert (runs[second_id]["status"], runs[second_id]["cancel_reason"]) == (
        "interrupted",
        "shutdown",
    )
