"""RedisBackend against a real redis-server: each primitive and each rule of
server/cluster/backend.py. Expiry is waited for with a bounded poll and the
outcome asserted, never the wall time."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import coredis
import pytest
import trio

from server.cluster.backend import (
    REPLY_TTL,
    Holder,
    Intent,
    IntentKind,
    Lease,
    Published,
    Reply,
    ReplyStatus,
    SessionRef,
)
from server.cluster.redis_backend import RedisBackend
from server.cluster.redis_scripts import LIVE_RUN_TTL, Keys

from .redis_process import RedisProcess

pytestmark = pytest.mark.redis

S = SessionRef(principal="alice", session_id="s1")
TTL = 5.0
SHORT_TTL = 0.2
RETAIN = 30.0
KEYS = Keys()


@pytest.fixture
async def backend(redis_server: RedisProcess) -> AsyncIterator[RedisBackend]:
    async with RedisBackend.from_url(redis_server.url, timeout=2.0) as backend:
        yield backend


@pytest.fixture
async def raw(redis_server: RedisProcess) -> AsyncIterator[coredis.Redis[str]]:
    """A plain client to look at what the backend wrote."""
    client = coredis.Redis.from_url(redis_server.url, decode_responses=True)
    async with client:
        yield client


def event(seq: int, kind: str = "run.delta", **fields: Any) -> dict[str, Any]:
    return {"type": kind, "run_id": "r1", "session_id": S.session_id, "seq": seq, **fields}


def record(
    status: str = "running", created_at: float = 100.0, run_id: str = "r1"
) -> dict[str, Any]:
    return {"id": run_id, "session_id": S.session_id, "status": status, "created_at": created_at}


async def publish(
    backend: RedisBackend,
    lease: Lease,
    events: list[dict[str, Any]],
    *,
    run_id: str = "r1",
    rec: dict[str, Any] | None = None,
    max_events: int = 1000,
) -> bool:
    return await backend.publish(
        lease, run_id, events, record=rec, max_events=max_events, retain_seconds=RETAIN
    )


async def taken(backend: RedisBackend, session: SessionRef, node: str, ttl: float = TTL) -> Lease:
    lease = await backend.acquire(session, node, ttl)
    assert isinstance(lease, Lease), lease
    return lease


async def wait_until_expired(backend: RedisBackend, session: SessionRef) -> None:
    """Polls: Redis expires the key, nothing to wait on."""
    with trio.fail_after(10):
        while True:
            if await backend.holder(session) is None:
                return
            await trio.sleep(0.05)


async def stolen(backend: RedisBackend) -> tuple[Lease, Lease]:
    """A's lease expired and B took the session: (A's stale lease, B's)."""
    old = await taken(backend, S, "A", SHORT_TTL)
    await wait_until_expired(backend, S)
    return old, await taken(backend, S, "B")


# --- leases -------------------------------------------------------------


async def test_acquire_takes_a_free_session_and_names_the_holder_otherwise(
    backend: RedisBackend,
) -> None:
    assert await backend.holder(S) is None
    lease = await taken(backend, S, "A")
    assert (lease.session, lease.node) == (S, "A")

    other = await backend.acquire(S, "B", TTL)
    assert isinstance(other, Holder)
    assert (other.node, other.token, other.busy, other.run_id) == ("A", lease.token, True, None)
    assert 0 < other.expires_in <= TTL
    holder = await backend.holder(S)
    assert holder is not None
    assert (holder.node, holder.token, holder.busy) == ("A", lease.token, True)


async def test_nodes_racing_for_a_session_get_one_lease(
    backend: RedisBackend, redis_server: RedisProcess
) -> None:
    results: list[Lease | Holder] = []
    async with RedisBackend.from_url(redis_server.url) as other:

        async def take(node: str, via: RedisBackend) -> None:
            results.append(await via.acquire(S, node, TTL))

        async with trio.open_nursery() as nursery:
            for n in range(20):
                nursery.start_soon(take, f"node{n}", backend if n % 2 else other)
    leases = [r for r in results if isinstance(r, Lease)]
    assert len(leases) == 1
    assert {(r.node, r.token) for r in results if isinstance(r, Holder)} == {
        (leases[0].node, leases[0].token)
    }


async def test_renew_extends_the_lease_and_records_busy_and_run(
    backend: RedisBackend, raw: coredis.Redis[str]
) -> None:
    lease = await taken(backend, S, "A", ttl=1.0)
    assert await backend.renew(lease, 30.0, busy=False, run_id=None)
    holder = await backend.holder(S)
    assert holder is not None
    assert (holder.busy, holder.run_id) == (False, None)
    assert 1_000 < await raw.pttl(KEYS.lease(S)) <= 30_000

    assert await backend.renew(lease, 30.0, busy=True, run_id="r7")
    holder = await backend.holder(S)
    assert holder is not None
    assert (holder.node, holder.token, holder.busy, holder.run_id) == ("A", lease.token, True, "r7")


