"""Reattaching to a run that lives on another node (cluster mode): its
events from the shared state, after a seq, live to the terminal event.

The body is an async generator that only awaits bounded reads (no nursery,
no cancel scope around a ``yield``). A heartbeat goes out after
``heartbeat_interval`` seconds without an event. If Redis becomes
unreachable the stream ends; the client reattaches with ``Last-Event-ID``
and misses nothing (entries are keyed by seq).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import trio
from quart import Response

from ..cluster.coordinator import ClusterCoordinator
from ..cluster.records import event_from_dict
from ..core.errors import CoordinatorUnavailable
from ..wire import FrameEncoder
from .streaming import STREAM_HEADERS

# Longest single read of the shared state.
READ_SLICE = 1.0


async def remote_frames(
    cluster: ClusterCoordinator,
    run_id: str,
    after: int,
    encoder: FrameEncoder,
    heartbeat_interval: float,
) -> AsyncIterator[bytes]:
    quiet_since = trio.current_time()
    while True:
        try:
            batch = await cluster.read_events(
                run_id, after, block=min(READ_SLICE, heartbeat_interval)
            )
        except CoordinatorUnavailable:
            return
        events = [event_from_dict(body) for body in batch]
        if events:
            after = events[-1].seq
            yield encoder.encode(events)
            quiet_since = trio.current_time()
            if events[-1].terminal:
                return
        elif trio.current_time() - quiet_since >= heartbeat_interval:
            yield encoder.heartbeat()
            quiet_since = trio.current_time()


def remote_stream_response(
    response_class: type[Response],
    frames: AsyncIterator[bytes],
    encoder: FrameEncoder,
    headers: dict[str, str],
) -> Response:
    response = response_class(
        frames, content_type=encoder.media_type, headers={**STREAM_HEADERS, **headers}
    )
    response.timeout = None  # a stream ends when its run does
    return response
