"""Running asyncio-native agents inside the trio server, through trio-asyncio.

Two pieces:

* :class:`AsyncioLoopHost` owns one trio-asyncio loop for the app's
  lifetime. Start it with ``await nursery.start(host.serve)`` in the serving
  lifecycle; it runs until cancelled.
* :class:`AsyncioAgentAdapter` is an :class:`~server.core.agent.Agent` over
  an :class:`AsyncioAgent`: an object with ``name`` and ``stream(request)``,
  an async iterator (usually an async generator) written for asyncio,
  yielding :data:`AgentOutput` values or plain ``str`` (a :class:`TextDelta`).

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

import _asyncio
import asyncio
import enum
import logging
import math
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextvars import ContextVar
from typing import Any, Literal, Protocol, TypeVar

import attrs
import trio
import trio_asyncio  # type: ignore[import-untyped]

from ..core.agent import AgentRequest
from ..core.events import AgentOutput, FullMessage, StopReason, TextDelta, UsageReport

logger = logging.getLogger(__name__)

T = TypeVar("T")

_OUTPUT_TYPES = (TextDelta, FullMessage, UsageReport, StopReason)


@attrs.define(eq=False)
class _RunTasks:
    """The asyncio tasks created on behalf of one run. Weak: a task that is
    done and forgotten needs no keeping; a pending one is kept alive by what
    it waits on."""

    tasks: weakref.WeakSet[asyncio.Task[Any]] = attrs.field(factory=weakref.WeakSet)
    created: int = 0
    recording: bool = True

    def add(self, task: asyncio.Task[Any]) -> None:
        self.tasks.add(task)
        self.created += 1

    def pending(self) -> list[asyncio.Task[Any]]:
        return [task for task in self.tasks if not task.done()]


# The run whose steps are executing: tasks created in this context belong to
# it (asyncio copies the creator's context into every task and callback).
_RUN_TASKS: ContextVar[_RunTasks | None] = ContextVar("asyncio_adapter_run_tasks", default=None)


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


# --- the loop, seen from trio --------------------------------------------------


def _recording_task_factory(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T], /, **kwargs: Any
) -> asyncio.Task[T]:
    task = asyncio.Task(coro, loop=loop, **kwargs)
    run_tasks = _RUN_TASKS.get()
    if run_tasks is not None and run_tasks.recording:
        run_tasks.add(task)
    return task


def _claim_thread_running_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Make ``loop`` this thread's running loop at the C level too.

    trio-asyncio patches the *module attributes* (``asyncio.get_running_loop``
    and friends) to find its loop from trio's task context. A library that
    bound the C function by name before ``trio_asyncio`` was imported still
    reads the thread's running loop and fails with "no running event loop"
    (trio-asyncio issue #83). anyio's asyncio backend, which httpx2 and
    ``openai`` run on, does ``from asyncio import get_running_loop``, and
    whether it is imported before or after us is an accident of import
    order (pytest's anyio plugin imports it at start-up). trio-asyncio's own
    ``SyncTrioEventLoop`` sets the thread's running loop the same way. The
    patched functions are unaffected: in trio context they still answer from
    the task context, so trio code does not start to look like asyncio.
    """
    asyncio.events._set_running_loop(loop)


async def _wait_done(task: asyncio.Future[Any]) -> None:
    done = trio.Event()
    task.add_done_callback(lambda _: done.set())
    await done.wait()


async def _await_on_loop(
    loop: asyncio.AbstractEventLoop,
    make: Callable[[], Awaitable[T]],
    *,
    budget: float,
    deadline: float = math.inf,
) -> T:
    """``await make()`` as an asyncio task on ``loop``, from trio.

    The task is this call's: it is awaited whatever happens. If the caller is
    cancelled, the task is cancelled and awaited, shielded, for at most
    ``budget`` seconds and never past ``deadline``. A caller that is itself
    a shielded, bounded cleanup passes its own deadline: the shield here
    would otherwise let this wait run past it."""

    async def call() -> T:
        return await make()

    coro = call()
    try:
        task = loop.create_task(coro)
    except BaseException:
        coro.close()  # a closed loop: no "never awaited" warning on top
        raise
    try:
        await _wait_done(task)
    finally:
        if not task.done():
            task.cancel()
            with trio.CancelScope(
                deadline=min(trio.current_time() + budget, deadline), shield=True
            ):
                await _wait_done(task)
            if not task.done():
                logger.warning("asyncio_task_abandoned count=1 task=%r budget_s=%s", task, budget)
        if task.done() and not task.cancelled():
            # Mark a failure as retrieved even if Cancelled wins, so asyncio
            # does not log "exception was never retrieved".
            task.exception()
    if task.cancelled():
        raise RuntimeError("the asyncio side was cancelled (is the asyncio loop shutting down?)")
    return task.result()