async def test_release_frees_the_session(backend: RedisBackend) -> None:
    lease = await taken(backend, S, "A")
    assert await backend.release(lease)
    assert await backend.holder(S) is None
    assert not await backend.release(lease)


async def test_tokens_grow_across_owners_release_expiry_and_sessions(
    backend: RedisBackend,
) -> None:
    first = await taken(backend, S, "A")
    assert await backend.release(first)
    second = await taken(backend, S, "A")  # the same node again
    assert await backend.release(second)
    third = await taken(backend, S, "B", SHORT_TTL)
    await wait_until_expired(backend, S)
    fourth = await taken(backend, S, "C")
    handed = await backend.hand_over(fourth, "D", TTL)
    elsewhere = await taken(backend, SessionRef(principal="bob", session_id="s1"), "A")
    assert handed is not None
    tokens = [first.token, second.token, third.token, fourth.token, handed.token, elsewhere.token]
    assert tokens == sorted(set(tokens))


async def test_an_expired_lease_is_taken_with_a_larger_token(backend: RedisBackend) -> None:
    old = await taken(backend, S, "A", SHORT_TTL)
    await wait_until_expired(backend, S)
    new = await taken(backend, S, "B")
    assert new.token > old.token
    holder = await backend.holder(S)
    assert holder is not None
    assert (holder.node, holder.token) == ("B", new.token)


async def test_tokens_stay_above_the_old_ones_after_redis_lost_its_data(
    backend: RedisBackend, redis_server: RedisProcess
) -> None:
    before = await taken(backend, S, "A")
    redis_server.restart()  # empty: no persistence
    with trio.fail_after(10):
        while True:
            try:
                after = await taken(backend, S, "B")
                break
            except Exception:
                await trio.sleep(0.05)
    assert after.token > before.token
    assert not await backend.renew(before, TTL, busy=True, run_id=None)


async def test_hand_over_gives_the_session_to_the_asker_with_a_new_token(
    backend: RedisBackend,
) -> None:
    lease = await taken(backend, S, "A")
    assert await backend.renew(lease, TTL, busy=True, run_id="r1")
    new = await backend.hand_over(lease, "B", TTL)
    assert new is not None
    assert (new.session, new.node) == (S, "B")
    assert new.token > lease.token
    holder = await backend.holder(S)
    assert holder is not None
    assert (holder.node, holder.token, holder.busy, holder.run_id) == ("B", new.token, True, None)
    # The old token is fenced off; the new one works.
    assert not await backend.renew(lease, TTL, busy=False, run_id=None)
    assert await backend.hand_over(lease, "C", TTL) is None
    assert await backend.renew(new, TTL, busy=False, run_id=None)


async def test_a_retried_hand_over_answers_the_same_lease(backend: RedisBackend) -> None:
    lease = await taken(backend, S, "A")
    new = await backend.hand_over(lease, "B", TTL)
    assert await backend.hand_over(lease, "B", TTL) == new


@pytest.mark.parametrize(
    "write", ["publish", "end_orphan", "renew", "release", "hand_over", "forget_run"]
)
async def test_a_stale_token_writes_nothing(
    backend: RedisBackend, raw: coredis.Redis[str], write: str
) -> None:
    old, new = await stolen(backend)
    assert await publish(backend, new, [event(0, "run.started")], rec=record())
    before = {key: await raw.dump(key) for key in await raw.keys("tss:*") if key != KEYS.fence}
    holder_before = await backend.holder(S)

    if write == "publish":
        result: object = await publish(backend, old, [event(1)], rec=record("completed"))
    elif write == "end_orphan":
        result = await backend.end_orphan(
            old, "r1", event(9, "run.interrupted"), record("interrupted")
        )
    elif write == "renew":
        result = await backend.renew(old, TTL, busy=False, run_id="x")
    elif write == "release":
        result = await backend.release(old)
    elif write == "hand_over":
        result = await backend.hand_over(old, "A", TTL)
    else:
        result = await backend.forget_run(old, "r1")

    assert result in (False, None, Published.LEASE_LOST)
    after = {key: await raw.dump(key) for key in await raw.keys("tss:*") if key != KEYS.fence}
    assert after == before
    holder_after = await backend.holder(S)
    assert holder_before is not None and holder_after is not None
    assert (holder_after.node, holder_after.token) == ("B", new.token)


# --- runs -------------------------------------------------------------


