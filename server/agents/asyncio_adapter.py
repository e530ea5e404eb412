"""Running asyncio-native agents inside the trio server, through trio-asyncio.

Two pieces:

* :class:`AsyncioLoopHost` owns one trio-asyncio loop for the app's
  lifetime. Start it with ``await nursery.start(host.serve)`` in the serving
  lifecycle; it runs until cancelled.
* :class:`AsyncioAgentAdapter` is an :class:`~server.core.agent.Agent` over
  an :class:`AsyncioAgent`: an object with ``name`` and
  ``stream(request)``, an async iterator (usually an async generator) written
  for asyncio, yielding :data:`AgentOutput` values or plain ``str`` (a
  :class:`TextDelta`).

Resource handling: the adapter drives the asyncio iterator one step at a
time; each step (open, ``__anext__``, ``aclose``) is an asyncio task that the
adapter creates on the host's loop and awaits before doing anything else, so
asyncio work only ever happens *inside* an awaited step of a run. When the
run is cancelled, the step in flight is cancelled on the asyncio side
(``task.cancel()``: ``CancelledError`` at its ``await``) and awaited, shielded
and bounded by ``cleanup_budget``; then the iterator is closed (``aclose`` on
the loop, its ``finally`` blocks run), shielded and bounded the same way. No
asyncio task of the run outlives ``run()``, unless asyncio code ignores
cancellation for longer than the budget: that task is logged
(``asyncio_task_abandoned``) and left to the loop, whose shutdown cancels and
awaits every task still pending.

Error handling: exceptions from the asyncio side come out of ``run()``
unchanged: an :class:`AgentError` keeps its client-safe code, anything else
is the engine's generic ``agent_error``. An asyncio-side cancellation that the
run did not ask for (the loop shutting down) is a :class:`RuntimeError`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

import attrs
import trio
import trio_asyncio  # type: ignore[import-untyped]

from ..core.agent import AgentRequest
from ..core.events import AgentOutput, FullMessage, StopReason, TextDelta, UsageReport

logger = logging.getLogger(__name__)

T = TypeVar("T")

_OUTPUT_TYPES = (TextDelta, FullMessage, UsageReport, StopReason)


class AsyncioLoopNotRunning(RuntimeError):
    """An asyncio agent was used while its :class:`AsyncioLoopHost` is not
    serving: the app must start ``host.serve`` before running such agents."""


class AsyncioAgent(Protocol):
    """An agent written for asyncio. ``stream`` is called on the asyncio loop
    and may use asyncio-only libraries; it must let ``CancelledError``
    propagate and keep its cleanup in ``finally`` blocks."""

    @property
    def name(self) -> str: ...

    def stream(self, request: AgentRequest) -> AsyncIterator[AgentOutput | str]: ...


async def _await_on_loop(
    loop: asyncio.AbstractEventLoop, make: Callable[[], Awaitable[T]], *, budget: float
) -> T:
    """``await make()`` as an asyncio task on ``loop``, from trio.

    The task is this call's: it is awaited whatever happens. If the caller is
    cancelled, the task is cancelled and awaited (shielded, at most
    ``budget`` seconds) before :class:`trio.Cancelled` propagates."""

    async def call() -> T:
        return await make()

    task = loop.create_task(call())
    done = trio.Event()
    task.add_done_callback(lambda _: done.set())
    try:
        await done.wait()
    finally:
        if not task.done():
            task.cancel()
            with trio.move_on_after(budget, shield=True):
                await done.wait()
            if not task.done():
                logger.warning("asyncio_task_abandoned task=%r budget_s=%s", task, budget)
        if task.done() and not task.cancelled():
            # Mark a failure as retrieved even if Cancelled wins, so asyncio
            # does not log "exception was never retrieved".
            task.exception()
    if task.cancelled():
        raise RuntimeError("the asyncio side was cancelled (is the asyncio loop shutting down?)")
    return task.result()


@attrs.define(eq=False)
class AsyncioLoopHost:
    """One trio-asyncio loop, open while :meth:`serve` runs.

    Resource handling: :meth:`serve` opens the loop, reports itself started
    and sleeps until cancelled. On the way out it first runs the closers
    registered with :meth:`on_close` on the loop (shielded, bounded by
    ``shutdown_budget``), then leaves ``trio_asyncio.open_loop()``, which
    cancels and awaits every asyncio task still pending.
    """

    shutdown_budget: float = attrs.field(default=5.0, validator=attrs.validators.gt(0))
    _loop: asyncio.AbstractEventLoop | None = attrs.field(default=None, init=False)
    _accepting: bool = attrs.field(default=False, init=False)
    _closers: list[Callable[[], Awaitable[None]]] = attrs.field(factory=list, init=False)

    @property
    def running(self) -> bool:
        return self._accepting

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop, while the host serves; :class:`AsyncioLoopNotRunning` otherwise."""
        if not self._accepting or self._loop is None:
            raise AsyncioLoopNotRunning(
                "the asyncio loop host is not running: start AsyncioLoopHost.serve "
                "(await nursery.start(host.serve)) before using asyncio agents"
            )
        return self._loop

    def on_close(self, closer: Callable[[], Awaitable[None]]) -> None:
        """Run ``await closer()`` on the loop (an asyncio coroutine function)
        before the loop closes. Closers should be idempotent: the app may
        already have closed what they close."""
        self._closers.append(closer)

    async def serve(
        self, *, task_status: trio.TaskStatus[AsyncioLoopHost] = trio.TASK_STATUS_IGNORED
    ) -> None:
        if self._loop is not None:
            raise RuntimeError("this AsyncioLoopHost is already serving")
        async with trio_asyncio.open_loop() as loop:
            self._loop = loop
            self._accepting = True
            try:
                task_status.started(self)
                await trio.sleep_forever()
            finally:
                self._accepting = False
                with trio.move_on_after(self.shutdown_budget, shield=True) as cleanup:
                    for closer in self._closers:
                        try:
                            await _await_on_loop(loop, closer, budget=self.shutdown_budget)
                        except Exception:
                            logger.exception("asyncio loop host: a closer failed")
                if cleanup.cancelled_caught:
                    logger.warning("asyncio_loop_close_budget_exceeded budget_s=%s",
                                   self.shutdown_budget)
                self._loop = None

    async def call(self, make: Callable[[], Awaitable[T]], *, budget: float = 5.0) -> T:
        """``await make()`` on the loop, from trio (see :func:`_await_on_loop`)."""
        return await _await_on_loop(self.loop, make, budget=budget)


