"""A publish refused because the run already ended in the shared state is
not a lost lease: the owner does not end its session owner_lost for it."""

from __future__ import annotations

import trio
import trio.testing

from server.cluster.memory import MemoryBackend
from server.core import RunStatus
from tests.cluster.nodes import start_node
from tests.cluster.test_failures import scripted


async def test_a_run_ended_in_the_shared_state_is_not_a_lost_lease(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, backend, "a", scripted(5))
        first = await a.prompt("first")
        await trio.sleep(1.5)
        # Its end is written under its own lease meanwhile (as an orphan).
        held = next(iter(a.coordinator.owner.held.values()))
        terminal = {"type": "run.interrupted", "run_id": first.run_id, "reason": "owner_lost"}
        record = {"run_id": first.run_id, "status": "interrupted"}
        assert await backend.end_orphan(held.lease, first.run_id, terminal, record)
        await first.wait_ended()
        assert first.status is RunStatus.COMPLETED  # not owner_lost
        assert a.coordinator.metrics.owner_lost == 0
        nursery.cancel_scope.cancel()
