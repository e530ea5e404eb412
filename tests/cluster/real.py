"""Real node processes (``python -m server --redis-url ...``) on loopback,
sharing one real ``redis-server``, with the fake upstream as their agent's
LLM (``--agent openai``), for the tests of issue 12's "what must be shown".

Resource handling: :func:`running_upstream` and :func:`running_node` are
context managers over :func:`~tests.integration.harness.running_server`, so
every process is stopped and waited for (a node killed by the test is only
reaped). Each node gets a data dir of its own (a test that reads a node's
SQLite archive after it stopped, with :func:`archive`, gives it one).

Waiting: every HTTP call goes through a client with a timeout; streams are
read under ``trio.fail_after``; nothing waits on wall time to pass except
the lease TTL the failure tests are about.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx2
import trio

from server.settings import CLUSTER_CALL_TIMEOUT
from tests.faults.support import ndjson_headers, stored_runs
from tests.integration.harness import (
    FakeUpstreamProcess,
    ServerProcess,
    loopback_client,
    running_server,
)
from tests.integration.wire import CHAT_PATH, auth

ADMIN_KEY = "cluster-admin"
OTHER_KEY = "other"
# The shortest lease a node accepts with this cleanup budget and Redis call
# bound: it gives a session up CLEANUP_BUDGET + one call before the lease
# can expire, and needs a call's time to renew
# (server.settings.check_lease_ttl). Half the default call bound keeps the
# waits for a dead node's lease short; Redis answers on loopback in well
# under a millisecond.
CLEANUP_BUDGET = 0.5
REDIS_TIMEOUT = CLUSTER_CALL_TIMEOUT / 2
LEASE_TTL = CLEANUP_BUDGET + 2 * REDIS_TIMEOUT + 0.5
STREAM_TIMEOUT = 30.0
SETTLE_TIMEOUT = 15.0
TERMINAL = frozenset({"run.completed", "run.cancelled", "run.interrupted", "run.failed"})
# A: long enough to be superseded mid-stream (200 tokens at 20 ms); B: short.
LONG = "@tokens=200 @delay=0.02"
SHORT = "@tokens=3 @delay=0"


@contextmanager
def running_upstream() -> Iterator[ServerProcess]:
    with running_server("--delay", "0.01", kind=FakeUpstreamProcess) as upstream:
        yield upstream


@contextmanager
def running_node(
    redis_url: str,
    upstream: ServerProcess,
    *args: str,
    ttl: float = LEASE_TTL,
    redis_timeout: float = REDIS_TIMEOUT,
    data_dir: Path | None = None,
) -> Iterator[ServerProcess]:
    """One node. Its data dir is removed when the block ends, unless the test
    gives one (to read the archive afterwards with :func:`archive`)."""
    own = data_dir is None
    data_dir = Path(tempfile.mkdtemp(prefix="tss-node-")) if data_dir is None else data_dir
    try:
        with running_server(
            "--redis-url", redis_url,
            "--lease-ttl", str(ttl),
            "--redis-timeout", str(redis_timeout),
            "--cleanup-budget", str(CLEANUP_BUDGET),
            "--agent", "openai",
            "--upstream-url", f"{upstream.url}/v1",
            "--model", "fake",
            "--api-key", "devkey",
            "--api-key", OTHER_KEY,
            "--admin-key", ADMIN_KEY,
            "--drain-timeout", "2",
            "--keep-alive-timeout", "1",
            "--data-dir", str(data_dir),
            *args,
        ) as node:  # fmt: skip
            yield node
    finally:
        if own:
            shutil.rmtree(data_dir, ignore_errors=True)


def archive(node: ServerProcess) -> dict[str, dict[str, Any]]:
    """The node's SQLite archive, read-only (after the node has exited)."""
    assert node.data_dir is not None and node.proc.poll() is not None
    return stored_runs(Path(node.data_dir))


@dataclass
class Streamed:
    """One prompt's NDJSON answer, read to its end."""

    status: int = 0
    run_id: str | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    started: trio.Event = field(default_factory=trio.Event)
    progressed: trio.Event = field(default_factory=trio.Event)  # a first run.delta

    @property
    def types(self) -> list[str]:
        return [event["type"] for event in self.events]

    @property
    def terminal(self) -> dict[str, Any]:
        ends = [event for event in self.events if event["type"] in TERMINAL]
        assert len(ends) == 1, self.events
        return ends[0]