_END: Any = object()


async def _next_item(iterator: AsyncIterator[T]) -> T:
    try:
        return await anext(iterator)
    except StopAsyncIteration:
        return _END  # type: ignore[no-any-return]


def _as_output(item: object) -> AgentOutput:
    if isinstance(item, str):
        return TextDelta(item)
    if isinstance(item, _OUTPUT_TYPES):
        return item
    raise TypeError(f"an asyncio agent yielded {type(item).__name__}, not str or AgentOutput")


@attrs.define(eq=False, kw_only=True)
class AsyncioAgentAdapter:
    """An :class:`~server.core.agent.Agent` running ``agent.stream`` on
    ``host``'s loop (see the module docstring for cancellation).

    ``cleanup_budget`` bounds each shielded wait of the cleanup: for the
    cancelled step to finish, then for ``aclose``; a run that is cancelled
    returns within about twice that, however the asyncio code behaves.
    """

    agent: AsyncioAgent
    host: AsyncioLoopHost
    cleanup_budget: float = attrs.field(default=5.0, validator=attrs.validators.gt(0))

    def __attrs_post_init__(self) -> None:
        closer = getattr(self.agent, "aclose", None)
        if callable(closer):
            self.host.on_close(closer)

    @property
    def name(self) -> str:
        return self.agent.name

    async def run(
        self, request: AgentRequest, send_channel: trio.MemorySendChannel[AgentOutput]
    ) -> None:
        loop = self.host.loop
        budget = self.cleanup_budget

        async def open_stream() -> AsyncIterator[AgentOutput | str]:
            return aiter(self.agent.stream(request))

        iterator = await _await_on_loop(loop, open_stream, budget=budget)
        try:
            while True:
                item = await _await_on_loop(loop, lambda: _next_item(iterator), budget=budget)
                if item is _END:
                    return
                await send_channel.send(_as_output(item))
        finally:
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                with trio.move_on_after(budget, shield=True) as cleanup:
                    await _await_on_loop(loop, aclose, budget=budget)
                if cleanup.cancelled_caught:
                    logger.warning("asyncio_agent_close_budget_exceeded agent=%s", self.name)

    async def aclose(self) -> None:
        """Close the wrapped agent (its ``aclose``, an asyncio coroutine
        function) on the loop. A no-op once the host stopped: it ran the same
        closer on its way out."""
        closer = getattr(self.agent, "aclose", None)
        if callable(closer) and self.host.running:
            await self.host.call(closer, budget=self.cleanup_budget)
