"""Cross-node supersede between real node processes on one real Redis, both
ways, 50 trials at once in batches: never two upstream streams of a session
open at once (counted by the fake upstream), every superseded run ends
``cancelled/superseded`` with its terminal frame, and the new run starts only
after the old one ended (its record was created after the old run
finished, and its node logged its start after the old node logged the
end). A storm of prompts alternating between the nodes: the same, whatever
order they reach the session in."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import trio

from server.settings import Settings
from tests.integration.harness import ServerProcess, loopback_client

from .real import (
    LONG,
    SHORT,
    Streamed,
    fake_stats,
    get_json,
    logged_at,
    prompt_text,
    running_node,
    running_upstream,
    settled,
    stream_prompt,
)
from .redis_process import running_redis

pytestmark = pytest.mark.integration

DEFAULT_LEASE_TTL = Settings().lease_ttl
DEFAULT_REDIS_TIMEOUT = Settings().redis_timeout

TRIALS = 50
BATCH = 25


@dataclass
class Cluster:
    upstream: ServerProcess
    nodes: tuple[ServerProcess, ServerProcess]


@pytest.fixture(scope="module")
def cluster(redis_executable: str) -> Iterator[Cluster]:
    with (
        running_redis(redis_executable) as redis,
        running_upstream() as upstream,
        # The default lease TTL: these tests are about supersedes, and a
        # short lease (what the failure tests use, to be quick) can run out
        # when the suite's workers starve a node of CPU for that long.
        running_node(
            redis.url, upstream, ttl=DEFAULT_LEASE_TTL, redis_timeout=DEFAULT_REDIS_TIMEOUT
        ) as one,
        running_node(
            redis.url, upstream, ttl=DEFAULT_LEASE_TTL, redis_timeout=DEFAULT_REDIS_TIMEOUT
        ) as two,
    ):
        yield Cluster(upstream, (one, two))


@pytest.fixture(scope="module")
def one_port(redis_executable: str) -> Iterator[Cluster]:
    """``--workers 2``: two nodes behind one listening socket, so each of a
    trial's two connections goes to whichever worker accepts it first."""
    with (
        running_redis(redis_executable) as redis,
        running_upstream() as upstream,
        running_node(
            redis.url,
            upstream,
            "--workers",
            "2",
            ttl=DEFAULT_LEASE_TTL,
            redis_timeout=DEFAULT_REDIS_TIMEOUT,
        ) as port,
    ):
        yield Cluster(upstream, (port, port))