async def test_publish_appends_in_seq_order_with_ids_from_seq(
    backend: RedisBackend, raw: coredis.Redis[str]
) -> None:
    lease = await taken(backend, S, "A")
    assert await publish(backend, lease, [event(0, "run.started")], rec=record())
    assert await publish(backend, lease, [event(1, text="a"), event(2, text="b")])
    entries = await raw.xrange(KEYS.events("r1"))
    assert [entry.identifier for entry in entries] == ["0-1", "0-2", "0-3"]
    assert await backend.run_events("r1", -1, block=0) == [
        event(0, "run.started"),
        event(1, text="a"),
        event(2, text="b"),
    ]
    assert await backend.run_record("r1") == record()


async def test_a_retried_publish_appends_nothing_twice(backend: RedisBackend) -> None:
    lease = await taken(backend, S, "A")
    batch = [event(0, "run.started"), event(1, text="a")]
    assert await publish(backend, lease, batch)
    assert await publish(backend, lease, [*batch, event(2, text="b")])
    assert [e["seq"] for e in await backend.run_events("r1", -1, block=0)] == [0, 1, 2]


async def test_a_gap_is_refused_and_writes_nothing(
    backend: RedisBackend, raw: coredis.Redis[str]
) -> None:
    lease = await taken(backend, S, "A")
    assert await publish(backend, lease, [event(0, "run.started")])
    with pytest.raises(ValueError, match="gap"):
        await publish(backend, lease, [event(2)], rec=record("completed"))
    with pytest.raises(ValueError, match="consecutive"):
        await publish(backend, lease, [event(1), event(3)])
    assert await raw.xlen(KEYS.events("r1")) == 1
    assert await backend.run_record("r1") is None


async def test_nothing_is_published_after_a_terminal_event(backend: RedisBackend) -> None:
    lease = await taken(backend, S, "A")
    done = record("completed")
    assert await publish(backend, lease, [event(0, "run.started"), event(1, "run.completed")])
    assert await publish(backend, lease, [event(1, "run.completed")], rec=done)  # a retry
    assert not await publish(backend, lease, [event(2)])
    assert not await publish(backend, lease, [], rec=record("failed"))
    assert [e["seq"] for e in await backend.run_events("r1", -1, block=0)] == [0, 1]
    assert await backend.run_record("r1") == done


async def test_the_stream_keeps_max_events_and_expires_once_terminal(
    backend: RedisBackend, raw: coredis.Redis[str]
) -> None:
    lease = await taken(backend, S, "A")
    events = [event(0, "run.started"), *(event(seq) for seq in range(1, 6))]
    assert await publish(backend, lease, events, rec=record(), max_events=3)
    assert await raw.xlen(KEYS.events("r1")) == 3
    for key in (KEYS.events("r1"), KEYS.run("r1"), KEYS.session_runs(S)):
        assert RETAIN * 1000 < await raw.pttl(key) <= LIVE_RUN_TTL * 1000, key

    terminal = [event(6, "run.completed")]
    assert await publish(backend, lease, terminal, rec=record("completed"), max_events=3)
    for key in (KEYS.events("r1"), KEYS.run("r1")):
        assert 0 < await raw.pttl(key) <= RETAIN * 1000, key
    assert [e["seq"] for e in await backend.run_events("r1", -1, block=0)] == [4, 5, 6]


async def test_end_orphan_appends_the_terminal_after_the_last_event(
    backend: RedisBackend, raw: coredis.Redis[str]
) -> None:
    _, new = await stolen(backend)
    assert await publish(backend, new, [event(0, "run.started"), event(1)], rec=record())
    # The new owner (any lease of the session) ends the orphan.
    interrupted = record("interrupted")
    orphan = event(99, "run.interrupted", reason="owner_lost")
    assert await backend.end_orphan(new, "r1", orphan, interrupted)
    events = await backend.run_events("r1", -1, block=0)
    assert events[-1] == {**orphan, "seq": 2}
    assert await backend.run_record("r1") == interrupted
    assert 0 < await raw.pttl(KEYS.events("r1")) <= backend.retain_seconds * 1000
    # Already ended: nothing more.
    assert not await backend.end_orphan(new, "r1", orphan, record("failed"))
    assert len(await backend.run_events("r1", -1, block=0)) == 3


async def test_end_orphan_of_a_run_with_no_events(backend: RedisBackend) -> None:
    lease = await taken(backend, S, "A")
    assert await backend.end_orphan(lease, "r2", event(0, "run.interrupted"), record())
    assert [e["seq"] for e in await backend.run_events("r2", -1, block=0)] == [0]