async def start_long_run(node: ServerProcess, session: str, nursery: trio.Nursery) -> Streamed:
    """A long run on ``node``, producing; its client reads until the stream breaks."""
    a = Streamed()

    async def read() -> None:
        async with loopback_client(node.url) as client:
            try:
                await stream_prompt(client, session, prompt_text(session, "A", LONG), result=a)
            except httpx2.TransportError:  # the node died under it
                a.progressed.set()

    nursery.start_soon(read)
    await a.progressed.wait()
    assert a.run_id is not None
    return a


def prompt_text(session: str, label: str, directives: str) -> str:
    # @session names the session at the fake, which counts its open streams.
    return f"{label} @session={session} {directives}"


async def stream_prompt(
    client: httpx2.AsyncClient,
    session: str,
    text: str,
    *,
    result: Streamed | None = None,
    key: str = "devkey",
    **body: Any,
) -> Streamed:
    """POST a prompt for NDJSON events and read them to the end; ``result.started``
    is set once the headers (and so the run id) are in."""
    result = Streamed() if result is None else result
    payload = {"messages": [{"role": "user", "content": text}], "stream": True, **body}
    headers = {**ndjson_headers(session), **auth(key)}
    try:
        with trio.fail_after(STREAM_TIMEOUT):
            async with client.stream("POST", CHAT_PATH, json=payload, headers=headers) as response:
                result.status = response.status_code
                result.headers = dict(response.headers)
                result.run_id = response.headers.get("x-run-id")
                if response.status_code != 200:
                    result.body = json.loads(await response.aread())
                    return result
                result.started.set()
                async for line in response.aiter_lines():
                    if line:
                        result.events.append(json.loads(line))
                        if result.events[-1]["type"] == "run.delta":
                            result.progressed.set()
    finally:
        result.started.set()
        result.progressed.set()
    return result


async def get_json(node: ServerProcess, path: str, key: str = "devkey") -> tuple[int, Any]:
    async with loopback_client(node.url, timeout=STREAM_TIMEOUT) as client:
        response = await client.get(path, headers=auth(key))
    return response.status_code, response.json()


async def run_events(
    node: ServerProcess, run_id: str, *, last_event_id: str | None = None
) -> list[dict[str, Any]]:
    """``GET /v1/runs/{id}/events`` as NDJSON, read to the terminal event."""
    headers = {**auth(), "Accept": "application/x-ndjson"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    events: list[dict[str, Any]] = []
    with trio.fail_after(STREAM_TIMEOUT):
        async with loopback_client(node.url, timeout=STREAM_TIMEOUT) as client:
            async with client.stream(
                "GET", f"/v1/runs/{run_id}/events", headers=headers
            ) as response:
                assert response.status_code == 200, await response.aread()
                async for line in response.aiter_lines():
                    if line:
                        events.append(json.loads(line))
    return events


async def fake_stats(upstream: ServerProcess) -> dict[str, Any]:
    async with loopback_client(upstream.url) as client:
        response = await client.get("/_fake/stats")
    assert response.status_code == 200
    stats: dict[str, Any] = response.json()
    return stats


async def metric(node: ServerProcess, name: str) -> float:
    """One sample of ``/metrics`` (no labels); fails if the node has no such metric."""
    async with loopback_client(node.url) as client:
        response = await client.get("/metrics")
    for line in response.text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name} in /metrics")


def logged_at(node: ServerProcess, name: str, run_id: str) -> datetime:
    """When ``node`` logged lifecycle event ``name`` for ``run_id`` (the text
    format's timestamp, milliseconds; all nodes share this host's clock)."""
    marker = f" server.lifecycle {name} trace={run_id} "
    line = next((line for line in node.lines if marker in line), None)
    assert line is not None, f"{name} of {run_id} not logged:\n{node.log_text(last=30)}"
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")


async def settled(node: ServerProcess) -> dict[str, Any]:
    """``/debug/tasks`` once the node holds no live run and no session (no
    lease either): fails with the last answer if that does not happen."""
    body: dict[str, Any] = {}
    try:
        with trio.fail_after(SETTLE_TIMEOUT):
            while True:
                async with loopback_client(node.url) as client:
                    response = await client.get(
                        "/debug/tasks", headers={**auth(ADMIN_KEY), "Connection": "close"}
                    )
                body = response.json()
                if body["live_runs"] == 0 and not body["sessions"]:
                    return body
                await trio.sleep(0.05)
    except trio.TooSlowError:
        figures = {key: body.get(key) for key in ("live_runs", "sessions", "tasks")}
        raise AssertionError(f"{node.url} not idle after {SETTLE_TIMEOUT}s: {figures}") from None


def terminals(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [event for event in events if event["type"] in TERMINAL]


def assert_gapless(events: list[dict[str, Any]], first: int = 0) -> None:
    seqs = [event["seq"] for event in events]
    assert seqs == list(range(first, first + len(seqs))), seqs
