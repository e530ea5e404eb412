"""An owner cut off from the shared state gives its session up early
enough that its run's cleanup is over before another node can start one
(invariant 1 across nodes), under MockClock with exact times."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from server.cluster.held import ClusterConfig
from server.cluster.memory import MemoryBackend
from server.core import CancelReason
from server.settings import Settings
from tests.cluster.nodes import TTL, start_node
from tests.helpers import AliveProbe, SlowCleanupAgent

CLEANUP_BUDGET = 5.0
CALL_TIMEOUT = 2.0
# Renewals every (TTL - budget - call timeout) / 3 from the acquire at 0.
RENEW_EVERY = (TTL - CLEANUP_BUDGET - CALL_TIMEOUT) / 3


async def test_cut_off_owner_ends_its_slow_cleanup_before_its_lease_expires(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    probe = AliveProbe()
    agent = SlowCleanupAgent(probe, delay=1.0, words=40, cleanup=3.0)
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, backend, "a", agent)
        b = await start_node(nursery, backend, "b", agent)
        first = await a.prompt("first")
        await trio.sleep(4)
        a.link.cut = True  # a's calls fail from here: its lease is not renewed
        await trio.sleep(1)
        second = await b.prompt("second")
        last_renewal = 2 * RENEW_EVERY  # the last renewal before the cut
        assert first.cancel_reason is CancelReason.OWNER_LOST
        # Given up at last renewal + ttl - cleanup budget - call timeout.
        assert first.ended_at == pytest.approx(
            last_renewal + TTL - CLEANUP_BUDGET - CALL_TIMEOUT + 3.0
        )
        assert agent.cleaned_up_at["first"] == first.ended_at
        # b starts only once a's lease expired in the shared state.
        assert second.started_at == pytest.approx(last_renewal + TTL)
        assert probe.most_alive == 1
        nursery.cancel_scope.cancel()


def test_a_lease_ttl_too_short_for_the_cleanup_is_refused() -> None:
    with pytest.raises(ValueError, match="--lease-ttl must exceed"):
        ClusterConfig(lease_ttl=9.0, cleanup_budget=5.0, call_timeout=2.0)
    with pytest.raises(ValueError, match="--lease-ttl must exceed"):
        Settings(redis_url="redis://127.0.0.1:6379/0", lease_ttl=9.0, cleanup_budget=5.0)
    Settings(lease_ttl=1.0)  # not a node: the flag is not used


async def test_a_lease_given_up_is_kept_until_its_runs_cleanup_is_over(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    probe = AliveProbe()
    agent = SlowCleanupAgent(probe, delay=1.0, words=40, cleanup=3.0)
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, backend, "a", agent)
        b = await start_node(nursery, backend, "b", agent)
        first = await a.prompt("first")
        await trio.sleep(4)
        a.link.cut = True
        given_up = 2 * RENEW_EVERY + TTL - CLEANUP_BUDGET - CALL_TIMEOUT
        await trio.sleep_until(given_up + 0.1)
        assert first.cancel_reason is CancelReason.OWNER_LOST and not first.ended
        a.link.cut = False  # a is back while its run still cleans up
        # b asks a (naming a's token): a keeps the lease until the cleanup
        # is over, then releases it; b starts at its next look, not at expiry.
        second = await b.prompt("second")
        assert agent.cleaned_up_at["first"] == given_up + 3.0
        assert given_up + 3.0 <= second.started_at <= given_up + 3.0 + 1.0
        assert second.started_at < 2 * RENEW_EVERY + TTL
        assert probe.most_alive == 1
        nursery.cancel_scope.cancel()
