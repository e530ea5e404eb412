"""Runs recorded in SQLite and reattached over HTTP, against the real server.

The store's file is read directly (sqlite3) once the server has exited."""

from __future__ import annotations

import json
import signal
import sqlite3
from pathlib import Path

import httpx2
import pytest
import trio

from .harness import ServerProcess, running_server
from .test_shutdown import sigterm_mid_stream
from .wire import auth, read_then_hang_up

pytestmark = pytest.mark.integration

SLOW = ("--token-delay", "0.05", "--reply-words", "400")


def stored(data_dir: str | Path, run_id: str) -> tuple[str, str | None]:
    with sqlite3.connect(Path(data_dir) / "runs.sqlite3") as db:
        row = db.execute(
            "SELECT status, cancel_reason FROM runs WHERE run_id = ?", (run_id,)
        ).fetchone()
    db.close()
    assert row is not None, f"{run_id} not in the store"
    return row[0], row[1]


async def test_sigterm_mid_stream_is_interrupted_on_the_wire_and_in_sqlite() -> None:
    with running_server(*SLOW, "--drain-timeout", "0.3") as server:
        stream = await sigterm_mid_stream(server, "a long answer")
        assert await server.wait_exit() == 0
        assert stream.finish_reason == "interrupted"
        assert server.data_dir is not None
        assert stored(server.data_dir, stream.run_id) == ("interrupted", "shutdown")


async def test_kill_9_mid_run_then_restart_marks_the_run_crash_recovery(
    tmp_path: Path,
) -> None:
    data = ("--data-dir", str(tmp_path))
    with running_server(*SLOW, *data, "--api-key", "k1", "--api-key", "k2") as server:
        headers = await read_then_hang_up(
            server.url,
            {"prompt": "stay", "stream": True, "on_disconnect": "continue"},
            {**auth("k1"), "X-Session-Id": "s1"},
            events=3,
        )
        run_id = headers["x-run-id"]
        await server.wait_for("stream_start", trace=run_id)
        server.proc.kill()
        server.proc.wait()
    assert stored(tmp_path, run_id) == ("running", None)
    with running_server(*data, "--api-key", "k1", "--api-key", "k2") as restarted:
        assert stored(tmp_path, run_id) == ("interrupted", "crash_recovery")
        async with httpx2.AsyncClient(base_url=restarted.url, timeout=30.0) as client:
            mine = await client.get(f"/v1/runs/{run_id}", headers=auth("k1"))
            theirs = await client.get(f"/v1/runs/{run_id}", headers=auth("k2"))
            stop = await client.post(f"/v1/runs/{run_id}/cancel", headers=auth("k2"))
    assert mine.status_code == 200
    assert (mine.json()["status"], mine.json()["cancel_reason"]) == (
        "interrupted",
        "crash_recovery",
    )
    assert theirs.status_code == 404 and stop.status_code == 404


async def test_stop_and_disconnect_are_recorded_differently() -> None:
    with running_server(*SLOW) as server:
        async with httpx2.AsyncClient(base_url=server.url, timeout=30.0) as client:
            gone = await read_then_hang_up(
                server.url, {"prompt": "bye", "stream": True}, auth(), events=3
            )
            await server.wait_for("stream_end", trace=gone["x-run-id"])
            stopped = None
            async with client.stream(
                "POST",
                "/v1/chat/completions",
                json={"prompt": "stop me", "stream": True},
                headers=auth(),
            ) as response:
                run_id = response.headers["X-Run-Id"]
                async for line in response.aiter_lines():
                    if stopped is None and line.startswith("data: "):
                        stopped = await client.post(f"/v1/runs/{run_id}/cancel", headers=auth())
        assert stopped is not None and stopped.json()["cancel_reason"] == "client_stop"
        assert server.data_dir is not None
        assert stored(server.data_dir, gone["x-run-id"]) == ("cancelled", "client_disconnect")
        assert stored(server.data_dir, run_id) == ("cancelled", "client_stop")


async def test_continue_run_finishes_after_the_client_left_and_reattaches_without_gaps(
    server: ServerProcess,
) -> None:
    headers = await read_then_hang_up(
        server.url,
        {"prompt": "carry on", "stream_format": "events", "on_disconnect": "continue"},
        auth(),
        events=3,
    )
    run_id = headers["x-run-id"]
    await server.wait_for("stream_end", trace=run_id, status="completed")
    async with httpx2.AsyncClient(base_url=server.url, timeout=30.0) as client:
        # The client had seq 0..2; it reattaches after seq 2.
        response = await client.get(
            f"/v1/runs/{run_id}/events",
            headers={**auth(), "Accept": "application/x-ndjson", "Last-Event-ID": f"{run_id}:2"},
        )
        whole = await client.get(
            f"/v1/runs/{run_id}/events", headers={**auth(), "Accept": "application/x-ndjson"}
        )
    rest = [json.loads(line) for line in response.text.splitlines() if line]
    everything = [json.loads(line) for line in whole.text.splitlines() if line]
    assert [event["seq"] for event in rest] == list(range(3, len(everything)))
    assert rest == everything[3:]
    assert rest[-1]["type"] == "run.completed"


async def test_sigint_is_drained_like_sigterm() -> None:
    with running_server("--token-delay", "0.01", "--reply-words", "20") as server:
        server.send_signal(signal.SIGINT)
        with trio.fail_after(30):
            assert await server.wait_exit() == 0
