"""Response bodies that read a run; the run itself lives elsewhere.

Bodies only read from a run's event log (they never hold a nursery or a
cancel scope across a ``yield``), so a response can be abandoned at any
point without leaving anything behind. Their ``finally`` blocks are
synchronous: Quart closes a body with ``aclose()`` when the client goes
away, and a cancelled task may not await.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

import attrs
import trio
from quart import Response

from ..core.eventlog import Subscription
from ..core.events import CancelReason, TerminalEvent
from ..core.run import Run
from ..wire import FrameEncoder

STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class StreamMeter(Protocol):
    def frame_sent(self, *, events: int, nbytes: int) -> None:
        """A frame was written to the client (``events=0``: a heartbeat)."""


class NullStreamMeter:
    def frame_sent(self, *, events: int, nbytes: int) -> None:
        return None


@attrs.define(eq=False)
class RunStream:
    """A response body that reads one run.

    Iterating it yields frames: every pending event in one frame, a
    heartbeat when the run has been silent for ``heartbeat_interval``, and
    nothing after the terminal event. :meth:`close` (from the end of
    iteration, or from the ASGI layer when the body was never iterated) tells
    the run its reader is gone: if the terminal event was not delivered, the
    client went away and the run is cancelled with ``client_disconnect``."""

    run: Run
    encoder: FrameEncoder
    heartbeat_interval: float
    after: int = -1
    # False for readers that only watch (reattach, on_disconnect=continue).
    cancel_on_close: bool = True
    # Counts what was written (the HTTP connection sets the app's metrics).
    meter: StreamMeter = attrs.field(factory=NullStreamMeter)
    _subscription: Subscription = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._subscription = self.run.subscribe(after=self.after).open()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._frames()

    async def _frames(self) -> AsyncIterator[bytes]:
        subscription = self._subscription
        try:
            while not subscription.finished:
                batch = subscription.take()
                if batch:
                    frame = self.encoder.encode(batch)
                    yield frame
                    # Resumed: the frame was written.
                    self.meter.frame_sent(events=len(batch), nbytes=len(frame))
                    continue
                with trio.move_on_after(self.heartbeat_interval) as silence:
                    await subscription.wait()
                if silence.cancelled_caught:
                    heartbeat = self.encoder.heartbeat()
                    yield heartbeat
                    self.meter.frame_sent(events=0, nbytes=len(heartbeat))
        finally:
            self.close()

    def close(self) -> None:
        """Synchronous and idempotent: safe in a cancelled task's ``finally``."""
        self._subscription.close()
        if self.cancel_on_close and not self._subscription.finished:
            self.run.cancel(CancelReason.CLIENT_DISCONNECT)


def streaming_response(
    response_class: type[Response], stream: RunStream, headers: dict[str, str]
) -> Response:
    response = response_class(
        # Quart-Trio streams async generators; anything else it iterates
        # synchronously.
        aiter(stream),
        content_type=stream.encoder.media_type,
        headers={**STREAM_HEADERS, **headers},
    )
    response.timeout = None  # a stream ends when its run does, not at 60 s
    response.run_stream = stream  # type: ignore[attr-defined]  # see StreamingHTTPConnection
    return response


async def wait_for_end(run: Run, *, cancel_on_disconnect: bool = True) -> TerminalEvent:
    """Wait for the run's terminal event on behalf of a client that wants one
    answer; a client that goes away meanwhile cancels the run (unless it
    asked for the run to continue)."""
    try:
        await run.wait_ended()
    finally:
        if cancel_on_disconnect and not run.ended:
            run.cancel(CancelReason.CLIENT_DISCONNECT)
    terminal = run.terminal
    assert terminal is not None
    return terminal
