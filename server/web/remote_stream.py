"""Reattaching to a run that lives on another node (cluster mode): its
events from the shared state, after a seq, live to the terminal event.

The body is an async generator that only awaits bounded reads (no nursery,
no cancel scope around a ``yield``). A heartbeat goes out after
``heartbeat_interval`` seconds without an event. A run silent for longer
than a lease may have lost its owner (killed, cut off): its record is read
again then, which ends an orphan (``owner_lost``), so its terminal event
comes next instead of the reader waiting forever. If Redis becomes
unreachable the stream ends with the encoder's closing frame
(``stream.dropped``, code ``coordinator_unavailable``, the last seq sent);
the client reattaches with ``Last-Event-ID`` and misses nothing (entries
are keyed by seq). Frames are metered like a local run's
(:class:`~server.web.streaming.StreamResponse`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import attrs
import trio

from ..cluster.coordinator import ClusterCoordinator
from ..cluster.records import event_from_dict
from ..core.errors import CoordinatorUnavailable
from ..core.events import ErrorInfo
from ..wire import FrameEncoder, StreamDropped
from .streaming import NullStreamMeter, StreamMeter

# Longest single read of the shared state.
READ_SLICE = 1.0
UNAVAILABLE_MESSAGE = (
    "The cluster's shared state cannot be reached; the run may go on: "
    "reattach with GET /v1/runs/{run_id}/events and Last-Event-ID."
)


@attrs.define(eq=False)
class RemoteStream:
    """A response body that reads a run of another node from the shared
    state (what :class:`~server.web.streaming.RunStream` is for a local run)."""

    cluster: ClusterCoordinator
    principal: str
    run_id: str
    session_id: str
    encoder: FrameEncoder
    heartbeat_interval: float
    after: int = -1
    # Counts what was written (the HTTP connection sets the app's metrics).
    meter: StreamMeter = attrs.field(factory=NullStreamMeter)
    # Set by the HTTP connection as for a local run; a remote reader holds
    # nothing of the run, so it is not used.
    connection_timed_out: Callable[[], bool] = attrs.field(default=lambda: False)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._frames()

    def close(self) -> None:
        """Nothing to let go: the reader holds nothing of the run."""

    async def _frames(self) -> AsyncIterator[bytes]:
        after = self.after
        quiet_since = heard_at = trio.current_time()
        while True:
            try:
                batch = await self.cluster.read_events(
                    self.run_id, after, block=min(READ_SLICE, self.heartbeat_interval)
                )
                silent = trio.current_time() - heard_at
                if not batch and silent >= self.cluster.config.lease_ttl:
                    # Its owner's lease may be gone: reading the record ends
                    # an orphan, whose terminal event the next read finds.
                    heard_at = trio.current_time()
                    if await self.cluster.run_record(self.principal, self.run_id) is None:
                        return  # gone (rolled back, past retention): nothing more comes
            except CoordinatorUnavailable:
                frame = self.encoder.dropped(self._unavailable(after))
                yield frame
                self.meter.frame_sent(events=0, nbytes=len(frame))
                return
            events = [event_from_dict(body) for body in batch]
            if events:
                after = events[-1].seq
                frame = self.encoder.encode(events)
                yield frame
                self.meter.frame_sent(events=len(events), nbytes=len(frame))
                quiet_since = heard_at = trio.current_time()
                if events[-1].terminal:
                    return
            elif trio.current_time() - quiet_since >= self.heartbeat_interval:
                frame = self.encoder.heartbeat()
                yield frame
                self.meter.frame_sent(events=0, nbytes=len(frame))
                quiet_since = trio.current_time()

    def _unavailable(self, after: int) -> StreamDropped:
        return StreamDropped(
            run_id=self.run_id,
            session_id=self.session_id,
            after=after,
            error=ErrorInfo(
                code="coordinator_unavailable",
                message=UNAVAILABLE_MESSAGE.format(run_id=self.run_id),
            ),
        )


def remote_frames(
    cluster: ClusterCoordinator,
    principal: str,
    run_id: str,
    after: int,
    encoder: FrameEncoder,
    heartbeat_interval: float,
    session_id: str = "",
) -> AsyncIterator[bytes]:
    """A remote run's frames (see :class:`RemoteStream`)."""
    stream = RemoteStream(
        cluster, principal, run_id, session_id, encoder, heartbeat_interval, after=after
    )
    return aiter(stream)