async def _settle(loop: asyncio.AbstractEventLoop, run_tasks: _RunTasks) -> None:
    """Until every task of the run is done, and so are the tasks they led to.

    asyncio starts the finalizer of an abandoned async generator with
    ``call_soon_threadsafe(create_task, ...)`` from inside the step that let
    go of it, so a task can finish and leave a task-to-be in the queue. Once
    every recorded task is done, a round trip through that same queue
    (FIFO) runs all such leftovers; if it recorded nothing new, the run is
    settled."""
    while not loop.is_closed():
        if pending := run_tasks.pending():
            for task in pending:
                await _wait_done(task)
            continue
        created = run_tasks.created
        flushed = trio.Event()
        loop.call_soon_threadsafe(flushed.set)
        await flushed.wait()
        if run_tasks.created == created and not run_tasks.pending():
            return


async def _cancel_all_tasks(
    loop: asyncio.AbstractEventLoop, cancelled: set[asyncio.Task[Any]]
) -> None:
    """Cancel every task of ``loop`` and await it, and the tasks started
    meanwhile; add each to ``cancelled``. Each task is cancelled once: one
    that catches its cancellation is not pestered. A task that fails is logged."""
    while pending := asyncio.all_tasks(loop):
        for task in pending - cancelled:
            task.cancel()
        cancelled |= pending
        for task in pending:
            await _wait_done(task)
            if not task.cancelled() and (error := task.exception()) is not None:
                logger.error("asyncio task failed as the loop shut down: %r", task, exc_info=error)


def _log_asyncio_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    logger.error(
        "asyncio_error_during_shutdown %s",
        context.get("message"),
        exc_info=context.get("exception"),
    )


