"""A node killed (kill -9) or paused past its lease (SIGSTOP, then SIGCONT)
while it runs a session's run: another node takes the session once the
lease expired (``--lease-ttl 2``), the dead or paused node's run reads
``interrupted/owner_lost`` with exactly one terminal event, and a resumed
node writes nothing more."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.faults.support import assert_nothing_running
from tests.integration.harness import ServerProcess, loopback_client

from .real import (
    LONG,
    SHORT,
    Streamed,
    archive,
    fake_stats,
    get_json,
    metric,
    prompt_text,
    run_events,
    running_node,
    running_upstream,
    stream_prompt,
    terminals,
)
from .redis_process import RedisProcess, running_redis

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def redis(redis_executable: str) -> Iterator[RedisProcess]:
    with running_redis(redis_executable) as redis:
        yield redis


@pytest.fixture(scope="module")
def upstream() -> Iterator[ServerProcess]:
    with running_upstream() as upstream:
        yield upstream


async def start_long_run(node: ServerProcess, session: str, nursery: trio.Nursery) -> Streamed:
    """A long run on ``node``, producing; its client reads until the stream breaks."""
    a = Streamed()

    async def read() -> None:
        async with loopback_client(node.url) as client:
            try:
                await stream_prompt(client, session, prompt_text(session, "A", LONG), result=a)
            except Exception:  # the node died under it
                a.progressed.set()

    nursery.start_soon(read)
    await a.progressed.wait()
    assert a.run_id is not None
    return a


async def test_kill_9_of_the_owner_mid_run(redis: RedisProcess, upstream: ServerProcess) -> None:
    session = "killed-1"
    with running_node(redis.url, upstream) as one, running_node(redis.url, upstream) as two:
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


async def test_sigstop_past_the_lease_then_sigcont(
    redis: RedisProcess, upstream: ServerProcess, tmp_path: Path
) -> None:
    session = "paused-1"
    with (
        running_node(redis.url, upstream, data_dir=tmp_path / "one") as one,
        running_node(redis.url, upstream, data_dir=tmp_path / "two") as two,
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
            # deadline watch (no renewal for a whole ttl) or a refused write,
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
            assert cause.startswith("not renewed for a whole ttl"), line
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
    # Both archives, once the nodes stopped: nothing running; A ended owner_lost on its node.
    stored = archive(one)
    assert_nothing_running(stored)
    assert_nothing_running(archive(two))
    assert (stored[a.run_id or ""]["status"], stored[a.run_id or ""]["cancel_reason"]) == (
        "interrupted",
        "owner_lost",
    )


async def test_a_reader_on_another_node_sees_a_dead_owners_run_end(
    redis: RedisProcess, upstream: ServerProcess
) -> None:
    # Regression: a reattached reader on another node heartbeated forever
    # once the owner died: nothing ended the orphan until a new prompt came.
    session = "killed-2"
    with running_node(redis.url, upstream) as one, running_node(redis.url, upstream) as two:
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
        events = reattached[0]
        assert [event["seq"] for event in events] == list(range(seen + 1, seen + 1 + len(events)))
        assert [(e["type"], e.get("reason")) for e in terminals(events)] == [
            ("run.interrupted", "owner_lost")
        ]
        assert events[-1]["type"] == "run.interrupted"
