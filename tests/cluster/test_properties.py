"""Property-based: random prompts, stops, waits and outages on random nodes
of one cluster, under MockClock, with invariant 1 checked after every step
and continuously (an agent call counts as alive until its cleanup is over,
and cleanups take time): never two runs alive for one session, across all
nodes, also while one node is cut off from the shared state."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from server.cluster.intents import MAX_BACKOFF
from server.cluster.memory import MemoryBackend
from server.core import (
    CoordinatorUnavailable,
    OnConflict,
    QueueFull,
    RunInProgress,
    SessionClosed,
)
from server.core.agent import AgentRequest
from server.core.events import AgentOutput, TextDelta
from server.core.run import Run
from tests.cluster.nodes import PRINCIPAL, Node, start_node, terminals
from tests.helpers import AliveProbe, assert_well_formed

SESSIONS = ["s0", "s1"]
NODES = 3

operation = st.one_of(
    st.tuples(
        st.just("submit"),
        st.integers(0, NODES - 1),
        st.sampled_from(SESSIONS),
        st.integers(0, 5),
        st.sampled_from([0.005, 0.5, 6.0]),
        st.sampled_from(list(OnConflict)),
        st.sampled_from([0.0, 0.8]),
    ),
    st.tuples(st.just("stop"), st.integers(0, NODES - 1), st.sampled_from(SESSIONS)),
    st.tuples(st.just("wait"), st.sampled_from([0.0, 0.3, 1.0, 4.0])),
    st.tuples(st.just("outage"), st.sampled_from([0.5, 12.0])),
    # One node cut off from the shared state (in the background: other
    # nodes go on meanwhile), shorter or longer than a lease.
    st.tuples(st.just("cut"), st.integers(0, NODES - 1), st.sampled_from([0.5, 20.0])),
)


class SlowCleanupPromptAgent:
    """``ok N GAP CLEANUP SESSION``: N tokens GAP seconds apart; cancelled,
    it takes CLEANUP seconds (shielded) to let go. The probe counts each
    call alive from its start to the end of its cleanup."""

    name = "prompted-slow-cleanup"

    def __init__(self, probe: AliveProbe) -> None:
        self.probe = probe

    async def run(
        self, request: AgentRequest, send_channel: trio.MemorySendChannel[AgentOutput]
    ) -> None:
        _, count, gap, cleanup, session = request.prompt.split()
        self.probe.enter(session)
        try:
            for index in range(int(count)):
                await trio.sleep(float(gap))
                await send_channel.send(TextDelta(f"t{index} "))
        finally:
            with trio.CancelScope(shield=True):
                await trio.sleep(float(cleanup))
            self.probe.leave(session)


def check(nodes: list[Node], runs: list[Run], probe: AliveProbe) -> None:
    assert probe.most_alive <= 1, probe.alive
    alive: dict[str, int] = {}
    for run in runs:
        if run.alive:
            alive[run.session_id] = alive.get(run.session_id, 0) + 1
        if run.ended:
            assert_well_formed(run.log.events)
    assert all(count <= 1 for count in alive.values()), alive


async def play(program: list[tuple[Any, ...]]) -> None:
    backend = MemoryBackend()
    runs: list[Run] = []
    probe = AliveProbe()
    agent = SlowCleanupPromptAgent(probe)
    async with trio.open_nursery() as nursery:
        nodes = [
            await start_node(nursery, backend, f"n{index}", agent, cleanup_budget=1.0)
            for index in range(NODES)
        ]

        async def submit(node: Node, session: str, prompt: str, on_conflict: OnConflict) -> None:
            try:
                runs.append(await node.prompt(prompt, session, on_conflict))
            # SessionClosed: the session failed to start (the shared state
            # away) while this submission waited behind the one starting it.
            except (RunInProgress, QueueFull, CoordinatorUnavailable, SessionClosed):
                return

        async def stop(node: Node, session: str) -> None:
            mine = [run for run in runs if run.session_id == session]
            if mine:
                try:
                    await node.coordinator.stop_run(PRINCIPAL, mine[-1].run_id)
                except CoordinatorUnavailable:
                    return

        async def cut(node: Node, seconds: float) -> None:
            node.link.cut = True
            await trio.sleep(seconds)
            node.link.cut = False

        async with trio.open_nursery() as clients:
            for step in program:
                match step:
                    case ("submit", index, session, count, gap, on_conflict, cleanup):
                        prompt = f"ok {count} {gap} {cleanup} {session}"
                        clients.start_soon(submit, nodes[index], session, prompt, on_conflict)
                    case ("stop", index, session):
                        clients.start_soon(stop, nodes[index], session)
                    case ("wait", seconds):
                        await trio.sleep(seconds)
                    case ("outage", seconds):
                        backend.available = False
                        await trio.sleep(seconds)
                        backend.available = True
                    case ("cut", index, seconds):
                        clients.start_soon(cut, nodes[index], seconds)
                await trio.testing.wait_all_tasks_blocked()
                check(nodes, runs, probe)
        # Every submission has answered by now (a run started late included).
        with trio.fail_after(120):
            for run in runs:
                await run.wait_ended()
        # A run's end reaches the shared state within a retry (backoff at
        # most a second) once the shared state is back.
        await trio.sleep(MAX_BACKOFF + 2.0)
        await trio.testing.wait_all_tasks_blocked()
        check(nodes, runs, probe)
        for run in runs:
            assert len(terminals(backend, run.run_id)) <= 1
            # Read from any node, nothing is left running: a run whose node
            # lost its lease before publishing its end reads owner_lost.
            record = await nodes[0].coordinator.run_record(PRINCIPAL, run.run_id)
            if record is not None:
                assert record["status"] != "running"
                assert len(terminals(backend, run.run_id)) == 1
        nursery.cancel_scope.cancel()


# derandomize: the same programs every run, so the suite stays deterministic.
@settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(st.lists(operation, max_size=25))
# An owner cut off mid-run while another node takes the session over: its
# run's cleanup must be over before the other node's run starts.
@example(
    [
        ("submit", 0, "s0", 5, 6.0, OnConflict.INTERRUPT, 0.8),
        ("wait", 4.0),
        ("cut", 0, 20.0),
        ("wait", 1.0),
        ("submit", 1, "s0", 1, 0.5, OnConflict.INTERRUPT, 0.0),
    ]
)
def test_one_live_run_per_session_across_nodes(program: list[tuple[Any, ...]]) -> None:
    trio.run(play, program, clock=trio.testing.MockClock(autojump_threshold=0))
