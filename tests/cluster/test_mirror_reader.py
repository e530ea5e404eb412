"""The run's mirror into the shared state is not one of the run's readers:
``--max-subscribers 1`` leaves the client its reader in cluster mode, and
the session still stays held until the run's end is published."""

from __future__ import annotations

import trio
import trio.testing

from server.cluster.backend import SessionRef
from server.cluster.coordinator import ClusterCoordinator
from server.cluster.held import ClusterConfig
from server.cluster.memory import MemoryBackend
from server.core import AgentRequest, EngineConfig, SessionManager
from tests.cluster.test_failures import scripted


async def test_one_subscriber_allowed_is_the_clients(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    async with trio.open_nursery() as nursery:
        coordinator = ClusterCoordinator(backend=backend, config=ClusterConfig(), node="a")
        manager = SessionManager(
            agent=scripted(3),
            config=EngineConfig(max_subscribers=1),
            coordinator=coordinator,
        )
        await nursery.start(manager.serve)
        run = await manager.submit("p", "s1", AgentRequest(prompt="hi"))
        with run.subscribe() as subscription:
            assert run.subscriber_count == 1
            while not subscription.finished:
                await subscription.wait()
                subscription.take()
        await trio.testing.wait_all_tasks_blocked()
        # Released only once the mirror published the end.
        assert await backend.holder(SessionRef(principal="p", session_id="s1")) is None
        record = await backend.run_record(run.run_id)
        assert record is not None and record["status"] == "completed"
        nursery.cancel_scope.cancel()
