"""One run: an agent's answer to one prompt, as a task.

Pipeline: agent ──memory channel──▶ :class:`~.pump.Pump` ──▶ :class:`EventLog`
──▶ subscribers. The phase and the outcome are the run's
:class:`~.lifecycle.Lifecycle`; what it produced is the pump's; when it
ends, both become one :class:`~.result.RunResult`.

Resource handling: the agent and the pump run in a nursery inside the run's
own cancel scope (:func:`~.pump.produce`), so cancelling the run reaches the
agent at its next checkpoint. The run's task lives in its session's nursery, never in an HTTP
handler, so the run is owned whoever is (or is not) reading it.

Starting: the run's start is recorded (bounded by the cleanup budget)
before ``run.started`` is published, so an id a client saw survives a crash.
Ending: whatever stops the run (completion, :meth:`Run.cancel`, an agent
error, ``run_timeout`` (reason ``deadline``), cancellation of the session
from outside), the ``finally`` block publishes exactly one terminal event.
Cleanup that awaits (the observer, which persists) runs shielded under
``move_on_after(cleanup_budget)``: it completes under cancellation but
cannot hang the session. ``max_subscribers`` readers at once; one more is
refused with :class:`TooManySubscribers`.

Error handling: agent exceptions become ``run.failed``; an
:class:`AgentError` carries its client-safe code and message, anything else
is reported as ``agent_error`` with the traceback in the server log only.
:class:`trio.Cancelled` from outside the run propagates after cleanup.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Protocol

import attrs
import trio

from .agent import Agent, AgentRequest, agent_name
from .config import EngineConfig
from .errors import ObserverError as ObserverError
from .errors import TooManySubscribers
from .eventlog import EventLog, Subscription
from .events import (
    CancelReason,
    ErrorInfo,
    RunMessage,
    RunStarted,
    RunStatus,
    TerminalEvent,
    Usage,
)
from .lifecycle import Lifecycle, RunState
from .lifecycle_log import lifecycle_event
from .pump import Pump, produce
from .result import RunResult

logger = logging.getLogger(__name__)

INTERNAL_ERROR = ErrorInfo(
    code="internal_error", message="The server failed while running the agent."
)


class RunObserver(Protocol):
    """Told when a run starts and when it ends (before its terminal event is
    published): the seam where the run store records runs.

    ``run_started`` runs in the run's task before ``run.started`` is
    published, bounded by the cleanup budget; ``run_ended`` inside the run's
    shielded, bounded cleanup, with the run's result. A failure is logged
    and reported on the terminal event, never fatal."""

    async def run_started(self, run: Run) -> None: ...

    async def run_ended(self, run: Run, result: RunResult) -> None: ...

    async def run_discarded(self, run: Run) -> None:
        """Forget an ended run (the ``rollback`` strategy)."""


class NullObserver:
    async def run_started(self, run: Run) -> None:
        return None

    async def run_ended(self, run: Run, result: RunResult) -> None:
        return None

    async def run_discarded(self, run: Run) -> None:
        return None


def _uncounted(delta: int) -> None:
    return None


def new_run_id() -> str:
    return f"run_{uuid.uuid4().hex}"


@attrs.define(eq=False)
class Run:
    session_id: str
    request: AgentRequest
    agent: Agent
    # Cleanup budget, coalescing (the pump's) and the per-run limits.
    config: EngineConfig = attrs.field(factory=EngineConfig)
    principal: str = ""
    observer: RunObserver = attrs.field(factory=NullObserver)
    run_id: str = attrs.field(factory=new_run_id)
    on_subscribers_changed: Callable[[], None] = attrs.field(default=lambda: None)
    # Called (synchronously) once the terminal event is out.
    on_ended: Callable[[Run], None] = attrs.field(default=lambda run: None)
    # For observers (metrics): the run this one superseded, and when (trio
    # clock) the superseding prompt was admitted.
    supersedes: str | None = None
    admitted_at: float | None = None

    lifecycle: Lifecycle = attrs.field(factory=Lifecycle, init=False)
    # What went wrong around the run (recording it), reported on its terminal event.
    error_details: ErrorInfo | None = attrs.field(default=None, init=False)
    # trio clock (durations, ordering): its task started, its terminal event out ...
    started_at: float | None = attrs.field(default=None, init=False)
    ended_at: float | None = attrs.field(default=None, init=False)
    # ... and wall clock (UNIX seconds, for records)
    created_at: float = attrs.field(factory=time.time, init=False)
    subscriber_count: int = attrs.field(default=0, init=False)

    _pump: Pump = attrs.field(init=False)
    _result: RunResult | None = attrs.field(default=None, init=False)
    _cancel_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope, init=False)
    _started: trio.Event = attrs.field(factory=trio.Event, init=False)
    _ended: trio.Event = attrs.field(factory=trio.Event, init=False)

    @_pump.default
    def _make_pump(self) -> Pump:
        return Pump(run_id=self.run_id, session_id=self.session_id, config=self.config)

    # --- queries (the lifecycle and the pump are the sources) ---------------

    @property
    def log(self) -> EventLog:
        return self._pump.log

    @property
    def state(self) -> RunState:
        return self.lifecycle.state

    @property
    def alive(self) -> bool:
        return self.lifecycle.alive

    @property
    def ended(self) -> bool:
        return self.lifecycle.ended

    @property
    def status(self) -> RunStatus:
        return self.lifecycle.status

    @property
    def cancel_reason(self) -> CancelReason | None:
        return self.lifecycle.cancel_reason

    @property
    def error(self) -> ErrorInfo | None:
        """The first error reported (the run fails with it unless it was cancelled)."""
        return self.lifecycle.error

    @property
    def text(self) -> str:
        """The answer so far (the full message once the run completed)."""
        return self._pump.text

    @property
    def usage(self) -> Usage | None:
        return self._pump.usage

    @property
    def finish_reason(self) -> str:
        return self._pump.finish_reason

    @property
    def first_delta_at(self) -> float | None:
        return self._pump.first_delta_at

    @property
    def last_delta_at(self) -> float | None:
        return self._pump.last_delta_at

    @property
    def coalesced_deltas(self) -> int:
        return self._pump.coalesced_deltas

    @property
    def finished_at(self) -> float | None:
        return None if self._result is None else self._result.finished_at

    @property
    def terminal(self) -> TerminalEvent | None:
        last = self.log.last
        return last if last is not None and last.terminal else None  # type: ignore[return-value]

    @property
    def result(self) -> RunResult:
        """The result, built once when the run ended; before that, a
        snapshot of the same shape (status ``running``)."""
        if self._result is not None and self.ended:
            return self._result
        reason = self.cancel_reason
        return RunResult(
            run_id=self.run_id,
            principal=self.principal,
            session_id=self.session_id,
            agent=agent_name(self.agent),
            status=RunStatus.RUNNING,
            cancel_reason=None if reason is None else reason.value,
            text=self.text,
            usage=self.usage,
            error_details=self.error_details,
            events=len(self.log),
            created_at=self.created_at,
        )

    # --- control -----------------------------------------------------------

    def cancel(self, reason: CancelReason) -> bool:
        """Ask the run to stop; the first reason wins. Synchronous, so it is
        safe in a ``finally`` of a cancelled task. Returns whether this call
        stopped the run: False once the agent's output is complete (the run
        then completes) or the run was already cancelled."""
        if not self.lifecycle.cancel(reason):
            return False
        self._cancel_scope.cancel()
        if self.lifecycle.state is RunState.RUNNING:
            # A pending run logs this right after its stream_start instead.
            lifecycle_event("stream_cancelled", trace=self.run_id, reason=reason.value)
        return True

    async def wait_started(self) -> None:
        """Until ``run.started`` is in the log (its start recorded first)."""
        await self._started.wait()

    async def wait_ended(self) -> None:
        await self._ended.wait()

    def subscribe(self, *, after: int = -1, counted: bool = True) -> Subscription:
        """A reader starting after event ``after`` (``-1``: from the start).

        Raises :class:`TooManySubscribers` when ``max_subscribers`` readers
        are open; open the subscription at once (synchronously) so the count
        cannot be overtaken. ``counted=False``: the server's own reader (the
        cluster's run mirror), outside the readers' limit and count; whoever
        opens it keeps the session busy by its own means."""
        if not counted:
            return Subscription(self.log, _uncounted, cursor=after + 1)
        limit = self.config.max_subscribers
        if self.subscriber_count >= limit:
            raise TooManySubscribers(f"This run already has {limit} readers, its limit.")
        return Subscription(self.log, self._count_subscriber, cursor=after + 1)

    def _count_subscriber(self, delta: int) -> None:
        self.subscriber_count += delta
        self.on_subscribers_changed()

    # --- the task ----------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run to the end.

        Reports started at once, before any checkpoint: from then on the run
        belongs to the nursery it was started in, whatever becomes of the
        caller. It then records its start (the observer's ``run_started``,
        bounded by the cleanup budget) and only then publishes
        ``run.started``; :meth:`wait_started` returns after that. So a run
        id a client can learn is already in the store (a kill -9 cannot lose
        it); a start that could not be recorded does not stop the run."""
        task_status.started()
        self.started_at = trio.current_time()
        budget = self.config.cleanup_budget
        try:
            with self._cancel_scope:
                try:
                    # Inside the run's scope: a run stopped meanwhile records
                    # its start when it ends instead.
                    with trio.move_on_after(budget):
                        await self._tell_observer(self.observer.run_started(self))
                finally:
                    self._publish_started()
                # Inside the run's own scope: an explicit cancel (outer) wins
                # over the deadline, and only the deadline is caught here.
                with trio.move_on_after(self.config.run_timeout or math.inf) as deadline:
                    await produce(self.agent, self.request, self._pump, self.lifecycle)
                if deadline.cancelled_caught and self.lifecycle.cancel(CancelReason.DEADLINE):
                    lifecycle_event("stream_cancelled", trace=self.run_id, reason="deadline")
        except Exception:
            logger.exception("run %s: engine failure", self.run_id)
            self.lifecycle.fail(INTERNAL_ERROR)
        finally:
            try:
                if self.lifecycle.cut_short:
                    # Cancelled from outside (the session or manager shut
                    # down) without an explicit reason: that is a shutdown.
                    self.lifecycle.cancel(CancelReason.SHUTDOWN)
                    lifecycle_event("stream_cancelled", trace=self.run_id, reason="shutdown")
                result = self._decide()
                with trio.move_on_after(budget, shield=True) as cleanup:
                    await self._tell_observer(self.observer.run_ended(self, result))
                if cleanup.cancelled_caught:
                    logger.warning(
                        "cleanup_budget_exceeded trace=%s budget_s=%s", self.run_id, budget
                    )
                    # The record may not say how the run ended: tell its readers.
                    self.error_details = ObserverError().error_info
                self._end()
            finally:
                # Whatever happened above (an engine bug included: it ends
                # the session), waiters (the submitter, the next submit, a
                # drain) must not wait forever.
                self._started.set()
                self._ended.set()
                self.on_ended(self)

    async def _tell_observer(self, call: Awaitable[None]) -> None:
        try:
            await call
        except ObserverError as exc:
            logger.warning("run %s: observer failed: %s", self.run_id, exc.error_info.code)
            self.error_details = exc.error_info
        except Exception:
            logger.exception("run %s: observer failed", self.run_id)
            self.error_details = ObserverError().error_info

    # --- starting and ending -------------------------------------------------

    def _publish_started(self) -> None:
        """``run.started`` (seq 0), and the log lines of a run stopped before it."""
        self.lifecycle.start()
        self.log.append(RunStarted(**self._pump.envelope()))
        lifecycle_event("stream_start", trace=self.run_id, session=self.session_id)
        if self.cancel_reason is not None:
            lifecycle_event("stream_cancelled", trace=self.run_id, reason=self.cancel_reason.value)
        self._started.set()

    def _decide(self) -> RunResult:
        """RUNNING → CLEANING: the outcome, and the result built from it."""
        outcome = self.lifecycle.decide()
        # The closing events _end will publish: buffered deltas, the full
        # message (completed runs) and the terminal event.
        closing = (1 if self._pump.buffered else 0) + (
            1 if outcome.status is RunStatus.COMPLETED else 0
        )
        self._result = RunResult(
            run_id=self.run_id,
            principal=self.principal,
            session_id=self.session_id,
            agent=agent_name(self.agent),
            status=outcome.status,
            cancel_reason=None if outcome.cancel_reason is None else outcome.cancel_reason.value,
            finish_reason=self.finish_reason if outcome.status is RunStatus.COMPLETED else None,
            text=self.text,
            usage=self.usage,
            error=outcome.error,
            error_details=self.error_details,
            events=len(self.log) + closing + 1,
            created_at=self.created_at,
            finished_at=time.time(),
        )
        return self._result

    def _end(self) -> None:
        """Publish buffered deltas, the full message (on completion) and the
        terminal event: synchronous, so nothing can slip between them."""
        assert self._result is not None and self.lifecycle.outcome is not None
        if self._result.error_details != self.error_details:
            # Recording the end failed: the result says so, as the event will.
            self._result = attrs.evolve(self._result, error_details=self.error_details)
        self._pump.flush()
        outcome = self.lifecycle.outcome
        if outcome.status is RunStatus.COMPLETED:
            self.log.append(RunMessage(**self._pump.envelope(), text=self.text))
        self.log.append(
            outcome.terminal_event(
                self._pump.envelope(),
                usage=self.usage,
                finish_reason=self.finish_reason,
                error_details=self.error_details,
            )
        )
        self.lifecycle.end()
        self.ended_at = trio.current_time()
        assert self.started_at is not None
        lifecycle_event(
            "stream_end",
            trace=self.run_id,
            status=outcome.status.value,
            events=len(self.log),
            duration_ms=round((self.ended_at - self.started_at) * 1000),
        )
