"""The old ``StreamRegistry``: one dict entry per session, superseded by
cancel + ``wait_for(prev_task, 2.0)`` + "register anyway" (see the package
docstring). Reproduced as it was; its flaws are the point of the baseline."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

# The same logger name and line format as trio-stream-server's lifecycle log,
# so one harness parses both servers' logs.
lifecycle_logger = logging.getLogger("server.lifecycle")

PREV_STREAM_WAIT = 2.0


def lifecycle_event(name: str, *, level: int = logging.INFO, **fields: object) -> None:
    text = " ".join(f"{key}={value}" for key, value in fields.items())
    lifecycle_logger.log(level, "%s %s", name, text)


@dataclass(eq=False)
class StreamHandle:
    """One streaming response and the agent task feeding it."""

    session_id: str
    # The session's model lock, shared by its streams (see StreamRegistry.lock_for).
    lock: asyncio.Lock
    trace: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    cancel_event: asyncio.Event = field(default_factory=asyncio.Event)
    # Read by the blocking model client (in its thread) between SSE lines.
    model_cancel: threading.Event = field(default_factory=threading.Event)
    queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    task: asyncio.Task[None] | None = None
    cancel_reason: str | None = None
    started_at: float = field(default_factory=time.monotonic)

    def mark_cancelled(self, reason: str) -> None:
        if self.cancel_reason is None:
            self.cancel_reason = reason
            lifecycle_event("stream_cancelled", trace=self.trace, reason=reason)


class StreamRegistry:
    def __init__(self) -> None:
        self._streams: dict[str, StreamHandle] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def lock_for(self, session_id: str) -> asyncio.Lock:
        # One model call per session at a time... until register() releases it.
        return self._locks.setdefault(session_id, asyncio.Lock())

    def get(self, session_id: str) -> StreamHandle | None:
        return self._streams.get(session_id)

    def __len__(self) -> int:
        return len(self._streams)

    async def register(self, handle: StreamHandle) -> None:
        prev = self._streams.get(handle.session_id)
        if prev is not None and prev.task is not None and not prev.task.done():
            wait_started = time.monotonic()
            prev.mark_cancelled("superseded")
            prev.cancel_event.set()
            prev.task.cancel()
            prev.model_cancel.set()
            # Release the lock so the new stream is not stuck behind the old
            # one's model call. (asyncio.Lock does not check the owner.)
            if prev.lock.locked():
                prev.lock.release()
            try:
                await asyncio.wait_for(prev.task, timeout=PREV_STREAM_WAIT)
            except TimeoutError:
                lifecycle_event(
                    "prev_stream_timeout_on_cancel",
                    level=logging.WARNING,
                    session=handle.session_id,
                    trace=prev.trace,
                    waited_ms=round((time.monotonic() - wait_started) * 1000),
                )
            except asyncio.CancelledError:  # noqa: ASYNC103 -- reproduced, see below
                # The old task ended cancelled, as asked. (This also swallows
                # a cancellation of register() itself: kept as it was.)
                lifecycle_event(
                    "prev_stream_finished_cleanly",
                    session=handle.session_id,
                    trace=prev.trace,
                    waited_ms=round((time.monotonic() - wait_started) * 1000),
                )
            else:
                lifecycle_event(
                    "prev_stream_finished_cleanly",
                    session=handle.session_id,
                    trace=prev.trace,
                    waited_ms=round((time.monotonic() - wait_started) * 1000),
                )
        # Registered anyway, whatever happened to the previous stream.
        self._streams[handle.session_id] = handle
        handle.started_at = time.monotonic()
        lifecycle_event("stream_start", trace=handle.trace, session=handle.session_id)

    def pop(self, session_id: str) -> StreamHandle | None:
        # By session id only: a superseded stream's cleanup pops its successor.
        return self._streams.pop(session_id, None)
