"""The coordinator across nodes sharing one in-memory backend, under
MockClock (exact times): supersede, the conflict policies, stop."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from server.agents.scripted import ScriptedAgent
from server.cluster.backend import SessionRef
from server.cluster.memory import MemoryBackend
from server.core import CancelReason, OnConflict, RunInProgress, RunStatus
from tests.cluster.nodes import PRINCIPAL, journal_index, start_node, terminals
from tests.helpers import AliveProbe, SlowCleanupAgent, assert_well_formed


def scripted(words: int = 5) -> ScriptedAgent:
    return ScriptedAgent(token_delay=1.0, reply_words=words)


async def test_supersede_across_nodes_both_ways(autojump_clock: trio.testing.MockClock) -> None:
    backend = MemoryBackend()
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, backend, "a", scripted(20))
        b = await start_node(nursery, backend, "b", scripted(20))
        first = await a.prompt("first")
        await trio.sleep(2.5)
        second = await b.prompt("second")
        # A's cleanup takes no time: B's run starts at once, after it.
        assert second.started_at == 2.5
        assert first.status is RunStatus.CANCELLED
        assert first.cancel_reason is CancelReason.SUPERSEDED
        await trio.testing.wait_all_tasks_blocked()
        assert journal_index(backend, first.run_id, "run.cancelled") < journal_index(
            backend, second.run_id, "run.started"
        )
        await trio.sleep(1.5)
        third = await a.prompt("third")
        assert third.started_at == 4.0
        assert second.status is RunStatus.CANCELLED
        await trio.testing.wait_all_tasks_blocked()
        assert journal_index(backend, second.run_id, "run.cancelled") < journal_index(
            backend, third.run_id, "run.started"
        )
        await third.wait_ended()
        for run in (first, second, third):
            assert_well_formed(run.log.events)
            assert len(terminals(backend, run.run_id)) == 1
            record = await b.coordinator.run_record(PRINCIPAL, run.run_id)
            assert record is not None and record["status"] == run.status.value
        assert a.coordinator.metrics.handovers_given == 1
        assert b.coordinator.metrics.handovers_given == 1
        nursery.cancel_scope.cancel()


async def test_supersede_waits_exactly_for_a_slow_remote_cleanup(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    probe = AliveProbe()
    agent = SlowCleanupAgent(probe, delay=1.0, words=20, cleanup=3.0)
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, backend, "a", agent)
        b = await start_node(nursery, backend, "b", agent)
        first = await a.prompt("first")
        await trio.sleep(2.5)
        second = await b.prompt("second")
        assert agent.cleaned_up_at["first"] == 5.5
        assert second.started_at == 5.5
        assert probe.most_alive == 1
        assert b.coordinator.metrics.remote_waits[-1] == 3.0
        assert first.cancel_reason is CancelReason.SUPERSEDED
        nursery.cancel_scope.cancel()


async def test_reject_across_nodes(autojump_clock: trio.testing.MockClock) -> None:
    backend = MemoryBackend()
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, backend, "a", scripted(3))
        b = await start_node(nursery, backend, "b", scripted(3))
        first = await a.prompt("first")
        await trio.sleep(1.5)
        with pytest.raises(RunInProgress):
            await b.prompt("second", on_conflict=OnConflict.REJECT)
        assert b.coordinator.metrics.cancels_sent == 0
        await first.wait_ended()
        assert first.status is RunStatus.COMPLETED
        await trio.testing.wait_all_tasks_blocked()
        later = await b.prompt("later", on_conflict=OnConflict.REJECT)
        await later.wait_ended()
        assert later.status is RunStatus.COMPLETED
        nursery.cancel_scope.cancel()


async def test_enqueue_across_three_nodes_keeps_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    async with trio.open_nursery() as nursery:
        nodes = [await start_node(nursery, backend, name, scripted(3)) for name in "abc"]
        runs = {}

        async def prompt(index: int, at: float) -> None:
            await trio.sleep_until(at)
            runs[index] = await nodes[index].prompt(f"p{index}", on_conflict=OnConflict.ENQUEUE)

        async with trio.open_nursery() as prompts:
            prompts.start_soon(prompt, 0, 0.0)
            prompts.start_soon(prompt, 1, 1.0)
            prompts.start_soon(prompt, 2, 1.5)
        await runs[2].wait_ended()
        for index in range(3):
            assert runs[index].status is RunStatus.COMPLETED
        # Each starts exactly when the one before ended by itself.
        assert runs[1].started_at == runs[0].ended_at
        assert runs[2].started_at == runs[1].ended_at
        nursery.cancel_scope.cancel()


async def test_rollback_across_nodes_forgets_the_superseded_run(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, backend, "a", scripted(10))
        b = await start_node(nursery, backend, "b", scripted(10))
        first = await a.prompt("first")
        await trio.sleep(1.5)
        second = await b.prompt("second", on_conflict=OnConflict.ROLLBACK)
        assert second.started_at == 1.5
        assert first.cancel_reason is CancelReason.SUPERSEDED
        assert a.observer.discarded == [first.run_id]
        assert a.manager.runs.lookup(PRINCIPAL, first.run_id) is None
        # Forgotten in the shared state too, before the lease was handed over.
        assert await backend.run_record(first.run_id) is None
        assert backend.stream(first.run_id) == []
        await second.wait_ended()
        await trio.testing.wait_all_tasks_blocked()
        ref = SessionRef(principal=PRINCIPAL, session_id="s1")
        assert [r["run_id"] for r in await backend.session_runs(ref, 10)] == [second.run_id]
        nursery.cancel_scope.cancel()


async def test_rollback_on_the_owning_node_forgets_the_run_in_the_shared_state(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, backend, "a", scripted(10))
        b = await start_node(nursery, backend, "b", scripted(10))
        first = await a.prompt("first")
        await trio.sleep(1.5)
        second = await a.prompt("second", on_conflict=OnConflict.ROLLBACK)
        assert first.cancel_reason is CancelReason.SUPERSEDED
        assert a.observer.discarded == [first.run_id]
        # Its terminal event was published, then it was forgotten everywhere.
        assert journal_index(backend, first.run_id, "run.cancelled") >= 0
        assert await backend.run_record(first.run_id) is None
        assert await b.coordinator.run_record(PRINCIPAL, first.run_id) is None
        await second.wait_ended()
        assert second.status is RunStatus.COMPLETED
        nursery.cancel_scope.cancel()


async def test_stop_from_another_node(autojump_clock: trio.testing.MockClock) -> None:
    backend = MemoryBackend()
    probe = AliveProbe()
    agent = SlowCleanupAgent(probe, delay=1.0, words=20, cleanup=2.0)
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, backend, "a", agent)
        b = await start_node(nursery, backend, "b", agent)
        run = await a.prompt("first")
        await trio.sleep(1.5)
        record = await b.coordinator.stop_run(PRINCIPAL, run.run_id)
        assert trio.current_time() == 3.5  # its cleanup, then the answer
        assert record is not None
        assert (record["status"], record["cancel_reason"]) == ("cancelled", "client_stop")
        assert await b.coordinator.stop_run("someone-else", run.run_id) is None
        assert len(terminals(backend, run.run_id)) == 1
        nursery.cancel_scope.cancel()


async def test_local_prompt_waiting_behind_a_handover_follows_the_session(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    probe = AliveProbe()
    agent = SlowCleanupAgent(probe, delay=1.0, words=20, cleanup=3.0)
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, backend, "a", agent)
        b = await start_node(nursery, backend, "b", agent)
        first = await a.prompt("first")
        runs = {}

        async def prompt(node_name: str, text: str, at: float) -> None:
            await trio.sleep_until(at)
            runs[text] = await {"a": a, "b": b}[node_name].prompt(text)

        async with trio.open_nursery() as prompts:
            prompts.start_soon(prompt, "b", "second", 1.0)
            # Admitted on a while a hands the session to b: it asks b in turn.
            prompts.start_soon(prompt, "a", "third", 2.0)
        assert runs["second"].started_at == 4.0
        assert runs["third"].started_at == 7.0
        assert runs["second"].cancel_reason is CancelReason.SUPERSEDED
        assert first.cancel_reason is CancelReason.SUPERSEDED
        assert probe.most_alive == 1
        assert a.coordinator.metrics.handovers_received == 1
        nursery.cancel_scope.cancel()


async def test_a_node_shutting_down_publishes_its_runs_end_and_releases(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, backend, "a", scripted(20))
        b = await start_node(nursery, backend, "b", scripted(3))
        first = await a.prompt("first")
        await trio.sleep(1.5)
        await a.manager.aclose()
        assert first.cancel_reason is CancelReason.SHUTDOWN
        (terminal,) = terminals(backend, first.run_id)
        assert terminal["type"] == "run.interrupted"
        second = await b.prompt("second")
        assert second.started_at == 1.5  # no lease left to wait out
        nursery.cancel_scope.cancel()


async def test_an_idle_session_gives_its_lease_back_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, backend, "a", scripted(3))
        run = await a.prompt("first")
        session = SessionRef(principal=PRINCIPAL, session_id="s1")
        assert await backend.holder(session) is not None
        assert a.coordinator.leases() != {}
        await run.wait_ended()
        await trio.testing.wait_all_tasks_blocked()
        assert await backend.holder(session) is None
        assert a.coordinator.leases() == {}
        assert a.manager.sessions == {}
        nursery.cancel_scope.cancel()


async def test_lifecycle_lines_name_the_node(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="server.lifecycle")
    backend = MemoryBackend()
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, backend, "a", scripted(20))
        b = await start_node(nursery, backend, "b", scripted(20))
        first = await a.prompt("first")
        second = await b.prompt("second")
        lines = [record.getMessage() for record in caplog.records]
        assert f"stream_cancelled trace={first.run_id} reason=superseded node=a" in lines
        assert any(line.startswith("lease_handed_over session=s1 to=b") for line in lines)
        assert f"stream_start trace={second.run_id} session=s1 node=b" in lines
        nursery.cancel_scope.cancel()


async def test_a_run_is_readable_from_any_node_once_its_id_is_known(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, backend, "a", scripted(3))
        b = await start_node(nursery, backend, "b", scripted(3))
        run = await a.prompt("first")
        # No checkpoint since the prompt returned its run.
        record = backend._runs[run.run_id].record
        assert record is not None and record["status"] == "running"
        assert (await b.coordinator.run_record(PRINCIPAL, run.run_id)) is not None
        nursery.cancel_scope.cancel()
