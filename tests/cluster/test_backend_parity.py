"""Both backends give each primitive the same meaning: the same tests run
against the in-memory backend and a real redis-server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from server.cluster.backend import ClusterBackend, Lease, SessionRef
from server.cluster.memory import MemoryBackend

S = SessionRef(principal="alice", session_id="s1")
TTL = 5.0
RETAIN = 30.0


@pytest.fixture(params=["memory", "redis"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[ClusterBackend]:
    if request.param == "memory":
        yield MemoryBackend()  # type: ignore[misc]
        return
    from server.cluster.redis_backend import RedisBackend

    redis_server = request.getfixturevalue("redis_server")
    async with RedisBackend.from_url(redis_server.url, timeout=2.0) as redis:
        yield redis


def event(seq: int, kind: str = "run.delta", **fields: Any) -> dict[str, Any]:
    return {"type": kind, "run_id": "r1", "session_id": S.session_id, "seq": seq, **fields}


def record(status: str = "running") -> dict[str, Any]:
    return {"id": "r1", "session_id": S.session_id, "status": status, "created_at": 100.0}


async def taken(backend: ClusterBackend, node: str = "A") -> Lease:
    lease = await backend.acquire(S, node, TTL)
    assert isinstance(lease, Lease), lease
    return lease


async def test_end_orphan_unleased_only_while_nobody_holds_the_session(
    backend: ClusterBackend,
) -> None:
    lease = await taken(backend)
    started = [event(0, "run.started"), event(1)]
    assert await backend.publish(
        lease, "r1", started, record=record(), max_events=100, retain_seconds=RETAIN
    )
    orphan = event(99, "run.interrupted", reason="owner_lost")
    # Held: a reader writes nothing.
    assert not await backend.end_orphan_unleased(S, "r1", orphan, record("interrupted"))
    assert len(await backend.run_events("r1", -1, block=0)) == 2
    assert await backend.release(lease)
    assert await backend.end_orphan_unleased(S, "r1", orphan, record("interrupted"))
    events = await backend.run_events("r1", -1, block=0)
    assert events[-1] == {**orphan, "seq": 2}
    run = await backend.run_record("r1")
    assert run is not None and run["status"] == "interrupted"
    # Already ended: nothing more.
    assert not await backend.end_orphan_unleased(S, "r1", orphan, record("failed"))
    assert len(await backend.run_events("r1", -1, block=0)) == 3
