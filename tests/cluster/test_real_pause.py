"""A node paused past its lease (SIGSTOP, then SIGCONT) while it runs a
session's run: another node takes the session once the lease expired
(a short ``--lease-ttl``), the paused node's run reads ``interrupted/owner_lost``
with exactly one terminal event, and the resumed node writes nothing more.
A node drained (SIGTERM) mid-run releases the session at once."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import trio

from tests.faults.support import assert_nothing_running
from tests.integration.harness import ServerProcess, loopback_client

from .real import (
    SHORT,
    archive,
    get_json,
    metric,
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


async def test_sigstop_past_the_lease_then_sigcont(
    shared_redis: RedisProcess, upstream: ServerProcess, tmp_path: Path
) -> None:
    session = "paused-1"
    with (
        running_node(shared_redis.url, upstream, data_dir=tmp_path / "one") as one,
        running_node(shared_redis.url, upstream, data_dir=tmp_path / "two") as two,
    ):
        async with trio.open_nursery() as nursery:
            a = await start_long_run(one, session, nursery)
            one.send_signal(signal.SIGSTOP)
            try:
                async with loopback_client(two.url) as client:
                    b = await stream_prompt(client, session, prompt_text(session, "B", SHORT))
            finally:
                one.send_signal(signal.SIGCONT)
            assert b.status == 200 and b.types[-1] == "run.completed", (b.body, b.events)
            # The resumed node finds its lease gone and ends its run there: its
            # deadline watch (no renewal in time) or a refused write,
            # whichever trio runs first after SIGCONT.
            line = await one.wait_for_line(r" lease_lost .*session=" + session)
            cause = line.partition(" cause=")[2]
        # A's client on the resumed node got the same single terminal.
        assert [(e["type"], e.get("reason")) for e in terminals(a.events)] == [
            ("run.interrupted", "owner_lost")
        ], a.events[-3:]
        refused = await metric(one, "stream_server_cluster_fenced_writes_refused_total")
        if cause.startswith(("publish refused", "renewal refused")):
            assert refused >= 1, line
        else:
            assert cause.startswith("not renewed in time"), line
        # From any node: one terminal event in A's events, nothing running.
        for node in (one, two):
            events = await run_events(node, a.run_id or "", last_event_id=f"{a.run_id}:0")
            assert [(e["type"], e.get("reason")) for e in terminals(events)] == [
                ("run.interrupted", "owner_lost")
            ], (node.url, events[-3:])
            # Nothing from the resumed node after the orphan's terminal.
            assert events[-1]["type"] == "run.interrupted", events[-3:]
            for run_id in (a.run_id, b.run_id):
                status, record = await get_json(node, f"/v1/runs/{run_id}")
                assert status == 200 and record["status"] != "running", record
            await settled(node)  # no run, session or lease left on either node
    # Both archives, once the nodes stopped: nothing running; A ended owner_lost on its node.
    stored = archive(one)
    assert_nothing_running(stored)
    assert_nothing_running(archive(two))
    assert (stored[a.run_id or ""]["status"], stored[a.run_id or ""]["cancel_reason"]) == (
        "interrupted",
        "owner_lost",
    )


async def test_sigterm_of_the_owner_mid_run_hands_nothing_to_a_dead_node(
    shared_redis: RedisProcess, upstream: ServerProcess, tmp_path: Path
) -> None:
    # A drained node ends its runs (shutdown), publishes their ends and
    # releases its leases: the next prompt elsewhere needs no lease expiry.
    session = "drained-1"
    with (
        running_node(shared_redis.url, upstream, data_dir=tmp_path / "one") as one,
        running_node(shared_redis.url, upstream) as two,
    ):
        async with trio.open_nursery() as nursery:
            a = await start_long_run(one, session, nursery)
            one.send_signal(signal.SIGTERM)
            assert await one.wait_exit() == 0
        async with loopback_client(two.url) as client:
            b = await stream_prompt(client, session, prompt_text(session, "B", SHORT))
        assert b.status == 200 and b.types[-1] == "run.completed", (b.body, b.events)
        status, record = await get_json(two, f"/v1/runs/{a.run_id}")
        assert status == 200, record
        assert (record["status"], record["cancel_reason"]) == ("interrupted", "shutdown"), record
        events = await run_events(two, a.run_id or "", last_event_id=f"{a.run_id}:0")
        assert [(e["type"], e.get("reason")) for e in terminals(events)] == [
            ("run.interrupted", "shutdown")
        ]
        assert "lease_lost" not in one.log_text()
        await settled(two)
    stored = archive(one)
    assert (stored[a.run_id or ""]["status"], stored[a.run_id or ""]["cancel_reason"]) == (
        "interrupted",
        "shutdown",
    )
