"""The trio-asyncio loop that asyncio agents run on, for the app's lifetime
(see :class:`AsyncioLoopHost`)."""

from __future__ import annotations

import _asyncio
import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import attrs
import trio
import trio_asyncio  # type: ignore[import-untyped]

from ._asyncio_tasks import await_on_loop, recording_task_factory, wait_done

# One logger for the adapter and its loop: operators filter on this name.
logger = logging.getLogger("server.agents.asyncio_adapter")

T = TypeVar("T")


class AsyncioLoopNotRunning(RuntimeError):
    """An asyncio agent was used while its :class:`AsyncioLoopHost` is not
    serving: the app must start ``host.serve`` before running such agents."""


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
            await wait_done(task)
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
                loop.set_task_factory(recording_task_factory)
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
                        await wait_done(loop.create_task(loop.shutdown_asyncgens()))
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
                await await_on_loop(loop, closer, budget=self.shutdown_budget, deadline=deadline)
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
        """``await make()`` on the loop, from trio (see :func:`~._asyncio_tasks.await_on_loop`)."""
        return await await_on_loop(self.loop, make, budget=budget)
