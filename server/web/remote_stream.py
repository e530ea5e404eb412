"""Reattaching to a run that lives on another node (cluster mode): its
events from the shared state, after a seq, live to the terminal event.

The body is an async generator that only awaits bounded reads (no nursery,
no cancel scope around a ``yield``). A heartbeat goes out after
``heartbeat_interval`` seconds without an event. After each read that
brought nothing the run's record is read: that ends a run whose owner died
or was paused past its lease (``owner_lost``), so a follower is never left
waiting for a terminal event nobody will write, and a run that is gone
(rolled back, past retention) ends the stream. If Redis becomes
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
            continue
        # A whole read without an event: reading the record ends the run
        # (owner_lost) if its owner lost the session (died, paused), so the
        # terminal event comes next; a run no longer there (rolled back,
        # past retention) will send nothing more.
        try:
            if await cluster.run_record(principal, run_id) is None:
                return
        except CoordinatorUnavailable:
            return
        if trio.current_time() - quiet_since >= heartbeat_interval:
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
