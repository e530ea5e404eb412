"""Asyncio tasks seen from trio: awaiting one from trio, and the tasks that
belong to one run of an asyncio agent (see :mod:`.asyncio_adapter`).

Every asyncio task created while a run's steps execute belongs to that run:
the loop's task factory (:func:`recording_task_factory`, installed by
:class:`~.asyncio_loop.AsyncioLoopHost`) records it through
:data:`RUN_TASKS`, a context variable that asyncio copies into every task
and callback.
"""

from __future__ import annotations

import asyncio
import logging
import math
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from contextvars import ContextVar
from typing import Any, TypeVar

import attrs
import trio

# One logger for the adapter and its loop: operators filter on this name.
logger = logging.getLogger("server.agents.asyncio_adapter")

T = TypeVar("T")


@attrs.define(eq=False)
class RunTasks:
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
RUN_TASKS: ContextVar[RunTasks | None] = ContextVar("asyncio_adapter_run_tasks", default=None)


def recording_task_factory(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T], /, **kwargs: Any
) -> asyncio.Task[T]:
    task = asyncio.Task(coro, loop=loop, **kwargs)
    run_tasks = RUN_TASKS.get()
    if run_tasks is not None and run_tasks.recording:
        run_tasks.add(task)
    return task


async def wait_done(task: asyncio.Future[Any]) -> None:
    done = trio.Event()
    task.add_done_callback(lambda _: done.set())
    await done.wait()


async def await_on_loop(
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
        await wait_done(task)
    finally:
        if not task.done():
            task.cancel()
            with trio.CancelScope(
                deadline=min(trio.current_time() + budget, deadline), shield=True
            ):
                await wait_done(task)
            if not task.done():
                logger.warning("asyncio_task_abandoned count=1 task=%r budget_s=%s", task, budget)
        if task.done() and not task.cancelled():
            # Mark a failure as retrieved even if Cancelled wins, so asyncio
            # does not log "exception was never retrieved".
            task.exception()
    if task.cancelled():
        raise RuntimeError("the asyncio side was cancelled (is the asyncio loop shutting down?)")
    return task.result()


async def settle(loop: asyncio.AbstractEventLoop, run_tasks: RunTasks) -> None:
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
                await wait_done(task)
            continue
        created = run_tasks.created
        flushed = trio.Event()
        loop.call_soon_threadsafe(flushed.set)
        await flushed.wait()
        if run_tasks.created == created and not run_tasks.pending():
            return
