"""One run: an agent's answer to one prompt.

Pipeline: agent ──memory channel──▶ pump ──▶ :class:`EventLog` ──▶ subscribers.

Resource handling: the agent and the pump run in a nursery inside the run's
own cancel scope, so cancelling the run reaches the agent at its next
checkpoint. The run's task lives in its session's nursery, never in an HTTP
handler, so the run is owned whoever is (or is not) reading it.

Ending: whatever stops the run (completion, :meth:`Run.cancel`, an agent
error, cancellation of the session from outside), the ``finally`` block
publishes exactly one terminal event. Cleanup that awaits (the observer,
which persists) runs shielded under ``move_on_after(cleanup_budget)``: it
completes under cancellation but cannot hang the session.

Limits: ``run_timeout`` (0: none) interrupts a run that is still producing
that long after it started, with reason ``deadline``, through the same
cleanup as any other cancel. A run whose answer would exceed ``max_bytes``
(UTF-8) or whose log would exceed ``max_events`` ends ``failed`` with
``run_too_large`` (the agent is cancelled; what was published stays), so no
run's log grows without bound. ``max_subscribers`` readers at once; one more
is refused with :class:`TooManySubscribers`.

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
from typing import Protocol, TypedDict

import attrs
import trio

from .agent import Agent, AgentError, AgentRequest
from .eventlog import EventLog, Subscription
from .events import (
    AgentOutput,
    CancelReason,
    ErrorInfo,
    FullMessage,
    RunCancelled,
    RunCompleted,
    RunDelta,
    RunFailed,
    RunInterrupted,
    RunMessage,
    RunStarted,
    RunStatus,
    StopReason,
    TerminalEvent,
    TextDelta,
    Usage,
    UsageReport,
    status_of,
)
from .lifecycle import Lifecycle, RunState
from .lifecycle_log import lifecycle_event
from .limits import TooManySubscribers

logger = logging.getLogger(__name__)

AGENT_ERROR = ErrorInfo(code="agent_error", message="The agent failed while producing the answer.")
INTERNAL_ERROR = ErrorInfo(
    code="internal_error", message="The server failed while running the agent."
)
RUN_TOO_LARGE = ErrorInfo(
    code="run_too_large", message="The answer exceeded the server's size limit for one run."
)
# Events a run may still publish once its agent stops: the buffered deltas,
# run.message and the terminal event. max_events keeps room for them.
CLOSING_EVENTS = 3


class ObserverError(Exception):
    """An observer (the run store) failed; ``error_info`` is client-safe and
    goes on the run's terminal event as ``error_details``."""

    @property
    def error_info(self) -> ErrorInfo:
        return ErrorInfo(code="observer_failed", message="The run could not be recorded.")


class RunObserver(Protocol):
    """Told when a run starts and when it ends (before its terminal event is
    published): the seam where the run store records runs.

    ``run_started`` runs once the run is registered, bounded by the cleanup
    budget; ``run_ended`` inside the run's shielded, bounded cleanup. A
    failure is logged and reported on the terminal event, never fatal."""

    async def run_started(self, run: Run) -> None: ...

    async def run_ended(self, run: Run, status: RunStatus) -> None: ...

    async def run_discarded(self, run: Run) -> None:
        """Forget an ended run (the ``rollback`` strategy)."""


class NullObserver:
    async def run_started(self, run: Run) -> None:
        return None

    async def run_ended(self, run: Run, status: RunStatus) -> None:
        return None

    async def run_discarded(self, run: Run) -> None:
        return None


class _Envelope(TypedDict):
    run_id: str
    session_id: str
    seq: int


def new_run_id() -> str:
    return f"run_{uuid.uuid4().hex}"


