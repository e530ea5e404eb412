"""A node whose task is cancelled (the app stopping around it) gives its
leases back once its runs' ends are published, whatever their cleanup and
that publish took within their bounds (MockClock)."""

from __future__ import annotations

import trio
import trio.testing

from server.cluster.memory import MemoryBackend
from tests.cluster.nodes import TTL, start_node, terminals
from tests.helpers import AliveProbe, SlowCleanupAgent


async def test_a_node_cancelled_releases_after_a_slow_cleanup_and_publish(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    probe = AliveProbe()
    slow = SlowCleanupAgent(probe, delay=1.0, words=20, cleanup=4.5)
    async with trio.open_nursery() as nursery:
        b = await start_node(nursery, backend, "b", SlowCleanupAgent(probe, words=2))
        async with trio.open_nursery() as inner:
            a = await start_node(inner, backend, "a", slow)
            first = await a.prompt("first")
            await trio.sleep(1.5)

            async def slow_redis() -> None:
                await trio.sleep(4.0)
                a.link.pause()  # the run's end is published late: at 7.0
                await trio.sleep(1.5)
                a.link.resume()

            nursery.start_soon(slow_redis)
            inner.cancel_scope.cancel()  # run cancelled at 1.5, cleaned up at 6.0
        assert len(terminals(backend, first.run_id)) == 1
        second = await b.prompt("second")
        # Released at 7.0 (not left to expire TTL after its acquire at 0).
        assert second.started_at == 7.0 < TTL
        nursery.cancel_scope.cancel()
