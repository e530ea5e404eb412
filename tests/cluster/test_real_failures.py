"""A node killed (kill -9) while it runs a session's run: another node takes
the session once the lease expired (a short ``--lease-ttl``), and the dead node's
run reads ``interrupted/owner_lost`` with exactly one terminal event, also
to a reader following it from another node."""

from __future__ import annotations

import signal
from typing import Any

import pytest
import trio

from tests.integration.harness import ServerProcess, loopback_client
from tests.integration.wire import auth

from .real import (
    SHORT,
    fake_stats,
    get_json,
    prompt_text,
    run_events,
    running_node,
    settled,
    start_long_run,
    stream_prompt,
    terminals,
)
from .redis_process import RedisProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def test_kill_9_of_the_owner_mid_run(
    shared_redis: RedisProcess, upstream: ServerProcess
) -> None:
    session = "killed-1"
    with (
        running_node(shared_redis.url, upstream) as one,
        running_node(shared_redis.url, upstream) as two,
    ):
        async with trio.open_nursery() as nursery:
            a = await start_long_run(one, session, nursery)
            one.send_signal(signal.SIGKILL)
            async with loopback_client(two.url) as client:
                b = await stream_prompt(client, session, prompt_text(session, "B", SHORT))
        # The next prompt on the other node completes (once A's lease expired).
        assert b.status == 200 and b.types[-1] == "run.completed", (b.body, b.events)
        status, record = await get_json(two, f"/v1/runs/{a.run_id}")
        assert status == 200, record
        assert (record["status"], record["cancel_reason"]) == ("interrupted", "owner_lost")
        events = await run_events(two, a.run_id or "", last_event_id=f"{a.run_id}:0")
        assert [(e["type"], e.get("reason")) for e in terminals(events)] == [
            ("run.interrupted", "owner_lost")
        ]
        stats = (await fake_stats(upstream))["sessions"][session]
        assert stats["requests"] == 2, stats
        await settled(two)


async def test_a_reader_on_another_node_sees_a_dead_owners_run_end(
    shared_redis: RedisProcess, upstream: ServerProcess
) -> None:
    # Regression: a reattached reader on another node heartbeated forever
    # once the owner died: nothing ended the orphan until a new prompt came.
    session = "killed-2"
    with (
        running_node(shared_redis.url, upstream) as one,
        running_node(shared_redis.url, upstream) as two,
    ):
        async with trio.open_nursery() as nursery:
            a = await start_long_run(one, session, nursery)
            seen = a.events[-1]["seq"]
            reattached: list[list[dict[str, Any]]] = []

            async def reattach() -> None:
                events = await run_events(two, a.run_id or "", last_event_id=f"{a.run_id}:{seen}")
                reattached.append(events)

            nursery.start_soon(reattach)
            await trio.sleep(0.2)  # the reader is following before the kill
            one.send_signal(signal.SIGKILL)
            # A stop from the other node waits the dead owner out and answers
            # the run as the cluster ended it.
            async with loopback_client(two.url) as client:
                response = await client.post(f"/v1/runs/{a.run_id}/cancel", headers=auth())
            assert response.status_code == 200, response.text
            stopped = response.json()
            assert (stopped["status"], stopped["cancel_reason"]) == ("interrupted", "owner_lost")
        events = reattached[0]
        assert [event["seq"] for event in events] == list(range(seen + 1, seen + 1 + len(events)))
        assert [(e["type"], e.get("reason")) for e in terminals(events)] == [
            ("run.interrupted", "owner_lost")
        ]
        assert events[-1]["type"] == "run.interrupted"
        await settled(two)
