"""Two real node processes on one real Redis: a stop, a reattach and the
records from the node that does not run the run; another key sees nothing;
``on_conflict`` reject, enqueue and rollback across nodes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import trio

from tests.integration.harness import ServerProcess, loopback_client
from tests.integration.wire import auth, iter_sse

from .real import (
    ADMIN_KEY,
    LONG,
    OTHER_KEY,
    SHORT,
    STREAM_TIMEOUT,
    Streamed,
    assert_gapless,
    fake_stats,
    get_json,
    prompt_text,
    run_events,
    running_node,
    running_upstream,
    settled,
    stream_prompt,
)
from .redis_process import running_redis

pytestmark = pytest.mark.integration

# Long enough to prompt over, short enough to wait for.
MEDIUM = "@tokens=40 @delay=0.02"


@dataclass
class Cluster:
    upstream: ServerProcess
    one: ServerProcess
    two: ServerProcess


@pytest.fixture(scope="module")
def cluster(redis_executable: str) -> Iterator[Cluster]:
    with (
        running_redis(redis_executable) as redis,
        running_upstream() as upstream,
        running_node(redis.url, upstream) as one,
        running_node(redis.url, upstream) as two,
    ):
        yield Cluster(upstream, one, two)


async def test_stop_reattach_and_records_from_the_other_node(cluster: Cluster) -> None:
    session = "stop-1"
    a = Streamed()
    async with loopback_client(cluster.one.url) as client, trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: stream_prompt(client, session, prompt_text(session, "A", LONG), result=a)
        )
        await a.progressed.wait()
        assert a.run_id is not None
        seen = a.events[-1]["seq"]
        reattached: list[list[dict]] = []

        async def reattach() -> None:
            reattached.append(
                await run_events(cluster.two, a.run_id or "", last_event_id=f"{a.run_id}:{seen}")
            )

        nursery.start_soon(reattach)
        # Some more output reaches the reader on node 2 before the stop.
        await trio.sleep(0.2)
        async with loopback_client(cluster.two.url) as other:
            response = await other.post(f"/v1/runs/{a.run_id}/cancel", headers=auth())
        assert response.status_code == 200, response.text
        stopped = response.json()
        assert (stopped["status"], stopped["cancel_reason"]) == ("cancelled", "client_stop")
    # The owner's own stream and the reattached one end with the same terminal.
    assert a.terminal["reason"] == "client_stop", a.events[-2:]
    events = reattached[0]
    assert_gapless(events, first=seen + 1)
    assert events == a.events[seen + 1 :]
    assert events[-1]["type"] == "run.cancelled" and events[-1]["reason"] == "client_stop"
    # Records from the other node; another key sees nothing.
    status, record = await get_json(cluster.two, f"/v1/runs/{a.run_id}")
    assert status == 200 and record["status"] == "cancelled", record
    status, body = await get_json(cluster.two, f"/v1/sessions/{session}")
    assert status == 200, body
    assert [run["id"] for run in body["recent_runs"]] == [a.run_id], body
    for node in (cluster.one, cluster.two):
        for path in (
            f"/v1/runs/{a.run_id}",
            f"/v1/sessions/{session}",
            f"/v1/runs/{a.run_id}/events",
        ):
            status, _ = await get_json(node, path, key=OTHER_KEY)
            assert status == 404, (node.url, path)


async def test_reject_across_nodes(cluster: Cluster) -> None:
    session = "reject-1"
    a = Streamed()
    async with (
        loopback_client(cluster.one.url) as one,
        loopback_client(cluster.two.url) as two,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(
            lambda: stream_prompt(one, session, prompt_text(session, "A", MEDIUM), result=a)
        )
        await a.progressed.wait()
        b = await stream_prompt(
            two, session, prompt_text(session, "B", SHORT), on_conflict="reject"
        )
    assert b.status == 409 and b.body is not None, b
    assert b.body["error"]["code"] == "run_in_progress", b.body
    assert a.types[-1] == "run.completed", a.events[-2:]
    # The rejected prompt never reached the upstream.
    assert (await fake_stats(cluster.upstream))["sessions"][session]["requests"] == 1


async def waiting_on(node: ServerProcess, session: str, count: int) -> None:
    """Until ``count`` submissions (local prompts or other nodes' intents)
    wait in ``session``'s line on ``node`` (its /debug/tasks)."""
    with trio.fail_after(STREAM_TIMEOUT):
        while True:
            async with loopback_client(node.url) as client:
                response = await client.get(
                    "/debug/tasks", headers={**auth(ADMIN_KEY), "Connection": "close"}
                )
            sessions = [s for s in response.json()["sessions"] if s["session_id"] == session]
            if sessions and sessions[0]["waiting_submissions"] >= count:
                return
            await trio.sleep(0.02)


async def test_enqueue_across_nodes_in_order(cluster: Cluster) -> None:
    # A runs on node 1; B (node 2) and then C (node 1, once B's intent has
    # its place in the line there) are enqueued: A, B, C, one after another.
    session = "enqueue-1"
    a, b, c = Streamed(), Streamed(), Streamed()
    async with (
        loopback_client(cluster.one.url) as one,
        loopback_client(cluster.two.url) as two,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(
            lambda: stream_prompt(one, session, prompt_text(session, "A", MEDIUM), result=a)
        )
        await a.progressed.wait()
        nursery.start_soon(
            lambda: stream_prompt(
                two, session, prompt_text(session, "B", MEDIUM), result=b, on_conflict="enqueue"
            )
        )
        await waiting_on(cluster.one, session, 1)  # B's intent, in line behind A
        nursery.start_soon(
            lambda: stream_prompt(
                one, session, prompt_text(session, "C", SHORT), result=c, on_conflict="enqueue"
            )
        )
    assert [x.types[-1] for x in (a, b, c)] == ["run.completed"] * 3
    stats = await fake_stats(cluster.upstream)
    assert stats["sessions"][session]["max_concurrency"] == 1, stats["sessions"][session]
    requests = [r for r in stats["requests"] if r["session"] == session]
    assert [r["prompt"][0] for r in sorted(requests, key=lambda r: r["started_at"])] == [
        "A",
        "B",
        "C",
    ]
    records = [(await get_json(cluster.two, f"/v1/runs/{x.run_id}"))[1] for x in (a, b, c)]
    assert records[0]["finished_at"] <= records[1]["created_at"]
    assert records[1]["finished_at"] <= records[2]["created_at"]


async def test_rollback_across_nodes(cluster: Cluster) -> None:
    session = "rollback-1"
    a = Streamed()
    async with (
        loopback_client(cluster.one.url) as one,
        loopback_client(cluster.two.url) as two,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(
            lambda: stream_prompt(one, session, prompt_text(session, "A", LONG), result=a)
        )
        await a.progressed.wait()
        b = await stream_prompt(
            two, session, prompt_text(session, "B", SHORT), on_conflict="rollback"
        )
    assert a.terminal["type"] == "run.cancelled" and a.terminal["reason"] == "superseded"
    assert b.types[-1] == "run.completed", b.events
    assert (await fake_stats(cluster.upstream))["sessions"][session]["max_concurrency"] == 1
    # The rolled-back run is forgotten on its node and in the shared state.
    for node in (cluster.one, cluster.two):
        status, body = await get_json(node, f"/v1/runs/{a.run_id}")
        assert status == 404, (node.url, body)
        status, body = await get_json(node, f"/v1/sessions/{session}")
        assert [run["id"] for run in body["recent_runs"]] == [b.run_id], (node.url, body)


async def test_rollback_on_the_owning_node_is_forgotten_on_the_other(cluster: Cluster) -> None:
    session = "rollback-2"
    a = Streamed()
    async with loopback_client(cluster.one.url) as one, trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: stream_prompt(one, session, prompt_text(session, "A", LONG), result=a)
        )
        await a.progressed.wait()
        b = await stream_prompt(
            one, session, prompt_text(session, "B", SHORT), on_conflict="rollback"
        )
    assert a.terminal["type"] == "run.cancelled" and a.terminal["reason"] == "superseded"
    assert b.types[-1] == "run.completed", b.events
    for node in (cluster.one, cluster.two):
        status, body = await get_json(node, f"/v1/runs/{a.run_id}")
        assert status == 404, (node.url, body)
        status, body = await get_json(node, f"/v1/sessions/{session}")
        assert [run["id"] for run in body["recent_runs"]] == [b.run_id], (node.url, body)


async def test_reattach_to_an_ended_run_from_the_other_node_over_sse(cluster: Cluster) -> None:
    session = "sse-1"
    async with loopback_client(cluster.one.url) as client:
        a = await stream_prompt(client, session, prompt_text(session, "A", SHORT))
    assert a.types[-1] == "run.completed", a.events
    async with loopback_client(cluster.two.url) as client:
        for headers, query in (({"Last-Event-ID": f"{a.run_id}:0"}, ""), ({}, "?after=0")):
            async with client.stream(
                "GET", f"/v1/runs/{a.run_id}/events{query}", headers={**auth(), **headers}
            ) as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                events = [event async for event in iter_sse(response)]
            assert [e.id for e in events] == [f"{a.run_id}:{e['seq']}" for e in a.events[1:]]
            assert [e.event for e in events] == a.types[1:]
            assert [json.loads(e.data) for e in events] == a.events[1:]


async def test_both_nodes_are_idle_afterwards(cluster: Cluster) -> None:
    # Last in the module: no live run, session or lease left behind.
    for node in (cluster.one, cluster.two):
        await settled(node)
