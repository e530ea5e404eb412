"""Response bodies that read a run; the run itself lives elsewhere.

These async generators only read from a run's event log (they never hold a
nursery or a cancel scope across a ``yield``), so the response can be
abandoned at any point without leaving anything behind. Their ``finally``
blocks are synchronous: Quart closes a generator with ``aclose()`` when the
client goes away, and a cancelled task may not await.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import trio

from ..core.events import CancelReason, TerminalEvent
from ..core.run import Run
from ..wire import FrameEncoder


async def stream_run(
    run: Run, encoder: FrameEncoder, *, heartbeat_interval: float, after: int = -1
) -> AsyncIterator[bytes]:
    """Frames for ``run``: every pending event in one frame, a heartbeat when
    the run has been silent for ``heartbeat_interval``, and nothing after the
    terminal event.

    If the body is abandoned before the terminal event went out, the client
    is gone: the run is cancelled with reason ``client_disconnect``."""
    # Subscribed inside the body, so a body that never starts holds nothing.
    subscription = run.subscribe(after=after).open()
    try:
        while not subscription.finished:
            batch = subscription.take()
            if batch:
                yield encoder.encode(batch)
                continue
            with trio.move_on_after(heartbeat_interval) as silence:
                await subscription.wait()
            if silence.cancelled_caught:
                yield encoder.heartbeat()
    finally:
        subscription.close()
        if not subscription.finished:
            run.cancel(CancelReason.CLIENT_DISCONNECT)


async def wait_for_end(run: Run) -> TerminalEvent:
    """Wait for the run's terminal event on behalf of a client that wants one
    answer; a client that goes away meanwhile cancels the run."""
    try:
        await run.wait_ended()
    finally:
        if not run.ended:
            run.cancel(CancelReason.CLIENT_DISCONNECT)
    terminal = run.terminal
    assert terminal is not None
    return terminal
