"""A reader reattached on another node, from the shared state (MockClock)."""

from __future__ import annotations

import json
from contextlib import aclosing

import trio
import trio.testing

from server.cluster.memory import MemoryBackend
from server.web.remote_stream import remote_frames
from server.wire import NativeNdjsonEncoder
from tests.cluster.nodes import PRINCIPAL, TTL, start_node
from tests.cluster.test_failures import scripted


async def test_a_reader_of_a_dead_owners_run_gets_its_owner_lost_end(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, backend, "a", scripted())
        b = await start_node(nursery, backend, "b", scripted())
        first = await a.prompt("first")
        await trio.sleep(1)
        a.link.pause()  # a is dead (or SIGSTOPped) for good
        lines: list[dict[str, object]] = []
        frames = remote_frames(
            b.coordinator, PRINCIPAL, first.run_id, 0, NativeNdjsonEncoder(), 15.0
        )
        with trio.fail_after(3 * TTL):
            async with aclosing(frames):
                async for frame in frames:
                    lines += [json.loads(line) for line in frame.decode().splitlines()]
        assert lines[-1]["type"] == "run.interrupted"
        assert lines[-1]["reason"] == "owner_lost"
        record = await backend.run_record(first.run_id)
        assert record is not None and record["status"] == "interrupted"
        nursery.cancel_scope.cancel()
