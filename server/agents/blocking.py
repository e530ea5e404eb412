"""Adapter for blocking code: a synchronous token generator in a worker thread.

``generate(request)`` returns an iterator of text pieces (or
:data:`~server.core.events.AgentOutput` values) and may block as it likes,
e.g. a synchronous SDK's streaming call. It runs in a worker thread through
``trio.to_thread.run_sync`` under a capacity limiter; each piece crosses back
with ``trio.from_thread.run`` into the run's memory channel.

How cancellation reaches it: when the run is cancelled, the thread's next
hand-over fails (it checks a stop flag on the trio side, and the run's
channel is closed once the run ends), so a generator that yields regularly
stops within one token, and its ``close()`` runs in the thread. If the iterable that
``generate`` returned has an ``interrupt()`` method, it is called at once
(from the trio thread) to break a call that is blocked right now, e.g. by
shutting down the socket a synchronous HTTP client is reading from.

The trade-off: a thread cannot be interrupted while it is blocked inside a
call. The adapter waits for it for at most ``grace`` seconds (the cleanup
budget), then *abandons* it: the run ends on time, the thread is counted in
:data:`abandoned_threads` and logged, and it keeps its limiter slot until it
finally returns. It can never emit into a later run: every run has its own
channel, closed when the run ends, and its own stop flag, checked on the trio
side before every hand-over. A stuck SDK call therefore costs a thread and a
slot, never a session.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterable, Iterator

import attrs
import trio

from ..core.agent import AgentRequest
from ..core.events import AgentOutput, TextDelta

logger = logging.getLogger(__name__)

Generate = Callable[[AgentRequest], Iterable["str | AgentOutput"]]


@attrs.define
class ThreadAccounting:
    """Worker threads given up on (the ``abandoned_threads`` metric)."""

    abandoned: int = 0


abandoned_threads = ThreadAccounting()


class _Stopped(Exception):
    """The run is over: the thread must not hand anything more over."""


@attrs.define(kw_only=True)
class BlockingAgent:
    generate: Generate
    name: str = "blocking"
    grace: float = attrs.field(default=5.0, validator=attrs.validators.gt(0))
    limiter: trio.CapacityLimiter = attrs.field(factory=lambda: trio.CapacityLimiter(16))
    accounting: ThreadAccounting = abandoned_threads
    # Releases what the generator shares across runs (a sync client), at
    # shutdown, in a worker thread.
    close: Callable[[], None] | None = None

    async def aclose(self) -> None:
        if self.close is not None:
            await trio.to_thread.run_sync(self.close)

    async def run(
        self, request: AgentRequest, send_channel: trio.MemorySendChannel[AgentOutput]
    ) -> None:
        stopped = threading.Event()
        finished = trio.Event()
        started: list[Iterable[str | AgentOutput]] = []  # what generate returned

        async def hand_over(item: str | AgentOutput) -> None:
            # Runs on the trio side, so this check cannot race the stop.
            if stopped.is_set():
                raise _Stopped
            await send_channel.send(TextDelta(item) if isinstance(item, str) else item)

        def work() -> None:
            iterator: Iterator[str | AgentOutput] | None = None
            try:
                iterable = self.generate(request)
                started.append(iterable)
                iterator = iter(iterable)
                for item in iterator:
                    if stopped.is_set():
                        return
                    trio.from_thread.run(hand_over, item)
            except (
                _Stopped,
                trio.ClosedResourceError,
                trio.BrokenResourceError,
                trio.RunFinishedError,
            ):
                return  # the run ended; nothing more to do here
            # trio.Cancelled from a hand-over propagates back to the run's task.
            finally:
                close = getattr(iterator, "close", None)
                if close is not None:
                    close()
                # The process may be shutting down with the thread abandoned.
                with contextlib.suppress(trio.RunFinishedError):
                    trio.from_thread.run_sync(finished.set)

        try:
            await trio.to_thread.run_sync(work, abandon_on_cancel=True, limiter=self.limiter)
        finally:
            stopped.set()
            if not finished.is_set():
                interrupt = getattr(started[0], "interrupt", None) if started else None
                if interrupt is not None:
                    try:
                        interrupt()
                    except Exception:  # must not replace the cancellation
                        logger.exception("blocking agent %s: interrupt() failed", self.name)
                with trio.move_on_after(self.grace, shield=True):
                    await finished.wait()
            if not finished.is_set():
                self.accounting.abandoned += 1
                logger.warning(
                    "abandoned_threads count=%d agent=%s grace_s=%s",
                    self.accounting.abandoned,
                    self.name,
                    self.grace,
                )
