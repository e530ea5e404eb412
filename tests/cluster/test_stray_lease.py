"""A lease held by a node with no session that uses it (a release that did
not get through) is given up once another node asks for the session; the
asker never asks in a loop meanwhile (MockClock, exact times)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from server.cluster.backend import Intent, Lease, SessionRef
from server.cluster.intents import Intents
from server.cluster.memory import MemoryBackend
from tests.cluster.nodes import PRINCIPAL, TTL, start_node
from tests.cluster.test_failures import scripted

S1 = SessionRef(principal=PRINCIPAL, session_id="s1")


async def test_a_stray_lease_on_another_node_is_given_up_when_asked(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, backend, "a", scripted(3))
        b = await start_node(nursery, backend, "b", scripted(3))
        await backend.acquire(S1, "b", TTL)  # b's release never got through
        with trio.fail_after(TTL):
            run = await a.prompt("first")
        assert run.started_at == 0.0  # b released it at once
        assert a.coordinator.metrics.cancels_sent == 1
        assert b.coordinator.metrics.cancels_handled == 1
        nursery.cancel_scope.cancel()


async def test_an_intent_refused_waits_for_the_lease_to_change(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def keep(self: Intents, intent: Intent) -> None:
        await trio.lowlevel.checkpoint()  # the holder keeps it (its runs still end)

    monkeypatch.setattr(Intents, "_give_up_stray", keep)
    backend = MemoryBackend()
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, backend, "a", scripted(3))
        await start_node(nursery, backend, "b", scripted(3))
        await backend.acquire(S1, "b", TTL)
        run = await a.prompt("first")
        assert run.started_at == TTL  # once the stray lease expired
        assert a.coordinator.metrics.cancels_sent == 1  # asked once, then waited
        nursery.cancel_scope.cancel()


async def test_a_lease_handed_over_here_is_no_stray_while_its_acquire_waits(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Regression: a handover is in the backend before its reply reaches the
    # acquire that asked for it. An intent carrying the new token that
    # arrived in between found no session holding it and released it, so
    # the new run's first publish was refused and it ended owner_lost (seen
    # in the cross-node storm test under load).
    backend = MemoryBackend()
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, backend, "a", scripted(3))
        b = await start_node(nursery, backend, "b", scripted(3))
        handed_over = await backend.acquire(S1, "b", TTL)
        assert isinstance(handed_over, Lease)
        b.coordinator.owner.acquiring[S1] += 1  # b's acquire still waits for the reply
        nursery.start_soon(a.prompt, "first")
        await trio.sleep(1.0)  # intents take no clock time; a now waits on b's lease
        assert b.coordinator.metrics.cancels_handled == 1
        holder = await backend.holder(S1)
        assert holder is not None
        assert (holder.node, holder.token) == ("b", handed_over.token)
        nursery.cancel_scope.cancel()
