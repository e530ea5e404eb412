"""Redis trouble is never a hang: every RedisBackend call ends within its
timeout with BackendUnavailable when redis-server is gone or frozen, and the
same backend works again once it is back (on the same port)."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import coredis
import coredis.exceptions
import pytest
import trio

from server.cluster.backend import (
    BackendUnavailable,
    Intent,
    IntentKind,
    Lease,
    Reply,
    ReplyStatus,
    SessionRef,
)
from server.cluster.redis_backend import RedisBackend

from .redis_process import RedisProcess, free_port

pytestmark = [pytest.mark.redis, pytest.mark.slow]

S = SessionRef(principal="alice", session_id="s1")
TIMEOUT = 0.5
# A hang guard well above TIMEOUT + block: the outcome is asserted, not the time.
GUARD = 10.0
LEASE = Lease(session=S, node="A", token=1)
INTENT = Intent(kind=IntentKind.SUPERSEDE, session=S, from_node="B", reply_to="q1")
EVENT = {"type": "run.started", "run_id": "r1", "session_id": "s1", "seq": 0}

CALLS: dict[str, Callable[[RedisBackend], Awaitable[Any]]] = {
    "ping": lambda b: b.ping(),
    "acquire": lambda b: b.acquire(S, "A", 5.0),
    "holder": lambda b: b.holder(S),
    "renew": lambda b: b.renew(LEASE, 5.0, busy=True, run_id=None),
    "release": lambda b: b.release(LEASE),
    "hand_over": lambda b: b.hand_over(LEASE, "B", 5.0),
    "publish": lambda b: b.publish(LEASE, "r1", [EVENT], max_events=10, retain_seconds=5),
    "end_orphan": lambda b: b.end_orphan(LEASE, "r1", EVENT, {}),
    "run_record": lambda b: b.run_record("r1"),
    "run_events": lambda b: b.run_events("r1", -1, block=0.2),
    "session_runs": lambda b: b.session_runs(S, 10),
    "send_intent": lambda b: b.send_intent("A", INTENT),
    "read_intents": lambda b: b.read_intents("A", "0", block=0.2),
    "reply": lambda b: b.reply("q1", Reply(status=ReplyStatus.NOT_OWNER)),
    "wait_reply": lambda b: b.wait_reply("q1", block=0.2),
}


@pytest.fixture
async def backend(redis_server: RedisProcess) -> AsyncIterator[RedisBackend]:
    async with RedisBackend.from_url(redis_server.url, timeout=TIMEOUT) as backend:
        await backend.ping()  # connections open before Redis goes away
        await backend.run_events("r1", -1, block=0)
        yield backend


async def answers_again(backend: RedisBackend) -> None:
    with trio.fail_after(GUARD):
        while True:
            try:
                await backend.ping()
                return
            except BackendUnavailable:
                await trio.sleep(0.05)


@pytest.mark.parametrize("call", CALLS)
async def test_every_call_fails_fast_when_redis_is_gone_and_works_after_a_restart(
    backend: RedisBackend, redis_server: RedisProcess, call: str
) -> None:
    redis_server.stop()
    with trio.fail_after(GUARD):
        with pytest.raises(BackendUnavailable):
            await CALLS[call](backend)
    redis_server.start()  # the same port, empty
    await answers_again(backend)
    with trio.fail_after(GUARD):
        await CALLS[call](backend)


@pytest.mark.parametrize("call", CALLS)
async def test_every_call_times_out_when_redis_hangs_and_works_once_it_resumes(
    backend: RedisBackend, redis_server: RedisProcess, call: str
) -> None:
    redis_server.pause()
    with trio.fail_after(GUARD):
        with pytest.raises(BackendUnavailable):
            await CALLS[call](backend)
    redis_server.resume()
    await answers_again(backend)
    with trio.fail_after(GUARD):
        await CALLS[call](backend)


async def test_a_lease_taken_before_a_restart_is_gone_after_it(
    backend: RedisBackend, redis_server: RedisProcess
) -> None:
    lease = await backend.acquire(S, "A", 30.0)
    assert isinstance(lease, Lease)
    redis_server.restart()
    await answers_again(backend)
    assert await backend.holder(S) is None
    assert not await backend.renew(lease, 30.0, busy=True, run_id=None)


async def test_nothing_listening_is_unavailable_not_a_hang() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    async with RedisBackend.from_url(url, timeout=TIMEOUT) as backend:
        with trio.fail_after(GUARD):
            with pytest.raises(BackendUnavailable):
                await backend.ping()


def test_a_url_that_names_no_redis_is_refused() -> None:
    for url in ("http://localhost:6379", "localhost:6379", "redis://"):
        with pytest.raises(ValueError, match="redis url"):
            RedisBackend.from_url(url)


async def test_coredis_still_leaks_streams_of_a_refused_connect() -> None:
    """Shows when redis_clients._ClosingStreams can go: plain coredis 6.9
    leaves a refused connection's memory streams unclosed. Once this fails,
    coredis closes them itself."""
    client = coredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", connect_timeout=1)
    with pytest.warns(ResourceWarning, match="Unclosed <MemoryObject"):
        async with client:
            with pytest.raises(coredis.exceptions.ConnectionError):
                await client.ping()
        del client
        gc.collect()