async def trial(
    cluster: Cluster,
    index: int,
    results: dict[str, tuple[Streamed, Streamed]],
    session_prefix: str,
) -> None:
    first, second = cluster.nodes if index % 2 == 0 else cluster.nodes[::-1]
    session = f"{session_prefix}-{index}"
    a, b = Streamed(), Streamed()
    async with (
        loopback_client(first.url) as client_a,
        loopback_client(second.url) as client_b,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(
            lambda: stream_prompt(client_a, session, prompt_text(session, "A", LONG), result=a)
        )
        await a.progressed.wait()  # A's upstream stream is open and producing
        await stream_prompt(client_b, session, prompt_text(session, "B", SHORT), result=b)
    results[session] = (a, b)


async def test_cross_node_supersede_both_ways(cluster: Cluster) -> None:
    await supersede_trials(cluster)
    for node in cluster.nodes:
        await settled(node)


async def test_supersede_on_one_port_with_two_workers(one_port: Cluster) -> None:
    """The same trials with both prompts sent to the port of ``--workers 2``:
    the promise holds whichever worker each connection lands on, and the
    trials show both cases happen."""
    results = await supersede_trials(one_port, session_prefix="port")
    port = one_port.nodes[0]
    crossed = sum(
        worker_of(port, a.run_id or "") != worker_of(port, b.run_id or "")
        for a, b in results.values()
    )
    assert 0 < crossed < TRIALS, crossed


def worker_of(node: ServerProcess, run_id: str) -> str:
    """The ``worker=<i>`` field of the line that logged ``run_id``'s start."""
    marker = f" server.lifecycle stream_start trace={run_id} "
    line = next(line for line in node.lines if marker in line)
    return line.split(" worker=", 1)[1].split(" ", 1)[0]


async def supersede_trials(
    cluster: Cluster, session_prefix: str = "sup"
) -> dict[str, tuple[Streamed, Streamed]]:
    """TRIALS sessions, BATCH at a time: A streams a long answer from one
    node, B supersedes it from the other. Checks every promise of a
    supersede on the results, the records and the logs."""
    results: dict[str, tuple[Streamed, Streamed]] = {}
    for start in range(0, TRIALS, BATCH):
        async with trio.open_nursery() as nursery:
            for index in range(start, start + BATCH):
                nursery.start_soon(trial, cluster, index, results, session_prefix)
    assert len(results) == TRIALS
    stats = (await fake_stats(cluster.upstream))["sessions"]
    overlapping = [s for s in results if stats[s]["max_concurrency"] != 1]
    assert overlapping == [], {s: stats[s] for s in overlapping}
    assert all(stats[s]["requests"] == 2 for s in results), stats
    for session, (a, b) in results.items():
        assert a.status == 200 and b.status == 200, (session, a.body, b.body)
        # The superseded run's stream ends with its own terminal frame.
        assert a.types[-1] == "run.cancelled", (session, a.events[-3:])
        assert a.terminal["reason"] == "superseded", a.terminal
        assert b.types[0] == "run.started" and b.types[-1] == "run.completed", b.events
        # Both records, from the node that did not run each.
        a_node, b_node = (
            cluster.nodes if int(session.split("-")[1]) % 2 == 0 else cluster.nodes[::-1]
        )
        status, a_record = await get_json(b_node, f"/v1/runs/{a.run_id}")
        assert status == 200 and a_record["status"] == "cancelled", a_record
        assert a_record["cancel_reason"] == "superseded", a_record
        status, b_record = await get_json(a_node, f"/v1/runs/{b.run_id}")
        assert status == 200 and b_record["status"] == "completed", b_record
        # B's run was created (run.started) only after A's ended: by the
        # records' times and by the two nodes' lifecycle lines.
        assert b_record["created_at"] >= a_record["finished_at"], (a_record, b_record)
        a_ended = logged_at(a_node, "stream_end", a.run_id or "")
        assert logged_at(b_node, "stream_start", b.run_id or "") >= a_ended
    return results


# The storm: prompts for one session alternate between the nodes faster
# than runs start or end.
SESSIONS = 10
PROMPTS = 6
# Whichever prompt wins may be a long one: 40 tokens at 20 ms.
MEDIUM = "@tokens=40 @delay=0.02"


async def storm(nodes: tuple[ServerProcess, ServerProcess], session: str) -> list[Streamed]:
    results = [Streamed() for _ in range(PROMPTS)]
    async with trio.open_nursery() as nursery:
        for index, result in enumerate(results):
            node = nodes[index % 2]
            last = index == PROMPTS - 1
            text = prompt_text(session, f"P{index}", SHORT if last else MEDIUM)

            async def post(
                node: ServerProcess = node, text: str = text, result: Streamed = result
            ) -> None:
                async with loopback_client(node.url) as client:
                    await stream_prompt(client, session, text, result=result)

            nursery.start_soon(post)
            await trio.sleep(0.02)
    return results


async def test_supersede_storm_across_nodes(cluster: Cluster) -> None:
    outcomes: dict[str, list[Streamed]] = {}

    async def one_session(index: int) -> None:
        outcomes[f"storm-{index}"] = await storm(cluster.nodes, f"storm-{index}")

    async with trio.open_nursery() as nursery:
        for index in range(SESSIONS):
            nursery.start_soon(one_session, index)
    stats = await fake_stats(cluster.upstream)
    for session, results in outcomes.items():
        assert stats["sessions"][session]["max_concurrency"] == 1, stats["sessions"][session]
        assert [r.status for r in results] == [200] * PROMPTS, [r.body for r in results]
        # Prompts sent 20 ms apart to two nodes reach the session in no set
        # order; each supersedes the run live when it takes the session.
        # Every run ends with its own terminal frame, superseded or
        # completed, and the one that took the session last completes.
        ends = [(r.terminal["type"], r.terminal.get("reason")) for r in results]
        assert set(ends) <= {("run.cancelled", "superseded"), ("run.completed", None)}, ends
        upstream_order = [
            int(r["prompt"].split()[0].removeprefix("P"))
            for r in sorted(stats["requests"], key=lambda r: r["started_at"])
            if r["session"] == session
        ]
        assert results[upstream_order[-1]].types[-1] == "run.completed", (session, ends)
    # Nothing left behind: no live run, no session, no lease on either node.
    for node in cluster.nodes:
        await settled(node)
