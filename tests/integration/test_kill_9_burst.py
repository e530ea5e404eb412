"""Finding 3 of issue 11: kill -9 must not lose runs that clients saw start.

A burst of concurrent streaming prompts; as soon as some clients have their
``X-Run-Id`` (and ``run.started``), the server is killed with SIGKILL and
restarted on the same data directory. Every run id a client saw must be in
the store, marked ``interrupted`` / ``crash_recovery`` by the restart.

Bare sockets, not httpx2: a reader that stops mid-body leaves httpx2's
nested async generators unclosed (trio then warns), and here every reader
stops mid-body."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx2
import pytest
import trio

from .harness import ServerProcess, running_server
from .wire import CHAT_PATH, auth

pytestmark = pytest.mark.integration

# Runs last ~20 s: none ends before the kill.
SLOW = ("--token-delay", "0.05", "--reply-words", "400")
BURST = 50
# Clients that must have seen their run start before the kill.
SEEN_BEFORE_KILL = 20
BURST_TIMEOUT = 30.0
# run.started as one NDJSON line (the body is chunked: find the line itself).
STARTED = re.compile(rb'\{[^\n]*"type": ?"run\.started"[^\n]*\}')


class Seen:
    """What the clients of the burst saw, and when enough of them did."""

    def __init__(self) -> None:
        self.run_ids: set[str] = set()
        self.started: set[str] = set()
        self.enough = trio.Event()

    def saw_id(self, run_id: str) -> None:
        self.run_ids.add(run_id)
        if len(self.run_ids) >= SEEN_BEFORE_KILL:
            self.enough.set()


async def prompt_until_killed(server: ServerProcess, index: int, seen: Seen) -> None:
    """POST one streaming prompt; note its run id (from the headers) and its
    ``run.started`` (from the NDJSON body); read until the server dies."""
    target = httpx2.URL(server.url)
    assert target.port is not None
    payload = json.dumps({"prompt": f"burst {index}"}).encode()
    head = "\r\n".join(
        [
            f"POST {CHAT_PATH} HTTP/1.1",
            f"Host: {target.host}:{target.port}",
            "Content-Type: application/json",
            "Accept: application/x-ndjson",
            f"X-Session-Id: burst-{index}",
            *(f"{name}: {value}" for name, value in auth().items()),
            f"Content-Length: {len(payload)}",
        ]
    )
    received = b""
    try:
        async with await trio.open_tcp_stream(target.host, target.port) as stream:
            await stream.send_all(head.encode() + b"\r\n\r\n" + payload)
            while data := await stream.receive_some():
                received += data
                head_bytes, separator, body = received.partition(b"\r\n\r\n")
                if not separator:
                    continue
                for line in head_bytes.decode().split("\r\n")[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "x-run-id":
                        seen.saw_id(value.strip())
                if started := STARTED.search(body):
                    seen.started.add(json.loads(started[0])["run_id"])
    except (OSError, trio.BrokenResourceError):
        pass  # the server was killed under us (connection refused or reset)


async def test_kill_9_after_a_burst_finds_every_run_a_client_saw_start(tmp_path: Path) -> None:
    data = ("--data-dir", str(tmp_path))
    seen = Seen()
    with running_server(*SLOW, *data) as server:
        with trio.fail_after(BURST_TIMEOUT):
            async with trio.open_nursery() as nursery:
                for index in range(BURST):
                    nursery.start_soon(prompt_until_killed, server, index, seen)
                await seen.enough.wait()
                server.proc.kill()
                # Readers see EOF or a reset now, and end.
                await trio.to_thread.run_sync(server.proc.wait)
    saw = seen.run_ids | seen.started
    assert len(saw) >= SEEN_BEFORE_KILL
    with running_server(*data) as restarted:
        async with httpx2.AsyncClient(base_url=restarted.url, timeout=30.0) as client:
            found = {}
            for run_id in sorted(saw):
                response = await client.get(f"/v1/runs/{run_id}", headers=auth())
                if response.status_code == 200:
                    found[run_id] = (response.json()["status"], response.json()["cancel_reason"])
    missing = sorted(saw - found.keys())
    print(
        f"burst={BURST} saw_run_id={len(seen.run_ids)} saw_run_started={len(seen.started)} "
        f"found_after_kill_9={len(found)}/{len(saw)}"
    )
    assert not missing, f"{len(missing)} of {len(saw)} runs clients saw start are lost: {missing}"
    assert set(found.values()) == {("interrupted", "crash_recovery")}
