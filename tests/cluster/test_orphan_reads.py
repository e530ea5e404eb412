"""Reading a record ends an orphan without taking the session's lease: a
prompt elsewhere at that moment is neither refused nor sent an intent."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from server.cluster.backend import SessionRef
from server.cluster.memory import MemoryBackend
from server.core import OnConflict
from tests.cluster.nodes import PRINCIPAL, TTL, start_node
from tests.cluster.test_failures import scripted

S1 = SessionRef(principal=PRINCIPAL, session_id="s1")


async def test_a_read_settling_an_orphan_takes_no_lease(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    acquired_by: list[str] = []
    acquire = MemoryBackend.acquire

    async def recording(self: MemoryBackend, session: SessionRef, node: str, ttl: float) -> Any:
        acquired_by.append(node)
        return await acquire(self, session, node, ttl)

    monkeypatch.setattr(MemoryBackend, "acquire", recording)
    backend = MemoryBackend()
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, backend, "a", scripted())
        b = await start_node(nursery, backend, "b", scripted())
        c = await start_node(nursery, backend, "c", scripted(2))
        first = await a.prompt("first")
        await trio.sleep(1)
        a.link.pause()  # a is dead: its lease expires, its run is an orphan
        await trio.sleep(TTL)
        assert await backend.holder(S1) is None
        records: list[Any] = []

        async def read() -> None:
            records.append(await b.coordinator.run_record(PRINCIPAL, first.run_id))

        nursery.start_soon(read)
        for _ in range(50):  # while the read is under way (it held the lease)
            holder = await backend.holder(S1)
            if holder is not None and holder.node == "b":
                break
            await trio.lowlevel.checkpoint()
        second = await c.prompt("second", on_conflict=OnConflict.REJECT)  # not 409
        await second.wait_ended()
        await trio.testing.wait_all_tasks_blocked()
        assert records[0]["status"] == "interrupted"
        assert records[0]["cancel_reason"] == "owner_lost"
        assert "b" not in acquired_by
        assert c.coordinator.metrics.cancels_sent == 0
        nursery.cancel_scope.cancel()
