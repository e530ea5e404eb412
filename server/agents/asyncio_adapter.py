"""Running asyncio-native agents inside the trio server, through trio-asyncio.

Three modules, each importing only the ones below it:

* here, :class:`AsyncioAgentAdapter`, which runs an agent's steps on the loop
  and cleans up after a run;
* :mod:`.asyncio_loop`: :class:`AsyncioLoopHost` (re-exported here) owns one
  trio-asyncio loop for the app's lifetime. Start it with
  ``await nursery.start(host.serve)`` in the serving lifecycle; it runs until
  cancelled;
* :mod:`._asyncio_tasks`: awaiting an asyncio task from trio, and the record
  of which tasks belong to which run.

:class:`AsyncioAgentAdapter` is an :class:`~server.core.agent.Agent` over an
:class:`AsyncioAgent`: an object with ``name`` and ``stream(request)``, an
async iterator (usually an async generator) written for asyncio, yielding
:data:`AgentOutput` values or plain ``str`` (a :class:`TextDelta`).

Resource handling: the adapter drives the asyncio iterator one step at a
time; each step (open, ``__anext__``, ``aclose``) is an asyncio task that the
adapter creates on the host's loop and awaits before doing anything else, so
asyncio work only happens *inside* an awaited step of a run. Every asyncio
task created while a run's steps execute (by the agent, by the libraries it
uses, and the tasks asyncio itself starts to finalize their abandoned async
generators) belongs to that run: the loop's task factory records it through
a context variable that asyncio copies into every task and callback. A run
ends only when all of them are done, so an agent that wants a task to live
longer than one run starts it outside any run (``host.call``).

Cancellation: when the run is cancelled, the step in flight is cancelled on
the asyncio side (``task.cancel()``: ``CancelledError`` at its ``await``) and
awaited, shielded and bounded by ``cleanup_budget``. Then, shielded and
bounded by ``cleanup_budget`` together, the iterator is closed (``aclose`` on
the loop: its ``finally`` blocks run) and every task of the run is awaited.
Tasks still running after that are cancelled and awaited once more (the same
bound). So a cancelled ``run()`` returns within three times
``cleanup_budget`` however the asyncio code behaves; only asyncio code that
ignores cancellation can outlive it, and it is logged
(``asyncio_task_abandoned``) and left to the loop, whose shutdown cancels it
once more and then abandons it for good (see :class:`AsyncioLoopHost`).

Error handling: exceptions from the asyncio side come out of ``run()``
unchanged: an :class:`AgentError` keeps its client-safe code, anything else
is the engine's generic ``agent_error``. An asyncio-side cancellation that the
run did not ask for (the loop shutting down) is a :class:`RuntimeError`.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Literal, Protocol, TypeVar

import attrs
import trio

from ..core.agent import AgentRequest
from ..core.events import AgentOutput, FullMessage, StopReason, TextDelta, UsageReport
from ._asyncio_tasks import RUN_TASKS, RunTasks, await_on_loop, settle
from .asyncio_loop import AsyncioLoopHost as AsyncioLoopHost
from .asyncio_loop import AsyncioLoopNotRunning as AsyncioLoopNotRunning

logger = logging.getLogger(__name__)

T = TypeVar("T")

_OUTPUT_TYPES = (TextDelta, FullMessage, UsageReport, StopReason)


class AsyncioAgent(Protocol):
    """An agent written for asyncio. ``stream`` is called on the asyncio loop
    and may use asyncio-only libraries; it must let ``CancelledError``
    propagate and keep its cleanup in ``finally`` blocks."""

    @property
    def name(self) -> str: ...

    def stream(self, request: AgentRequest) -> AsyncIterator[AgentOutput | str]: ...


class _End(enum.Enum):
    END = enum.auto()


async def _next_item(iterator: AsyncIterator[T]) -> T | Literal[_End.END]:
    # StopAsyncIteration must not escape an asyncio task: it becomes a value.
    try:
        return await anext(iterator)
    except StopAsyncIteration:
        return _End.END


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

    ``cleanup_budget`` bounds each of the cleanup's three shielded waits,
    one after the other: for the cancelled step to finish; for closing the
    iterator and settling the run's tasks together (the close's own wait
    ends at that shared deadline); and, only if that overran, for the
    leftovers to take their cancellation. So ``run()`` returns within three
    times ``cleanup_budget`` of being cancelled, however the asyncio code
    behaves.
    """

    agent: AsyncioAgent
    host: AsyncioLoopHost
    cleanup_budget: float = attrs.field(default=5.0, validator=attrs.validators.gt(0))
    owns_host: bool = False

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

        # Async only to run on the loop: ``stream()`` may need a running loop.
        async def open_stream() -> AsyncIterator[AgentOutput | str]:  # noqa: ASYNC124
            return aiter(self.agent.stream(request))

        run_tasks = RunTasks()
        context_token = RUN_TASKS.set(run_tasks)
        iterator: AsyncIterator[AgentOutput | str] | None = None
        try:
            iterator = await await_on_loop(loop, open_stream, budget=budget)
            while True:
                item = await await_on_loop(loop, lambda: _next_item(iterator), budget=budget)
                if item is _End.END:
                    return
                await send_channel.send(_as_output(item))
        finally:
            with trio.move_on_after(budget, shield=True) as cleanup:
                if iterator is not None:
                    await self._close_iterator(loop, iterator, deadline=cleanup.deadline)
                await settle(loop, run_tasks)
            if cleanup.cancelled_caught:
                with trio.move_on_after(budget, shield=True):
                    await self._cancel_leftovers(loop, run_tasks)
            run_tasks.recording = False
            RUN_TASKS.reset(context_token)

    async def _close_iterator(
        self, loop: asyncio.AbstractEventLoop, iterator: AsyncIterator[object], *, deadline: float
    ) -> None:
        """``aclose`` on the loop: a no-op for an exhausted generator; after
        a cancellation it runs the generator's ``finally`` blocks. Its
        failure is logged, not raised: it must not replace what ended the run."""
        aclose = getattr(iterator, "aclose", None)
        if aclose is None:
            return
        try:
            await await_on_loop(loop, aclose, budget=self.cleanup_budget, deadline=deadline)
        except Exception:
            logger.exception("asyncio agent %s: closing its stream failed", self.name)

    async def _cancel_leftovers(self, loop: asyncio.AbstractEventLoop, run_tasks: RunTasks) -> None:
        """The run's tasks outlived the cleanup budget: cancel and settle them
        (bounded by the caller); whatever still runs is abandoned to the loop."""
        pending = run_tasks.pending()
        logger.warning(
            "asyncio_cleanup_budget_exceeded agent=%s tasks=%d budget_s=%s",
            self.name,
            len(pending),
            self.cleanup_budget,
        )
        for task in pending:
            task.cancel()
        try:
            await settle(loop, run_tasks)
        finally:
            if pending := run_tasks.pending():
                logger.warning(
                    "asyncio_task_abandoned count=%d agent=%s tasks=%r",
                    len(pending),
                    self.name,
                    pending,
                )

    @property
    def serve(self) -> Callable[..., Awaitable[None]]:
        """What the app starts with ``nursery.start`` before serving: the
        loop's host, for the app's lifetime (:meth:`aclose` ends it when the
        adapter ``owns_host``)."""
        return self.host.serve

    async def aclose(self) -> None:
        """Close the wrapped agent (its ``aclose``, an asyncio coroutine
        function) on the loop. When the adapter ``owns_host`` that is the
        host's job: it runs the agent's closer (registered at construction)
        on its way out, so this only closes the host. Otherwise the agent is
        closed now, if the host still serves (once it stopped, it ran the
        closer already)."""
        if self.owns_host:
            await self.host.aclose()
            return
        closer = getattr(self.agent, "aclose", None)
        if callable(closer) and self.host.running:
            await self.host.call(closer, budget=self.cleanup_budget)
