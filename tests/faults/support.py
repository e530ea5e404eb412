"""What every fault test checks afterwards, and how it talks to the server.

After a fault the server must (1) still serve: a fresh prompt on a fresh
session completes; (2) be back at its idle task count (``GET /debug/tasks``
with the admin key); (3) have nothing ``running`` in its store, read from
the SQLite file itself (read-only) once the process has exited.

The task count is read over a fresh connection each time and compared with
a baseline read the same way, so the probe's own connection tasks are in
both figures. Sessions are dropped quickly (``--idle-timeout``), so an idle
server holds no session tasks; a connection that just closed takes a moment
to leave the tree, hence the polling under a deadline. A kept-alive
connection stays in the tree, with its idle timer, until its client's close
reaches the server (or ``--keep-alive-timeout``, short here): so the probes
say ``Connection: close``, and the server lets go of each probe's connection
as soon as it has answered, instead of a trail of them following the polls.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import trio

from tests.integration.harness import ServerProcess, loopback_client, running_server
from tests.integration.wire import CHAT_PATH, auth

ADMIN_KEY = "fault-admin"
SETTLE_TIMEOUT = 15.0
TERMINAL = frozenset({"run.completed", "run.cancelled", "run.interrupted", "run.failed"})
# Quick session and connection turnover, short drain: a fault server is idle
# again soon.
FAULT_SERVER_ARGS = (
    "--admin-key",
    ADMIN_KEY,
    "--idle-timeout",
    "0.3",
    "--keep-alive-timeout",
    "1",
    "--drain-timeout",
    "2",
)


@contextmanager
def fault_server(data_dir: Path, *args: str) -> Iterator[ServerProcess]:
    with running_server(*FAULT_SERVER_ARGS, "--data-dir", str(data_dir), *args) as server:
        yield server


def server_log(server: ServerProcess, last: int = 60) -> str:
    """The end of the server's log without the access log (the probes')."""
    lines = [line for line in server.lines if " hypercorn.access " not in line]
    return "\n".join(lines[-last:])


def ndjson_headers(session_id: str | None = None) -> dict[str, str]:
    headers = {**auth(), "Accept": "application/x-ndjson"}
    if session_id is not None:
        headers["X-Session-Id"] = session_id
    return headers


async def debug_tasks(server: ServerProcess) -> dict[str, Any]:
    async with loopback_client(server.url, timeout=10.0) as client:
        # Connection: close, so the probe's own connection leaves the task
        # tree as soon as it is answered.
        response = await client.get(
            "/debug/tasks", headers={**auth(ADMIN_KEY), "Connection": "close"}
        )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


@dataclass(frozen=True)
class Baseline:
    tasks: int
    threads: int


async def idle_baseline(server: ServerProcess) -> Baseline:
    body = await debug_tasks(server)
    assert body["live_runs"] == 0 and body["sessions"] == [], body
    return Baseline(tasks=body["tasks"], threads=body["threads"])


async def settle(server: ServerProcess, baseline: Baseline) -> dict[str, Any]:
    """Wait until no run is live, no session is held and the task count is
    the baseline's; fail with the last figures and the log otherwise."""
    last: dict[str, Any] = {}

    async def probe() -> dict[str, Any] | None:
        nonlocal last
        last = await debug_tasks(server)
        idle = last["live_runs"] == 0 and not last["sessions"]
        return last if idle and last["tasks"] == baseline.tasks else None

    try:
        with trio.fail_after(SETTLE_TIMEOUT):
            while True:
                body = await probe()
                if body is not None:
                    return body
                await trio.sleep(0.05)
    except trio.TooSlowError:
        figures = {k: last.get(k) for k in ("tasks", "threads", "live_runs", "sessions")}
        raise AssertionError(
            f"not back at baseline {baseline} after {SETTLE_TIMEOUT}s: {figures}\n"
            f"{json.dumps(last.get('task_tree'), indent=1)}\n{server_log(server)}"
        ) from None


async def native_events(
    client: httpx2.AsyncClient, prompt: str, *, session_id: str | None = None
) -> tuple[int, list[dict[str, Any]]]:
    """POST a prompt for native NDJSON events and read them all."""
    body = {"messages": [{"role": "user", "content": prompt}], "stream": True}
    events: list[dict[str, Any]] = []
    async with client.stream(
        "POST", CHAT_PATH, json=body, headers=ndjson_headers(session_id)
    ) as response:
        if response.status_code != 200:
            return response.status_code, [json.loads(await response.aread())]
        async for line in response.aiter_lines():
            if line:
                events.append(json.loads(line))
    return response.status_code, events


async def assert_serves(server: ServerProcess, session_id: str = "fresh-after-fault") -> None:
    async with loopback_client(server.url) as client:
        status, events = await native_events(client, "tokens=3 hello", session_id=session_id)
    assert status == 200, events
    assert [event["type"] for event in events][-1] == "run.completed", events
    assert [event["seq"] for event in events] == list(range(len(events)))


def stored_runs(data_dir: Path) -> dict[str, dict[str, Any]]:
    """Every row of the run store, by run id, read from the file (read-only)
    after the server has exited."""
    uri = f"file:{data_dir / 'runs.sqlite3'}?mode=ro"
    with sqlite3.connect(uri, uri=True) as db:
        db.row_factory = sqlite3.Row
        rows = db.execute(
            "SELECT run_id, session_id, status, cancel_reason, error_code FROM runs"
        ).fetchall()
    return {row["run_id"]: dict(row) for row in rows}


def assert_nothing_running(runs: Mapping[str, Mapping[str, Any]]) -> None:
    running = [run for run in runs.values() if run["status"] == "running"]
    assert not running, running


async def raw_request(
    server: ServerProcess, body: Mapping[str, Any], headers: Mapping[str, str]
) -> trio.SocketStream:
    """Send a chat POST over a bare socket and return the open stream: the
    caller decides when to hang up (httpx2 cannot hang up mid-body cleanly)."""
    target = httpx2.URL(server.url)
    assert target.port is not None
    payload = json.dumps(body).encode()
    head = [
        f"POST {CHAT_PATH} HTTP/1.1",
        f"Host: {target.host}:{target.port}",
        "Content-Type: application/json",
        f"Content-Length: {len(payload)}",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    stream = await trio.open_tcp_stream(target.host, target.port)
    await stream.send_all(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
    return stream


async def read_until(stream: trio.SocketStream, marker: bytes, count: int = 1) -> bytes:
    received = b""
    while received.count(marker) < count:
        data = await stream.receive_some()
        assert data, f"server closed the connection early: {received!r}"
        received += data
    return received
