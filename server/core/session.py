"""A chat session: the owner of its runs.

Rules (each is what invariant 1 of the design rests on):

Rule 1: a session's runs live in the session's own nursery, started with
        ``nursery.start`` so the submitter knows the run is registered.
Rule 2: submissions are serialised by a FIFO lock (``trio.Lock`` is fair):
        the order in which submitters acquire it is the order they were
        admitted, and the last admitted prompt is the one left running.
Rule 3: under the lock, the current run is cancelled with a reason and its
        cleanup is *awaited* before the next run starts. There is no timeout
        after which the next run starts anyway; the wait is bounded by the
        run's own cleanup budget instead.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import attrs
import trio

from .agent import Agent, AgentRequest
from .events import CancelReason
from .lifecycle_log import lifecycle_event
from .run import NullObserver, Run, RunObserver

logger = logging.getLogger(__name__)


@attrs.frozen
class SessionKey:
    """Sessions belong to a principal: two API keys using the same session
    id have two different sessions."""

    principal: str
    session_id: str


class Draining(Exception):
    """The server is shutting down and admits no new runs."""


@attrs.define(eq=False)
class LiveRuns:
    """Every live run of the process, so shutdown can find and await them."""

    runs: set[Run] = attrs.field(factory=set)
    _changed: trio.Event = attrs.field(factory=trio.Event)
    draining: bool = False

    def add(self, run: Run) -> None:
        self.runs.add(run)

    def discard(self, run: Run) -> None:
        self.runs.discard(run)
        self._changed.set()
        self._changed = trio.Event()

    async def wait_empty(self) -> None:
        while self.runs:
            await self._changed.wait()


@attrs.define(eq=False)
class Session:
    key: SessionKey
    agent: Agent
    cleanup_budget: float
    idle_timeout: float
    live_runs: LiveRuns = attrs.field(factory=LiveRuns)
    observer: RunObserver = attrs.field(factory=NullObserver)
    # Called (synchronously) when serve returns: the session is dropped.
    on_dropped: Callable[[Session], None] = attrs.field(default=lambda session: None)

    current: Run | None = attrs.field(default=None, init=False)
    users: int = attrs.field(default=0, init=False)
    _nursery: trio.Nursery | None = attrs.field(default=None, init=False)
    _ready: trio.Event = attrs.field(factory=trio.Event, init=False)
    _lock: trio.Lock = attrs.field(factory=trio.Lock, init=False)
    _changed: trio.Event = attrs.field(factory=trio.Event, init=False)
    _idle_since: float = attrs.field(default=-math.inf, init=False)

    @property
    def session_id(self) -> str:
        return self.key.session_id

    @property
    def idle(self) -> bool:
        """No submitter, no live run, no reader of the current run."""
        current = self.current
        return self.users == 0 and (
            current is None or (not current.alive and current.subscriber_count == 0)
        )

    # --- the session's task -------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the session's runs until it has been idle for ``idle_timeout``.

        Returns (and so releases the session) only while idle; the caller
        removes it from the session table in the same step."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._touch()
                self._ready.set()
                task_status.started()
                await self._wait_idle_expired()
        finally:
            # No await between the idle check and this: no submit can reach
            # a session that is being dropped.
            self.on_dropped(self)

    async def _wait_idle_expired(self) -> None:
        while True:
            changed = self._changed
            if self.idle:
                with trio.move_on_at(self._idle_since + self.idle_timeout) as idle_wait:
                    await changed.wait()
                if idle_wait.cancelled_caught:
                    return
            else:
                await changed.wait()

    def _touch(self) -> None:
        self._idle_since = trio.current_time()
        self._changed.set()
        self._changed = trio.Event()

    # --- users ---------------------------------------------------------------

    def acquire(self) -> None:
        self.users += 1
        self._touch()

    def release(self) -> None:
        self.users -= 1
        self._touch()

    # --- runs ----------------------------------------------------------------

    async def submit(self, request: AgentRequest) -> Run:
        """Start a run for ``request``, superseding the current one.

        Returns once the new run has published ``run.started``. Raises
        :class:`Draining` if the server stopped admitting runs while this
        submission waited its turn."""
        await self._ready.wait()
        async with self._lock:
            if self.live_runs.draining:
                raise Draining
            previous = self.current
            if previous is not None and not previous.ended:
                wait_started = trio.current_time()
                previous.cancel(CancelReason.SUPERSEDED)
                await previous.wait_ended()
                lifecycle_event(
                    "prev_stream_finished_cleanly",
                    session=self.session_id,
                    trace=previous.run_id,
                    waited_ms=round((trio.current_time() - wait_started) * 1000),
                )
                if self.live_runs.draining:
                    # Shutdown began while we waited: admit nothing new.
                    raise Draining
            run = Run(
                session_id=self.session_id,
                request=request,
                agent=self.agent,
                cleanup_budget=self.cleanup_budget,
                observer=self.observer,
                on_subscribers_changed=self._touch,
                on_ended=self._run_ended,
            )
            assert self._nursery is not None
            self.current = run
            self.live_runs.add(run)
            await self._nursery.start(run.run)
            return run

    def _run_ended(self, run: Run) -> None:
        self.live_runs.discard(run)
        self._touch()
