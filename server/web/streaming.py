"""Response bodies that read a run; the run itself lives elsewhere.

Bodies only read from a run's event log (they never hold a nursery or a
cancel scope across a ``yield``), so a response can be abandoned at any
point without leaving anything behind. Their ``finally`` blocks are
synchronous: Quart closes a body with ``aclose()`` when the client goes
away, and a cancelled task may not await.

Slow readers: a reader never holds up its run (the log is appended to
without waiting for anyone) and never holds more than one frame of its own:
when it wakes it takes everything pending as one merged frame. How a slow
reader is told from a client that went away is :class:`RunStream`'s rule
("Slow readers and disconnects").
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Protocol

import attrs
import trio
from quart_trio.wrappers import TrioResponse

from ..core.eventlog import Subscription
from ..core.events import CancelReason, ErrorInfo, TerminalEvent
from ..core.run import Run
from ..wire import FrameEncoder, StreamDropped

logger = logging.getLogger(__name__)

STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SLOW_READER_MESSAGE = (
    "The client read the stream too slowly and was disconnected; "
    "the run goes on: reattach with GET /v1/runs/{run_id}/events."
)


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
    client went away and the run is cancelled with ``client_disconnect``
    (unless ``cancel_on_close`` is off, or the reader was dropped).

    Slow readers and disconnects: ``send_timeout`` is how long a client may
    take no data before it is a slow reader. A slow reader is dropped, and
    its run goes on for its other readers, its record and a reattach from
    the last ``seq`` it got, even with ``on_disconnect: "cancel"``: it did
    not ask to stop. A client whose connection ends any other way (it
    closed or reset it) went away. The reader is slow when

    1. a frame's write took longer than ``send_timeout``: it gets one
       closing frame (:meth:`FrameEncoder.dropped`) and its stream ends;
    2. its connection broke while a write of its had been pending for
       longer than ``send_timeout``; or
    3. the kernel broke its connection because it took no data for
       ``send_timeout`` (``TCP_USER_TIMEOUT``, set by the launcher from
       the same value; ``connection_timed_out`` says so).

    (1) and (2) are what the server sees of a reader whose kernel buffers
    are full; (3) is a reader that takes nothing while the server's writes
    still fit in the kernel's buffers, which at a model's pace can be the
    whole run: at that point no write of ours is pending, and only the
    socket error (``ETIMEDOUT``) says it was the kernel's timeout and not
    the client (:mod:`server.web.connections`). The kernel and the server
    wait the same span but start at different moments: the kernel when the
    client stopped taking data, the server when a write was handed over,
    which is never earlier. So the kernel always acts first, and (2) alone
    would take a reader it cut off for a client that left."""

    run: Run
    encoder: FrameEncoder
    heartbeat_interval: float
    # Seconds one frame's write may take before the reader is dropped; 0: off.
    send_timeout: float = 0.0
    after: int = -1
    # False for readers that only watch (reattach, on_disconnect=continue).
    cancel_on_close: bool = True
    # Counts what was written (the HTTP connection sets the app's metrics).
    meter: StreamMeter = attrs.field(factory=NullStreamMeter)
    # Whether the kernel broke this reader's connection for taking no data
    # (the HTTP connection sets it; see server.web.connections).
    connection_timed_out: Callable[[], bool] = attrs.field(default=lambda: False)
    # Set once the reader was dropped for reading too slowly.
    dropped: bool = attrs.field(default=False, init=False)
    _subscription: Subscription = attrs.field(init=False)
    # When the frame being written was handed over (None: not writing).
    _write_started: float | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        # Raises TooManySubscribers; opened at once so the count is exact.
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
                else:
                    with trio.move_on_after(self.heartbeat_interval) as silence:
                        await subscription.wait()
                    if not silence.cancelled_caught:
                        continue
                    frame = self.encoder.heartbeat()
                # The generator is suspended here until the frame is written.
                self._write_started = trio.current_time()
                yield frame
                took = trio.current_time() - self._write_started
                self._write_started = None
                self.meter.frame_sent(events=len(batch), nbytes=len(frame))
                if self.send_timeout and took > self.send_timeout and not subscription.finished:
                    self._drop(took)
                    yield self.encoder.dropped(self._notice())
                    return
        finally:
            self.close()

    def _drop(self, took: float, *, by: str = "send_timeout") -> None:
        self.dropped = True
        logger.warning(
            "subscriber_dropped trace=%s reason=slow_reader write_s=%.1f sent_seq=%d by=%s",
            self.run.run_id,
            took,
            self._subscription.cursor - 1,
            by,
        )

    def _notice(self) -> StreamDropped:
        run = self.run
        return StreamDropped(
            run_id=run.run_id,
            session_id=run.session_id,
            after=self._subscription.cursor - 1,
            error=ErrorInfo(
                code="slow_reader", message=SLOW_READER_MESSAGE.format(run_id=run.run_id)
            ),
        )

    def close(self) -> None:
        """Synchronous and idempotent: safe in a cancelled task's ``finally``.

        A reader closed while a write of its has been pending for longer
        than ``send_timeout``, or whose connection the kernel broke for
        taking no data, is dropped for slowness, not gone: the run is left
        alone."""
        if not self.dropped:
            started = self._write_started
            pending = 0.0 if started is None else trio.current_time() - started
            if self.send_timeout and pending > self.send_timeout:
                self._drop(pending)
            elif self.connection_timed_out():
                self._drop(pending, by="tcp_user_timeout")
        self._subscription.close()
        if self.cancel_on_close and not self.dropped and not self._subscription.finished:
            self.run.cancel(CancelReason.CLIENT_DISCONNECT)


class BodyStream(Protocol):
    """A response body that reads one run: :class:`RunStream` (a local run)
    or :class:`~server.web.remote_stream.RemoteStream` (another node's)."""

    encoder: FrameEncoder
    meter: StreamMeter
    connection_timed_out: Callable[[], bool]

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    def close(self) -> None: ...


class StreamResponse(TrioResponse):
    """A streaming response whose body reads one run: the HTTP connection
    (:class:`~server.web.asgi.StreamingHTTPConnection`) finds the
    stream here, to meter it and to close it if the body was never
    iterated."""

    def __init__(self, stream: BodyStream, headers: dict[str, str]) -> None:
        super().__init__(
            # Quart-Trio streams async generators; anything else it iterates
            # synchronously.
            aiter(stream),
            content_type=stream.encoder.media_type,
            headers={**STREAM_HEADERS, **headers},
        )
        self.run_stream = stream
        self.timeout = None  # a stream ends when its run does, not at 60 s


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
