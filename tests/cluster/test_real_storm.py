"""A supersede storm across two real nodes: prompts for one session
alternate between the nodes faster than runs start or end. One prompt per
session completes, every other one ends ``cancelled/superseded`` with its
terminal frame, and the fake upstream never sees two streams of a session
open at once."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import trio

from tests.integration.harness import ServerProcess, loopback_client

from .real import SHORT, Streamed, fake_stats, prompt_text, running_node, stream_prompt
from .redis_process import RedisProcess

pytestmark = pytest.mark.integration

SESSIONS = 10
PROMPTS = 6
# Whichever prompt wins may be a long one: 40 tokens at 20 ms.
MEDIUM = "@tokens=40 @delay=0.02"


@pytest.fixture(scope="module")
def nodes(shared_redis: RedisProcess, upstream: ServerProcess) -> Iterator[list[ServerProcess]]:
    with (
        running_node(shared_redis.url, upstream) as one,
        running_node(shared_redis.url, upstream) as two,
    ):
        yield [one, two]


async def storm(nodes: list[ServerProcess], session: str) -> list[Streamed]:
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


async def test_supersede_storm_across_nodes(
    nodes: list[ServerProcess], upstream: ServerProcess
) -> None:
    outcomes: dict[str, list[Streamed]] = {}

    async def one_session(index: int) -> None:
        outcomes[f"storm-{index}"] = await storm(nodes, f"storm-{index}")

    async with trio.open_nursery() as nursery:
        for index in range(SESSIONS):
            nursery.start_soon(one_session, index)
    stats = await fake_stats(upstream)
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