@attrs.define(eq=False)
class Run:
    session_id: str
    request: AgentRequest
    agent: Agent
    cleanup_budget: float
    principal: str = ""
    observer: RunObserver = attrs.field(factory=NullObserver)
    # Seconds deltas are gathered into one run.delta (0: publish each at once).
    coalesce_window: float = 0.0
    coalesce_max_chars: int = 2048
    run_id: str = attrs.field(factory=new_run_id)
    on_subscribers_changed: Callable[[], None] = attrs.field(default=lambda: None)
    # Called (synchronously) once the terminal event is out.
    on_ended: Callable[[Run], None] = attrs.field(default=lambda run: None)
    # For observers (metrics): the run this one superseded, and when (trio
    # clock) the superseding prompt was admitted.
    supersedes: str | None = None
    admitted_at: float | None = None
    # Limits (see the module docstring); the defaults are EngineConfig's.
    run_timeout: float = 0.0
    max_events: int = attrs.field(default=100_000, validator=attrs.validators.gt(CLOSING_EVENTS))
    max_bytes: int = 8 * 1024 * 1024
    max_subscribers: int = 64

    log: EventLog = attrs.field(factory=EventLog, init=False)
    lifecycle: Lifecycle = attrs.field(factory=Lifecycle, init=False)
    cancel_reason: CancelReason | None = attrs.field(default=None, init=False)
    error: ErrorInfo | None = attrs.field(default=None, init=False)
    # What went wrong around the run (recording it), reported on its terminal event.
    error_details: ErrorInfo | None = attrs.field(default=None, init=False)
    usage: Usage | None = attrs.field(default=None, init=False)
    finish_reason: str = attrs.field(default="stop", init=False)
    # trio clock (durations, ordering) ...
    started_at: float | None = attrs.field(default=None, init=False)
    ended_at: float | None = attrs.field(default=None, init=False)
    # ... and wall clock (UNIX seconds, for records)
    created_at: float = attrs.field(factory=time.time, init=False)
    finished_at: float | None = attrs.field(default=None, init=False)
    subscriber_count: int = attrs.field(default=0, init=False)
    # trio clock when the first and the latest run.delta were published
    # (time to first token; how long a stream has been silent).
    first_delta_at: float | None = attrs.field(default=None, init=False)
    last_delta_at: float | None = attrs.field(default=None, init=False)

    _cancel_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope, init=False)
    _producing: bool = attrs.field(default=False, init=False)
    _deltas: list[str] = attrs.field(factory=list, init=False)
    # Deltas received but not yet published (the coalescing window's).
    _buffered: list[str] = attrs.field(factory=list, init=False)
    _buffered_chars: int = attrs.field(default=0, init=False)
    _message: str | None = attrs.field(default=None, init=False)
    _delta_events: int = attrs.field(default=0, init=False)
    _text_bytes: int = attrs.field(default=0, init=False)
    _started: trio.Event = attrs.field(factory=trio.Event, init=False)
    _ended: trio.Event = attrs.field(factory=trio.Event, init=False)

    # --- queries -----------------------------------------------------------

    @property
    def state(self) -> RunState:
        return self.lifecycle.state

    @property
    def alive(self) -> bool:
        return self.lifecycle.alive

    @property
    def ended(self) -> bool:
        return self._ended.is_set()

    @property
    def text(self) -> str:
        """The answer so far (the full message once the run completed)."""
        return self._message if self._message is not None else "".join(self._deltas)

    @property
    def terminal(self) -> TerminalEvent | None:
        last = self.log.last
        return last if last is not None and last.terminal else None  # type: ignore[return-value]

    @property
    def coalesced_deltas(self) -> int:
        """Agent deltas that went out merged into another one's ``run.delta``
        (those still buffered counted as the flush will merge them)."""
        pending_events = 1 if self._buffered else 0
        return len(self._deltas) - self._delta_events - pending_events

    @property
    def status(self) -> RunStatus:
        terminal = self.terminal
        return RunStatus.RUNNING if terminal is None else status_of(terminal)

    # --- control -----------------------------------------------------------

    def cancel(self, reason: CancelReason) -> bool:
        """Ask the run to stop; the first reason wins. Synchronous, so it is
        safe in a ``finally`` of a cancelled task. Returns whether this call
        stopped the run: False once the agent's output is complete (the run
        then completes) or the run was already cancelled."""
        if self.cancel_reason is not None:
            return False
        if self.lifecycle.state is RunState.RUNNING and not self._producing:
            return False
        if self.lifecycle.state not in (RunState.PENDING, RunState.RUNNING):
            return False
        self.cancel_reason = reason
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

    def subscribe(self, *, after: int = -1) -> Subscription:
        """A reader starting after event ``after`` (``-1``: from the start).

        Raises :class:`TooManySubscribers` when ``max_subscribers`` readers
        are open; open the subscription at once (synchronously) so the count
        cannot be overtaken."""
        if self.subscriber_count >= self.max_subscribers:
            raise TooManySubscribers(
                f"This run already has {self.max_subscribers} readers, its limit."
            )
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
        finished = False
        try:
            with self._cancel_scope:
                try:
                    # Inside the run's scope: a run stopped meanwhile records
                    # its start when it ends instead.
                    with trio.move_on_after(self.cleanup_budget):
                        await self._tell_observer(self.observer.run_started(self))
                finally:
                    self._publish_started()
                # Inside the run's own scope: an explicit cancel (outer) wins
                # over the deadline, and only the deadline is caught here.
                with trio.move_on_after(self.run_timeout or math.inf) as deadline:
                    async with trio.open_nursery() as nursery:
                        send_channel, receive_channel = trio.open_memory_channel[AgentOutput](0)
                        nursery.start_soon(self._drive_agent, send_channel)
                        # Closed only after the agent was cancelled: a send
                        # that found it closed first would fail the agent
                        # (BrokenResourceError) over the pump's own error.
                        with receive_channel:
                            await self._pump(receive_channel)
                            if self.error is not None:
                                # The pump refused the agent's output: stop the agent.
                                nursery.cancel_scope.cancel()
                    # The agent has returned: from here on a cancel is too late
                    # and the run completes.
                    self._producing = False
                    finished = True
                if deadline.cancelled_caught and self.cancel_reason is None:
                    self.cancel_reason = CancelReason.DEADLINE
                    lifecycle_event("stream_cancelled", trace=self.run_id, reason="deadline")
        except Exception:
            logger.exception("run %s: engine failure", self.run_id)
            self.error = INTERNAL_ERROR
        finally:
            self._producing = False
            self.lifecycle.advance(RunState.CLEANING)
            if self.error is None and self.cancel_reason is None and not finished:
                # Cancelled from outside (the session or manager shut down)
                # without an explicit reason: that is a shutdown.
                self.cancel_reason = CancelReason.SHUTDOWN
                lifecycle_event("stream_cancelled", trace=self.run_id, reason="shutdown")
            status = self._final_status()
            with trio.move_on_after(self.cleanup_budget, shield=True) as cleanup:
                await self._tell_observer(self.observer.run_ended(self, status))
            if cleanup.cancelled_caught:
                logger.warning(
                    "cleanup_budget_exceeded trace=%s budget_s=%s", self.run_id, self.cleanup_budget
                )
                # The record may not say how the run ended: tell its readers.
                self.error_details = ObserverError().error_info
            try:
                self._end(status)
            finally:
                # Whatever happened above, waiters (the next submit, a drain)
                # must not wait forever.
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

    async def _drive_agent(self, send_channel: trio.MemorySendChannel[AgentOutput]) -> None:
        async with send_channel:
            try:
                await self.agent.run(self.request, send_channel)
            except AgentError as exc:
                logger.warning("run %s: agent error %s", self.run_id, exc.code)
                self.error = self.error or ErrorInfo(code=exc.code, message=exc.message)
            except Exception:
                logger.exception("run %s: agent raised", self.run_id)
                # The pump's refusal (run_too_large, a bad output) is the cause.
                self.error = self.error or AGENT_ERROR

    async def _pump(self, receive_channel: trio.MemoryReceiveChannel[AgentOutput]) -> None:
        """Number the agent's output into the log, coalescing deltas.

        Coalescing: a delta that arrives while no window is open is published
        at once and opens a window of ``coalesce_window`` seconds; deltas
        arriving inside it are buffered and published as one ``run.delta``
        when it closes (or as soon as ``coalesce_max_chars`` are buffered),
        and a new window opens. A window that closes with nothing buffered
        simply ends. The window's timer is this pump's own receive deadline
        (set only while something is buffered), so it cannot outlive the
        run. Whatever is buffered when the pump stops is flushed by
        :meth:`_end`, before ``run.message`` and the terminal event; a delta
        still in the channel then is never received.
        """
        # Until window_end, deltas are buffered; the first delta after it is
        # published at once and opens the next window. Only a window with
        # something buffered needs a timer: a model streaming slower than
        # the window costs no timer per token.
        window_end = -math.inf
        while True:
            if self._buffered:
                with trio.move_on_at(window_end) as window:
                    try:
                        output = await receive_channel.receive()
                    except trio.EndOfChannel:
                        return
                if window.cancelled_caught:
                    if not self._room_for_delta():
                        return
                    self._flush_buffer()
                    window_end = self._window_from_now()
                    continue
            else:
                try:
                    output = await receive_channel.receive()
                except trio.EndOfChannel:
                    return
            match output:
                case TextDelta(text=text) if text:
                    if not self._take_bytes(text):
                        return
                    if not self._buffered and trio.current_time() >= window_end:
                        if not self._room_for_delta():
                            return
                        self._deltas.append(text)
                        self._publish_delta(text)
                        window_end = self._window_from_now()
                    else:
                        self._deltas.append(text)
                        self._buffered.append(text)
                        self._buffered_chars += len(text)
                        if self._buffered_chars >= self.coalesce_max_chars:
                            if not self._room_for_delta():
                                return
                            self._flush_buffer()
                            window_end = self._window_from_now()
                case FullMessage(text=text):
                    if utf8_size(text) > self.max_bytes:
                        self._too_large()
                        return
                    self._message = text
                case UsageReport(usage=usage):
                    self.usage = usage
                case StopReason(reason=reason):
                    self.finish_reason = reason
                case TextDelta():
                    pass  # empty
                case _:
                    # Not something an agent may send: end the run failed
                    # (the agent's next send then finds the channel closed).
                    logger.warning("run %s: agent sent %r", self.run_id, type(output))
                    self.error = AGENT_ERROR
                    return

    def _take_bytes(self, text: str) -> bool:
        """Count a delta against ``max_bytes``; False (run failed) if over."""
        self._text_bytes += utf8_size(text)
        if self._text_bytes > self.max_bytes:
            self._too_large()
            return False
        return True

    def _room_for_delta(self) -> bool:
        """Whether one more run.delta leaves room for the closing events;
        False (run failed) if not."""
        if len(self.log) + 1 + CLOSING_EVENTS > self.max_events:
            self._too_large()
            return False
        return True

    def _too_large(self) -> None:
        logger.warning(
            "run_too_large trace=%s events=%d bytes=%d",
            self.run_id,
            len(self.log),
            self._text_bytes,
        )
        self.error = RUN_TOO_LARGE

    def _window_from_now(self) -> float:
        return trio.current_time() + self.coalesce_window

    def _flush_buffer(self) -> None:
        if self._buffered:
            text = "".join(self._buffered)
            self._buffered.clear()
            self._buffered_chars = 0
            self._publish_delta(text)

    def _publish_started(self) -> None:
        """``run.started`` (seq 0), and the log lines of a run stopped before it."""
        self.lifecycle.advance(RunState.RUNNING)
        self._producing = True
        self.log.append(RunStarted(**self._envelope()))
        lifecycle_event("stream_start", trace=self.run_id, session=self.session_id)
        if self.cancel_reason is not None:
            lifecycle_event("stream_cancelled", trace=self.run_id, reason=self.cancel_reason.value)
        self._started.set()

    def _publish_delta(self, text: str) -> None:
        self.log.append(RunDelta(**self._envelope(), text=text))
        self._delta_events += 1
        self.last_delta_at = trio.current_time()
        if self.first_delta_at is None:
            self.first_delta_at = self.last_delta_at

    # --- ending ------------------------------------------------------------

    def _final_status(self) -> RunStatus:
        if self.cancel_reason is not None:
            return (
                RunStatus.INTERRUPTED if self.cancel_reason.ended_by_server else RunStatus.CANCELLED
            )
        if self.error is not None:
            return RunStatus.FAILED
        return RunStatus.COMPLETED

    def _end(self, status: RunStatus) -> None:
        """Publish buffered deltas, the full message (on completion) and the
        terminal event: synchronous, so nothing can slip between them."""
        self._flush_buffer()
        if status is RunStatus.COMPLETED:
            self.log.append(RunMessage(**self._envelope(), text=self.text))
            self.log.append(
                RunCompleted(
                    **self._envelope(),
                    usage=self.usage,
                    finish_reason=self.finish_reason,
                    error_details=self.error_details,
                )
            )
        elif status is RunStatus.FAILED:
            assert self.error is not None
            self.log.append(
                RunFailed(**self._envelope(), error=self.error, error_details=self.error_details)
            )
        else:
            assert self.cancel_reason is not None
            event_type = RunInterrupted if status is RunStatus.INTERRUPTED else RunCancelled
            self.log.append(
                event_type(
                    **self._envelope(), reason=self.cancel_reason, error_details=self.error_details
                )
            )
        self.lifecycle.advance(RunState.ENDED)
        self.ended_at = trio.current_time()
        self.finished_at = time.time()
        assert self.started_at is not None
        lifecycle_event(
            "stream_end",
            trace=self.run_id,
            status=status.value,
            events=len(self.log),
            duration_ms=round((self.ended_at - self.started_at) * 1000),
        )

    def _envelope(self) -> _Envelope:
        return {"run_id": self.run_id, "session_id": self.session_id, "seq": len(self.log)}


def utf8_size(text: str) -> int:
    """Bytes of ``text`` in UTF-8; an agent's lone surrogate (which the
    encoders replace) counts as the 3 bytes it would take."""
    return len(text.encode("utf-8", "surrogatepass"))
