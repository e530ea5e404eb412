"""Both backends give each primitive the same meaning: the same tests run
against the in-memory backend and a real redis-server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from server.cluster.backend import (
    SESSION_RUNS_KEPT,
    ClusterBackend,
    Intent,
    IntentKind,
    Lease,
    Published,
    SessionRef,
)
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


async def test_publish_says_lease_lost_or_ended_and_writes_nothing(
    backend: ClusterBackend,
) -> None:
    lease = await taken(backend)
    done = record("completed")
    events = [event(0, "run.started"), event(1, "run.completed")]
    published = await backend.publish(
        lease, "r1", events, record=done, max_events=100, retain_seconds=RETAIN
    )
    assert published is Published.WRITTEN
    # A retry of what is in: written (nothing appended twice).
    retried = await backend.publish(
        lease, "r1", events[1:], record=done, max_events=100, retain_seconds=RETAIN
    )
    assert retried is Published.WRITTEN
    after = await backend.publish(
        lease, "r1", [event(2)], record=None, max_events=100, retain_seconds=RETAIN
    )
    assert after is Published.ENDED
    only_record = await backend.publish(
        lease, "r1", [], record=record("failed"), max_events=100, retain_seconds=RETAIN
    )
    assert only_record is Published.ENDED
    assert await backend.run_record("r1") == done
    assert len(await backend.run_events("r1", -1, block=0)) == 2
    assert await backend.release(lease)
    lost = await backend.publish(
        lease, "r2", [event(0, "run.started")], max_events=100, retain_seconds=RETAIN
    )
    assert lost is Published.LEASE_LOST
    assert await backend.run_record("r2") is None


async def test_a_retried_hand_over_answers_the_same_lease(backend: ClusterBackend) -> None:
    lease = await taken(backend)
    handed = await backend.hand_over(lease, "B", TTL)
    assert handed is not None and handed.node == "B"
    assert await backend.hand_over(lease, "B", TTL) == handed
    assert await backend.hand_over(lease, "C", TTL) is None  # not to another node
    assert await backend.renew(handed, TTL, busy=False, run_id=None)
    assert await backend.hand_over(lease, "B", TTL) == handed


async def test_a_session_keeps_its_newest_runs(backend: ClusterBackend) -> None:
    lease = await taken(backend)
    for n in range(SESSION_RUNS_KEPT + 3):
        rec = {**record(), "run_id": f"r{n}", "created_at": float(n)}
        started = {**event(0, "run.started"), "run_id": f"r{n}"}
        assert await backend.publish(
            lease, f"r{n}", [started], record=rec, max_events=10, retain_seconds=RETAIN
        )
    kept = await backend.session_runs(S, 2 * SESSION_RUNS_KEPT)
    assert [r["run_id"] for r in kept] == [f"r{n}" for n in range(SESSION_RUNS_KEPT + 2, 2, -1)]


async def test_an_intent_carries_the_holders_token(backend: ClusterBackend) -> None:
    sent = Intent(kind=IntentKind.SUPERSEDE, session=S, from_node="B", reply_to="q", token=7)
    await backend.send_intent("A", sent)
    older = Intent(kind=IntentKind.ENQUEUE, session=S, from_node="B", reply_to="q2")
    await backend.send_intent("A", older)
    got = [intent for _, intent in await backend.read_intents("A", "0", block=0)]
    assert got == [sent, older]
