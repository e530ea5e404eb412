"""A chat session: the owner of its runs.

Rules (each is what invariant 1 of the design rests on):

Rule 1: a session's runs live in the session's own nursery, started with
        ``nursery.start`` so the submitter knows the run is registered.
Rule 2: submissions are serialised by a FIFO turnstile whose place in line
        is taken synchronously on admission: the order of admission is the
        order of service, and the last admitted prompt is the one left running.
Rule 3: in its turn, the current run is cancelled with a reason and its
        cleanup is *awaited* before the next run starts. There is no timeout
        after which the next run starts anyway; the wait is bounded by the
        run's own cleanup budget instead.
"""

from __future__ import annotations

import enum
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable

import attrs
import trio

from .agent import Agent, AgentRequest
from .config import EngineConfig
from .errors import Draining as Draining
from .errors import QueueFull as QueueFull
from .errors import RunInProgress as RunInProgress
from .errors import SessionClosed as SessionClosed
from .events import CancelReason
from .lifecycle_log import lifecycle_event
from .run import NullObserver, Run, RunObserver

logger = logging.getLogger(__name__)


async def _forget_nothing(run: Run) -> None:  # noqa: ASYNC124 -- the hook is awaited
    return None


@attrs.frozen
class SessionKey:
    """Sessions belong to a principal: two API keys using the same session
    id have two different sessions."""

    principal: str
    session_id: str


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


class OnConflict(enum.StrEnum):
    """What a new prompt does when its session already has a live run."""

    INTERRUPT = "interrupt"  # cancel it (superseded), await its cleanup, start
    REJECT = "reject"  # refuse the new prompt (RunInProgress)
    ENQUEUE = "enqueue"  # start after it ends by itself, in admission order
    ROLLBACK = "rollback"  # like interrupt, then forget the superseded run


@attrs.define(eq=False)
class Turnstile:
    """A FIFO lock whose place in line is taken synchronously.

    ``trio.Lock`` is fair among tasks already waiting on it, but a task only
    joins its line at its first checkpoint inside ``acquire``. Submissions
    take their ticket at the synchronous moment they are admitted, so the
    order of admission is the order of service, whatever the scheduler does
    in between."""

    _line: deque[trio.Event] = attrs.field(factory=deque)

    def enter(self) -> trio.Event:
        ticket = trio.Event()
        self._line.append(ticket)
        if len(self._line) == 1:
            ticket.set()
        return ticket

    def leave(self, ticket: trio.Event) -> None:
        """Give up the turn (or the place in line, if the turn never came)."""
        was_head = self._line[0] is ticket
        self._line.remove(ticket)
        if was_head and self._line:
            self._line[0].set()


