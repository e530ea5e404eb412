"""Nodes that die, pause or lose the shared state, under MockClock."""

from __future__ import annotations

import json
from contextlib import aclosing
from typing import Any

import pytest
import trio
import trio.testing

from server.agents.scripted import ScriptedAgent
from server.cluster.backend import SessionRef
from server.cluster.memory import MemoryBackend
from server.core import CancelReason, CoordinatorUnavailable, RunStatus
from server.web.remote_stream import remote_frames
from server.wire import NativeNdjsonEncoder
from tests.cluster.nodes import PRINCIPAL, TTL, start_node, terminals
from tests.helpers import assert_well_formed

S1 = SessionRef(principal=PRINCIPAL, session_id="s1")


def scripted(words: int = 30) -> ScriptedAgent:
    return ScriptedAgent(token_delay=1.0, reply_words=words)


async def test_dead_owner_is_waited_out_then_its_run_ends_owner_lost(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, backend, "a", scripted())
        b = await start_node(nursery, backend, "b", scripted())
        first = await a.prompt("first")
        await trio.sleep(4)
        a.link.pause()  # from here node a reaches nothing: dead, as others see it
        await trio.sleep(1)
        holder = await backend.holder(S1)
        assert holder is not None and holder.node == "a"
        expires_at = trio.current_time() + holder.expires_in
        second = await b.prompt("second")
        assert second.started_at == pytest.approx(expires_at, abs=1e-9)
        record = await b.coordinator.run_record(PRINCIPAL, first.run_id)
        assert record is not None
        assert (record["status"], record["cancel_reason"]) == ("interrupted", "owner_lost")
        (terminal,) = terminals(backend, first.run_id)
        assert terminal["type"] == "run.interrupted" and terminal["reason"] == "owner_lost"
        assert b.coordinator.metrics.orphans_ended == 1
        nursery.cancel_scope.cancel()


async def test_paused_owner_is_fenced_when_it_resumes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, backend, "a", scripted())
        b = await start_node(nursery, backend, "b", scripted())
        first = await a.prompt("first")
        await trio.sleep(4.5)
        # Node a is frozen (SIGSTOP) past its lease: nothing of it runs while
        # the shared state's clock moves on, then b takes the session.
        a.link.pause()
        backend.jump(TTL + 1)
        second = await b.prompt("second")
        assert second.started_at == 4.5
        assert b.coordinator.metrics.orphans_ended == 1
        # a runs again: its next write is refused and its run ends owner_lost.
        a.link.resume()
        await first.wait_ended()
        assert (first.status, first.cancel_reason) == (
            RunStatus.INTERRUPTED,
            CancelReason.OWNER_LOST,
        )
        await trio.testing.wait_all_tasks_blocked()
        assert a.coordinator.metrics.fenced_writes_refused == 1
        assert a.coordinator.metrics.owner_lost == 1
        assert a.live_runs() == []
        assert a.observer.ended[first.run_id].status is RunStatus.INTERRUPTED
        # Exactly one terminal event per run (the orphan's, written by b).
        (terminal,) = terminals(backend, first.run_id)
        assert terminal["reason"] == "owner_lost"
        assert_well_formed(first.log.events)
        await second.wait_ended()
        await trio.testing.wait_all_tasks_blocked()
        assert second.status is RunStatus.COMPLETED
        assert len(terminals(backend, second.run_id)) == 1
        nursery.cancel_scope.cancel()


async def test_owner_cut_off_stops_its_run_before_another_can_take_over(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, backend, "a", scripted())
        b = await start_node(nursery, backend, "b", scripted())
        first = await a.prompt("first")
        await trio.sleep(4)
        a.link.pause()  # a stalled network: a's timers still run
        await trio.sleep(1)
        second = await b.prompt("second")
        # a gave its run up no later than b could take the session.
        assert first.ended_at is not None and first.ended_at <= second.started_at
        assert first.cancel_reason is CancelReason.OWNER_LOST
        a.link.resume()
        await trio.testing.wait_all_tasks_blocked()
        assert len(terminals(backend, first.run_id)) == 1
        assert a.live_runs() == []
        nursery.cancel_scope.cancel()


async def test_owner_that_cannot_renew_for_a_ttl_stops_its_run(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, backend, "a", scripted())
        first = await a.prompt("first")
        await trio.sleep(1)
        a.link.pause()
        await first.wait_ended()
        assert first.cancel_reason is CancelReason.OWNER_LOST
        # Given up cleanup budget (5 s) and a call timeout (2 s) before the
        # lease taken at 0 (no renewal worked since) can expire.
        assert trio.current_time() == TTL - 5.0 - 2.0
        assert a.live_runs() == []
        nursery.cancel_scope.cancel()


async def test_backend_unavailable_is_a_clear_error_and_recovers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, backend, "a", scripted())
        b = await start_node(nursery, backend, "b", scripted(3))
        first = await a.prompt("first")
        await trio.sleep(2)
        backend.available = False
        started = trio.current_time()
        with pytest.raises(CoordinatorUnavailable):
            await b.prompt("second")
        assert trio.current_time() - started <= b.coordinator.config.call_timeout
        # The run in progress ends with a status recorded on its node.
        await first.wait_ended()
        assert (first.status, first.cancel_reason) == (
            RunStatus.INTERRUPTED,
            CancelReason.OWNER_LOST,
        )
        assert a.observer.ended[first.run_id].status is RunStatus.INTERRUPTED
        backend.available = True
        third = await b.prompt("third")
        await third.wait_ended()
        assert third.status is RunStatus.COMPLETED
        record = await b.coordinator.run_record(PRINCIPAL, first.run_id)
        assert record is not None and record["cancel_reason"] == "owner_lost"
        assert len(terminals(backend, first.run_id)) == 1
        nursery.cancel_scope.cancel()


async def test_backend_unavailable_that_does_not_answer_is_bounded(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    async with trio.open_nursery() as nursery:
        b = await start_node(nursery, backend, "b", scripted(3))
        b.link.pause()  # calls hang instead of failing
        started = trio.current_time()
        with pytest.raises(CoordinatorUnavailable):
            await b.prompt("second")
        assert trio.current_time() - started == b.coordinator.config.call_timeout
        b.link.resume()
        run = await b.prompt("again")
        await run.wait_ended()
        assert run.status is RunStatus.COMPLETED
        nursery.cancel_scope.cancel()


async def test_events_from_another_node_after_a_seq_live_to_the_end(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, backend, "a", scripted(6))
        b = await start_node(nursery, backend, "b", scripted(6))
        run = await a.prompt("first")
        await trio.sleep(2.5)
        seen: list[dict[str, Any]] = []
        frames = remote_frames(b.coordinator, PRINCIPAL, run.run_id, 1, NativeNdjsonEncoder(), 15.0)
        async with aclosing(frames):
            async for frame in frames:
                seen += [json.loads(line) for line in frame.decode().splitlines()]
        assert [event["seq"] for event in seen] == list(range(2, len(run.log)))
        assert seen[-1]["type"] == "run.completed"
        assert trio.current_time() == run.ended_at
        nursery.cancel_scope.cancel()


async def test_a_lease_of_this_node_that_no_session_uses_is_dropped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, backend, "a", scripted(3))
        # What a release that never got through leaves behind.
        stale = await backend.acquire(S1, "a", TTL)
        run = await a.prompt("first")
        assert run.started_at == 0.0  # not after the stale lease's ttl
        holder = await backend.holder(S1)
        assert holder is not None and holder.token > stale.token  # type: ignore[union-attr]
        nursery.cancel_scope.cancel()
