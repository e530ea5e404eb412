"""Reattaching to a run that lives on another node (cluster mode): its
events from the shared state, after a seq, live to the terminal event.

The body is an async generator that only awaits bounded reads (no nursery,
no cancel scope around a ``yield``). A heartbeat goes out after
``heartbeat_interval`` seconds without an event. A run silent for longer
than a lease may have lost its owner (killed, cut off): its record is read
again then, which ends an orphan (``owner_lost``), so its terminal event
comes next instead of the reader waiting forever. If Redis becomes
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
    principal: str,
    run_id: str,
    after: int,
    encoder: FrameEncoder,
    heartbeat_interval: float,
) -> AsyncIterator[bytes]:
    quiet_since = heard_at = trio.current_time()
    while True:
        try:
            batch = await cluster.read_events(
                run_id, after, block=min(READ_SLICE, heartbeat_interval)
            )
            if not batch and trio.current_time() - heard_at >= cluster.config.lease_ttl:
                # Its owner's lease may be gone: reading the record ends an
                # orphan, whose terminal event the next read finds.
                heard_at = trio.current_time()
                await cluster.run_record(principal, run_id)
        except CoordinatorUnavailable:
            return
        events = [event_from_dict(body) for body in batch]
        if events:
            after = events[-1].seq
            yield encoder.encode(events)
            quiet_since = heard_at = trio.current_time()
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