@attrs.define(eq=False)
class Session:
    key: SessionKey
    agent: Agent
    config: EngineConfig
    # The config's, or 0 for a session of its own (dropped once idle).
    idle_timeout: float
    live_runs: LiveRuns = attrs.field(factory=LiveRuns)
    observer: RunObserver = attrs.field(factory=NullObserver)
    # Called (synchronously, once) when the session closes: it is dropped.
    on_dropped: Callable[[Session], None] = attrs.field(default=lambda session: None)
    # Called (synchronously) when a rolled-back run is to be forgotten.
    on_discarded: Callable[[Run], None] = attrs.field(default=lambda run: None)
    # Awaited after that: cluster mode forgets the run in the shared state
    # too (bounded by the coordinator).
    forget_shared: Callable[[Run], Awaitable[None]] = attrs.field(default=_forget_nothing)
    # Called (synchronously) whenever the session stops being busy: the
    # manager gives back its run slot.
    on_quiet: Callable[[Session], None] = attrs.field(default=lambda session: None)
    # Set and cleared by the manager, which counts concurrent runs.
    holds_run_slot: bool = attrs.field(default=False, init=False)
    # Cluster mode: the session's ownership moved to another node (handed
    # over, or its lease lost): a submission told SessionClosed asks again.
    moved: bool = attrs.field(default=False, init=False)
    # Cluster mode: run mirrors still copying a run to the shared state;
    # the session is not idle (its lease is not released) before they end.
    mirrors: int = attrs.field(default=0, init=False)

    current: Run | None = attrs.field(default=None, init=False)
    users: int = attrs.field(default=0, init=False)
    closed: bool = attrs.field(default=False, init=False)
    _nursery: trio.Nursery | None = attrs.field(default=None, init=False)
    _ready: trio.Event = attrs.field(factory=trio.Event, init=False)
    _turnstile: Turnstile = attrs.field(factory=Turnstile, init=False)
    _changed: trio.Event = attrs.field(factory=trio.Event, init=False)
    _idle_since: float = attrs.field(default=-math.inf, init=False)

    @property
    def session_id(self) -> str:
        return self.key.session_id

    @property
    def nursery(self) -> trio.Nursery:
        """Where the session's runs (and, in cluster mode, their mirrors) live."""
        assert self._nursery is not None
        return self._nursery

    @property
    def idle(self) -> bool:
        """No submitter, no run that has not ended (one still recording its
        start included), no reader of the current run."""
        current = self.current
        return (
            self.users == 0
            and self.mirrors == 0
            and (current is None or (current.ended and current.subscriber_count == 0))
        )

    # --- the session's task -------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the session's runs until it has been idle for ``idle_timeout``.

        Error handling: an engine bug in one of its runs ends this session
        (its other runs are cancelled and end ``interrupted``), is logged,
        and leaves every other session alone."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._touch()
                self._ready.set()
                task_status.started()
                await self._wait_idle_expired()
        except Exception:
            logger.exception("session %s failed and was dropped", self.session_id)
        finally:
            self.close()

    async def _wait_idle_expired(self) -> None:
        while True:
            changed = self._changed
            if self.idle:
                deadline = self._idle_since + self.idle_timeout
                if trio.current_time() >= deadline:
                    # Dropped in the same step as the idle check: a submit
                    # either admitted itself before (so we are not idle) or
                    # finds no session and makes a new one.
                    self.close()
                    return
                with trio.move_on_at(deadline):
                    await changed.wait()
            else:
                await changed.wait()

    def close(self) -> None:
        """Refuse new submissions and leave the session table (idempotent)."""
        if not self.closed:
            self.closed = True
            self._ready.set()
            self.on_dropped(self)

    def mirror_started(self) -> None:
        self.mirrors += 1
        self._touch()

    def mirror_ended(self) -> None:
        self.mirrors -= 1
        self._touch()

    def _touch(self) -> None:
        self._idle_since = trio.current_time()
        self._changed.set()
        self._changed = trio.Event()

    # --- runs ----------------------------------------------------------------

    def admit(self) -> trio.Event:
        """Take a submission's place in line and count it as a user.

        Synchronous: the order of these calls is the order in which
        submissions are served, so the last admitted prompt wins."""
        if self.closed:
            raise SessionClosed
        self.users += 1
        self._touch()
        return self._turnstile.enter()

    def leave(self, ticket: trio.Event) -> None:
        self._turnstile.leave(ticket)
        self.users -= 1
        self._touch()
        self._check_quiet()

    def _check_quiet(self) -> None:
        if not self.busy:
            self.on_quiet(self)

    @property
    def busy(self) -> bool:
        """A run is live or a submission is on its way."""
        return self.users > 0 or (self.current is not None and not self.current.ended)

    async def submit(
        self,
        request: AgentRequest,
        ticket: trio.Event,
        *,
        on_conflict: OnConflict = OnConflict.INTERRUPT,
    ) -> Run:
        """Start a run for ``request`` once ``ticket``'s turn comes,
        superseding the current run and awaiting its cleanup first.

        Returns once the new run's task has started (owned by this session's
        nursery); :meth:`Run.wait_started` says when ``run.started`` is out. Raises
        :class:`Draining` if the server stopped admitting runs while this
        submission waited its turn."""
        admitted_at = trio.current_time()  # the manager admits right before
        await self._ready.wait()
        if self.closed:
            raise SessionClosed
        await ticket.wait()
        if self.closed:  # the session failed while we waited our turn
            raise SessionClosed
        if self.live_runs.draining:
            raise Draining
        previous = self.current
        superseding = previous is not None and not previous.ended
        if previous is not None and not previous.ended:
            wait_started = trio.current_time()
            if on_conflict is not OnConflict.ENQUEUE:
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
            if self.closed:  # its ownership moved elsewhere meanwhile
                raise SessionClosed
        if on_conflict is OnConflict.ROLLBACK and superseding and previous is not None:
            await self.roll_back(previous)
        run = Run(
            session_id=self.session_id,
            principal=self.key.principal,
            request=request,
            agent=self.agent,
            config=self.config,
            observer=self.observer,
            on_subscribers_changed=self._touch,
            on_ended=self._run_ended,
            supersedes=previous.run_id
            if superseding and previous is not None and on_conflict is not OnConflict.ENQUEUE
            else None,
            admitted_at=admitted_at,
        )
        assert self._nursery is not None
        # Registered before the first checkpoint, so a drain that starts now
        # finds (and cancels) it.
        self.current = run
        self.live_runs.add(run)
        try:
            await self._nursery.start(run.run)
        except BaseException:
            self.live_runs.discard(run)
            self.current = previous
            raise
        return run

    async def roll_back(self, run: Run) -> None:
        """Forget a superseded run: its record, then (only if that worked) the
        run itself, so the registry and the store never disagree, and (cluster
        mode) its record and events in the shared state. The new prompt goes
        ahead either way."""
        discarded = False
        with trio.move_on_after(self.config.cleanup_budget):
            try:
                await run.observer.run_discarded(run)
            except Exception:
                logger.exception("run %s: could not be rolled back", run.run_id)
                return
            discarded = True
        if not discarded:
            logger.warning("run %s: rollback timed out; the run is kept", run.run_id)
            return
        self.on_discarded(run)
        await self.forget_shared(run)

    def _run_ended(self, run: Run) -> None:
        self.live_runs.discard(run)
        self._touch()
        self._check_quiet()