async def test_run_events_after_a_seq_and_empty_after_the_block(backend: RedisBackend) -> None:
    lease = await taken(backend, S, "A")
    assert await publish(backend, lease, [event(seq) for seq in range(4)])
    assert [e["seq"] for e in await backend.run_events("r1", 1, block=0)] == [2, 3]
    assert await backend.run_events("r1", 3, block=0.2) == []
    assert await backend.run_events("unknown", -1, block=0.2) == []


async def test_run_events_waits_for_the_next_event(backend: RedisBackend) -> None:
    lease = await taken(backend, S, "A")
    assert await publish(backend, lease, [event(0, "run.started")])
    got: list[dict[str, Any]] = []

    async def reader() -> None:
        got.extend(await backend.run_events("r1", 0, block=5.0))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.sleep(0.2)  # the reader is blocked in XREAD (or about to be)
        assert got == []
        assert await publish(backend, lease, [event(1, text="x")])
    assert got == [event(1, text="x")]


async def test_session_runs_newest_first(backend: RedisBackend, raw: coredis.Redis[str]) -> None:
    lease = await taken(backend, S, "A")
    for n, created_at in enumerate([10.0, 30.0, 20.0]):
        rec = record(created_at=created_at, run_id=f"r{n}")
        assert await publish(backend, lease, [event(0, "run.started")], run_id=f"r{n}", rec=rec)
    runs = await backend.session_runs(S, 10)
    assert [run["id"] for run in runs] == ["r1", "r2", "r0"]
    assert [run["id"] for run in await backend.session_runs(S, 2)] == ["r1", "r2"]
    # A record that expired drops out.
    await raw.delete([KEYS.run("r2")])
    assert [run["id"] for run in await backend.session_runs(S, 10)] == ["r1", "r0"]
    assert await backend.session_runs(SessionRef(principal="bob", session_id="s1"), 10) == []


async def test_forget_run_deletes_its_record_and_events(backend: RedisBackend) -> None:
    lease = await taken(backend, S, "A")
    assert await publish(backend, lease, [event(0, "run.started")], rec=record())
    assert await backend.forget_run(lease, "r1")
    assert await backend.run_record("r1") is None
    assert await backend.run_events("r1", -1, block=0) == []
    assert await backend.session_runs(S, 10) == []


# --- intents and replies ------------------------------------------------


def intent(kind: IntentKind = IntentKind.SUPERSEDE, reply_to: str = "q1") -> Intent:
    return Intent(kind=kind, session=S, from_node="B", reply_to=reply_to)


async def test_intents_are_durable_and_positions_advance(
    backend: RedisBackend, raw: coredis.Redis[str]
) -> None:
    # Sent while nobody reads; read later from the start.
    await backend.send_intent("A", intent(reply_to="q1"))
    await backend.send_intent("A", intent(IntentKind.STOP, reply_to="q2"))
    assert await raw.pttl(KEYS.inbox("A")) > 0
    first = await backend.read_intents("A", "0", block=0)
    assert [i for _, i in first] == [intent(reply_to="q1"), intent(IntentKind.STOP, "q2")]
    position = first[-1][0]
    assert await backend.read_intents("A", position, block=0.1) == []
    # Another node's inbox is its own.
    assert await backend.read_intents("B", "0", block=0) == []

    await backend.send_intent("A", intent(IntentKind.ENQUEUE, reply_to="q3"))
    later = await backend.read_intents("A", position, block=0)
    assert [i for _, i in later] == [intent(IntentKind.ENQUEUE, "q3")]
    assert later[0][0] != position


async def test_a_blocked_reader_gets_an_intent_sent_after_it_started(
    backend: RedisBackend,
) -> None:
    got: list[tuple[str, Intent]] = []

    async def reader() -> None:
        got.extend(await backend.read_intents("A", "0", block=5.0))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.sleep(0.2)
        await backend.send_intent("A", intent())
    assert [i for _, i in got] == [intent()]


async def test_wait_reply_waits_and_the_reply_stays_readable(
    backend: RedisBackend, raw: coredis.Redis[str]
) -> None:
    assert await backend.wait_reply("q1", block=0.2) is None
    done = Reply(status=ReplyStatus.DONE, token=42)
    got: list[Reply | None] = []

    async def waiter() -> None:
        got.append(await backend.wait_reply("q1", block=5.0))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.sleep(0.2)
        await backend.reply("q1", done)
    assert got == [done]
    assert 0 < await raw.pttl(KEYS.reply("q1")) <= REPLY_TTL * 1000
    # Durable for REPLY_TTL: a second look (a waiter that timed out) finds it.
    assert await backend.wait_reply("q1", block=0.2) == done
    assert await backend.wait_reply("q1", block=0) == done
    record_reply = Reply(status=ReplyStatus.NO_SUCH_RUN, record=record("completed"))
    await backend.reply("q2", record_reply)
    assert await backend.wait_reply("q2", block=1.0) == record_reply
