"""A reader reattached on another node, from the shared state (MockClock)."""

from __future__ import annotations

import json
from contextlib import aclosing
from typing import Any

import attrs
import trio
import trio.testing

from server.cluster.memory import MemoryBackend
from server.web.remote_stream import RemoteStream, remote_frames
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


@attrs.define
class RecordingMeter:
    frames: list[tuple[int, int]] = attrs.field(factory=list)

    def frame_sent(self, *, events: int, nbytes: int) -> None:
        self.frames.append((events, nbytes))


async def test_a_remote_stream_ends_with_a_closing_frame_when_redis_goes_away(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, backend, "a", scripted())
        b = await start_node(nursery, backend, "b", scripted())
        first = await a.prompt("first")
        meter = RecordingMeter()
        stream = RemoteStream(
            b.coordinator, PRINCIPAL, first.run_id, "s1", NativeNdjsonEncoder(), 15.0, meter=meter
        )
        lines: list[dict[str, Any]] = []
        frames = aiter(stream)
        with trio.fail_after(TTL):
            async with aclosing(frames):
                async for frame in frames:
                    lines += [json.loads(line) for line in frame.decode().splitlines()]
                    if len(lines) >= 3:
                        backend.available = False
        last = lines[-1]
        assert last["type"] == "stream.dropped"
        assert last["error"]["code"] == "coordinator_unavailable"
        assert last["after"] == lines[-2]["seq"]  # reattach after what it got
        assert len(meter.frames) >= 2 and sum(n for n, _ in meter.frames) == len(lines) - 1
        backend.available = True
        nursery.cancel_scope.cancel()