@attrs.define(eq=False)
class AsyncioLoopHost:
    """One trio-asyncio loop, open while :meth:`serve` runs. One per thread.

    Resource handling: :meth:`serve` opens the loop, reports itself started
    and serves until cancelled or until :meth:`aclose`. On the way out, in
    three steps, each shielded and bounded by ``shutdown_budget``:

    1. the closers registered with :meth:`on_close` run on the loop;
    2. every asyncio task still pending is cancelled and awaited (and so
       are the tasks started meanwhile);
    3. the loop's async generators are closed.

    Steps 2 and 3 are what ``trio_asyncio.open_loop()`` does on its way out,
    but with no time limit. Tasks still running after step 3 ignored their
    cancellation: they are logged (``asyncio_task_abandoned count=N``),
    counted in :attr:`abandoned_tasks` and unregistered from asyncio, so
    that ``open_loop()`` finds nothing left to wait for. So :meth:`aclose`
    returns within three times ``shutdown_budget``, whatever the asyncio
    code does.
    """

    shutdown_budget: float = attrs.field(default=5.0, validator=attrs.validators.gt(0))
    _loop: asyncio.AbstractEventLoop | None = attrs.field(default=None, init=False)
    _accepting: bool = attrs.field(default=False, init=False)
    _closers: list[Callable[[], Awaitable[None]]] = attrs.field(factory=list, init=False)
    _stop: trio.Event | None = attrs.field(default=None, init=False)
    _stopped: trio.Event | None = attrs.field(default=None, init=False)
    _abandoned_tasks: int = attrs.field(default=0, init=False)

    @property
    def running(self) -> bool:
        return self._accepting

    @property
    def abandoned_tasks(self) -> int:
        """How many asyncio tasks ignored the loop's shutdown and were left behind."""
        return self._abandoned_tasks

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
        if _asyncio._get_running_loop() is not None:
            raise RuntimeError("another asyncio loop is already running in this thread")
        self._stop, self._stopped = trio.Event(), trio.Event()
        try:
            async with trio_asyncio.open_loop() as loop:
                _claim_thread_running_loop(loop)
                loop.set_task_factory(_recording_task_factory)
                self._loop = loop
                self._accepting = True
                try:
                    task_status.started(self)
                    await self._stop.wait()
                finally:
                    self._accepting = False
                    budget = self.shutdown_budget
                    with trio.move_on_after(budget, shield=True) as closing:
                        await self._run_closers(loop, deadline=closing.deadline)
                    if closing.cancelled_caught:
                        logger.warning("asyncio_loop_close_budget_exceeded budget_s=%s", budget)
                    # trio-asyncio's own handler raises every error asyncio
                    # reports into the host's nursery; on the way out, it is logged.
                    loop.set_exception_handler(_log_asyncio_error)
                    cancelled: set[asyncio.Task[Any]] = set()
                    with trio.move_on_after(budget, shield=True):
                        await _cancel_all_tasks(loop, cancelled)
                    with trio.move_on_after(budget, shield=True):
                        await _wait_done(loop.create_task(loop.shutdown_asyncgens()))
                    self._abandon_pending(loop, cancelled)
                    self._loop = None
        finally:
            # Only now: open_loop() has closed the loop, whose last callbacks
            # may have needed it.
            asyncio.events._set_running_loop(None)
            self._stopped.set()

    async def aclose(self) -> None:
        """Stop serving and wait until the loop is closed (closers first).
        A no-op when not serving. For the app's shutdown, after the runs and
        the agents are closed: :meth:`serve` does not wait to be cancelled."""
        if self._stop is None or self._stopped is None:
            return
        self._stop.set()
        await self._stopped.wait()

    async def _run_closers(self, loop: asyncio.AbstractEventLoop, *, deadline: float) -> None:
        for closer in self._closers:
            try:
                await _await_on_loop(loop, closer, budget=self.shutdown_budget, deadline=deadline)
            except Exception:
                logger.exception("asyncio loop host: a closer failed")

    def _abandon_pending(
        self, loop: asyncio.AbstractEventLoop, cancelled: set[asyncio.Task[Any]]
    ) -> None:
        pending = asyncio.all_tasks(loop)
        if not pending:
            return
        self._abandoned_tasks += len(pending)
        logger.warning(
            "asyncio_task_abandoned count=%d budget_s=%s tasks=%r",
            len(pending),
            self.shutdown_budget,
            pending,
        )
        for task in pending - cancelled:
            # Started since (those closing async generators, for one): their last chance.
            task.cancel()
        for task in pending:
            # asyncio has no public way to forget a task; this private one is
            # in CPython 3.11. all_tasks() then no longer lists the task, so
            # open_loop() does not wait for it. Should that stop working, the
            # error below says why the shutdown hangs.
            asyncio.tasks._unregister_task(task)
        if still := asyncio.all_tasks(loop):
            logger.error("asyncio_task_unregister_failed count=%d tasks=%r", len(still), still)

    async def call(self, make: Callable[[], Awaitable[T]], *, budget: float = 5.0) -> T:
        """``await make()`` on the loop, from trio (see :func:`_await_on_loop`)."""
        return await _await_on_loop(self.loop, make, budget=budget)


# --- the adapter -----------------------------------------------------------------


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

        run_tasks = _RunTasks()
        context_token = _RUN_TASKS.set(run_tasks)
        iterator: AsyncIterator[AgentOutput | str] | None = None
        try:
            iterator = await _await_on_loop(loop, open_stream, budget=budget)
            while True:
                item = await _await_on_loop(loop, lambda: _next_item(iterator), budget=budget)
                if item is _End.END:
                    return
                await send_channel.send(_as_output(item))
        finally:
            with trio.move_on_after(budget, shield=True) as cleanup:
                if iterator is not None:
                    await self._close_iterator(loop, iterator, deadline=cleanup.deadline)
                await _settle(loop, run_tasks)
            if cleanup.cancelled_caught:
                with trio.move_on_after(budget, shield=True):
                    await self._cancel_leftovers(loop, run_tasks)
            run_tasks.recording = False
            _RUN_TASKS.reset(context_token)

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
            await _await_on_loop(loop, aclose, budget=self.cleanup_budget, deadline=deadline)
        except Exception:
            logger.exception("asyncio agent %s: closing its stream failed", self.name)

    async def _cancel_leftovers(
        self, loop: asyncio.AbstractEventLoop, run_tasks: _RunTasks
    ) -> None:
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
            await _settle(loop, run_tasks)
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
