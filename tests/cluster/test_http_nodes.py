"""Two apps (nodes) in one trio run sharing an in-memory backend: records,
stops, sessions and 503 from any node, through the HTTP routes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from quart_trio import QuartTrio

from server.cluster import setup
from server.cluster.memory import MemoryBackend
from server.settings import Settings
from server.web.app import create_app
from tests.unit.test_http import AUTH, PATH


@asynccontextmanager
async def node(backend: MemoryBackend, **settings: Any) -> AsyncIterator[QuartTrio]:
    app = create_app(
        Settings(
            data_dir="",
            redis_url="redis://memory/0",
            token_delay=1.0,
            reply_words=10,
            api_keys=("devkey", "other"),
            **settings,
        )
    )
    async with app.test_app():
        yield app


@pytest.fixture
def backend(monkeypatch: pytest.MonkeyPatch) -> MemoryBackend:
    shared = MemoryBackend()
    monkeypatch.setattr(setup, "redis_backend", lambda settings: shared)
    return shared


async def start_prompt(app: QuartTrio, nursery: trio.Nursery, prompt: str) -> str:
    """Post a streaming prompt in the background; its run id."""
    ids: list[str] = []
    got = trio.Event()

    async def post() -> None:
        client = app.test_client()
        async with client.request(
            PATH, method="POST", headers={**AUTH, "X-Session-Id": "s1"}
        ) as connection:
            body = {"messages": [{"role": "user", "content": prompt}], "stream": True}
            await connection.send(json.dumps(body).encode())
            await connection.send_complete()
            await connection.receive()
            ids.append(connection.headers["X-Run-Id"])  # type: ignore[index]
            got.set()
            while True:
                try:
                    await connection.receive()
                except trio.EndOfChannel:
                    return

    nursery.start_soon(post)
    await got.wait()
    return ids[0]


async def test_record_stop_and_session_from_the_other_node(
    autojump_clock: trio.testing.MockClock, backend: MemoryBackend
) -> None:
    async with node(backend) as a, node(backend) as b, trio.open_nursery() as nursery:
        run_id = await start_prompt(a, nursery, "first")
        await trio.sleep(2.5)
        response = await b.test_client().get(f"/v1/runs/{run_id}", headers=AUTH)
        assert response.status_code == 200
        assert (await response.get_json())["status"] == "running"
        other = await b.test_client().get(
            f"/v1/runs/{run_id}", headers={"Authorization": "Bearer other"}
        )
        assert other.status_code == 404  # another key sees nothing
        response = await b.test_client().post(f"/v1/runs/{run_id}/cancel", headers=AUTH)
        body = await response.get_json()
        assert (body["status"], body["cancel_reason"]) == ("cancelled", "client_stop")
        session = await b.test_client().get("/v1/sessions/s1", headers=AUTH)
        assert (await session.get_json())["current_run"]["id"] == run_id
        nursery.cancel_scope.cancel()


async def test_prompt_with_the_shared_state_away_is_503(
    autojump_clock: trio.testing.MockClock, backend: MemoryBackend
) -> None:
    async with node(backend) as a:
        backend.available = False
        client = a.test_client()
        response = await client.post(
            PATH,
            headers={**AUTH, "X-Session-Id": "s1"},
            json={"messages": [{"role": "user", "content": "hi"}]},
        )
        assert response.status_code == 503
        assert (await response.get_json())["error"]["code"] == "coordinator_unavailable"
        assert response.headers["Retry-After"] == "2"
        ready = await client.get("/readyz")
        assert ready.status_code == 503
        assert (await ready.get_json())["error"]["code"] == "coordinator_unavailable"
        backend.available = True
        await trio.sleep(1.5)  # the intents reader's next call works
        assert (await client.get("/readyz")).status_code == 200
        scrape = (await (await client.get("/metrics")).get_data()).decode()
        assert "stream_server_cluster_backend_errors_total" in scrape
        assert "stream_server_cluster_remote_cleanup_wait_seconds_bucket" in scrape


async def test_reattach_on_the_other_node_after_a_seq(
    autojump_clock: trio.testing.MockClock, backend: MemoryBackend
) -> None:
    async with node(backend) as a, node(backend) as b, trio.open_nursery() as nursery:
        run_id = await start_prompt(a, nursery, "first")
        await trio.sleep(3.5)
        client = b.test_client()
        async with client.request(
            f"/v1/runs/{run_id}/events",
            method="GET",
            headers={
                **AUTH,
                "Accept": "application/x-ndjson",
                "Last-Event-ID": f"{run_id}:1",
            },
        ) as connection:
            await connection.send_complete()
            body = b""
            while True:
                try:
                    body += await connection.receive()
                except trio.EndOfChannel:
                    break
        events = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        seqs = [event["seq"] for event in events]
        assert seqs == list(range(2, seqs[-1] + 1))  # no gap, no repeat
        assert events[-1]["type"] == "run.completed"
        missing = await b.test_client().get(
            f"/v1/runs/{run_id}/events", headers={"Authorization": "Bearer other"}
        )
        assert missing.status_code == 404
        nursery.cancel_scope.cancel()


async def test_debug_tasks_shows_the_lease_of_each_session(
    autojump_clock: trio.testing.MockClock, backend: MemoryBackend
) -> None:
    async with node(backend, admin_key="admin") as a, trio.open_nursery() as nursery:
        await start_prompt(a, nursery, "first")
        response = await a.test_client().get(
            "/debug/tasks", headers={"Authorization": "Bearer admin"}
        )
        body = await response.get_json()
        (session,) = body["sessions"]
        assert session["lease"] == {"node": body["node"], "token": 1}
        # Let the stream end by itself (the test client cannot be cancelled mid-request).
        await trio.sleep(20)
        nursery.cancel_scope.cancel()


async def test_a_reader_on_the_other_node_gets_the_end_of_a_run_whose_owner_lost_it(
    autojump_clock: trio.testing.MockClock, backend: MemoryBackend
) -> None:
    # Regression: with the owner gone (here: frozen past its lease, as the
    # shared state sees it) nothing ended its run, and a reader following
    # it from another node heartbeated forever.
    async with node(backend) as a, node(backend) as b, trio.open_nursery() as nursery:
        run_id = await start_prompt(a, nursery, "first")
        await trio.sleep(1.5)
        body = b""
        with trio.fail_after(60):
            async with b.test_client().request(
                f"/v1/runs/{run_id}/events",
                method="GET",
                headers={**AUTH, "Accept": "application/x-ndjson", "Last-Event-ID": f"{run_id}:0"},
            ) as connection:
                await connection.send_complete()
                body += await connection.receive()  # following: what was published so far
                backend.jump(100.0)  # every lease has expired for the shared state
                while True:
                    try:
                        body += await connection.receive()
                    except trio.EndOfChannel:
                        break
        events = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        seqs = [event["seq"] for event in events]
        assert seqs == list(range(1, seqs[-1] + 1))
        assert (events[-1]["type"], events[-1]["reason"]) == ("run.interrupted", "owner_lost")
        nursery.cancel_scope.cancel()
