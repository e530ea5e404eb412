"""A run's lifecycle as an explicit state machine (in the manner of h11's
``_state.py``): its phase *and* its outcome, in one place. No I/O, no trio.

Rule 1: a run moves PENDING → RUNNING → CLEANING → ENDED, never back and
        never skipping one. PENDING: admitted, recording its start.
        RUNNING: ``run.started`` is out and the agent produces. CLEANING:
        the outcome is decided and the run records it. ENDED: the terminal
        event is out.
Rule 2: a run cancelled before it ever ran still passes through RUNNING: it
        publishes ``run.started`` and then its terminal event, so every run
        has the same event shape.
Rule 3: a run is asked to stop at most once. The first cancel reason wins;
        a cancel is refused once the agent's output is complete (the run
        then completes) and once the run is cleaning up. Likewise the first
        error wins.
Rule 4: the outcome is decided once, on RUNNING → CLEANING: a cancel reason
        makes the run *interrupted* (the server's doing: shutdown,
        deadline) or *cancelled* (a client's); else an error makes it
        *failed*; else an agent that finished makes it *completed*. A run
        cut short with none of these has no outcome: the caller names the
        cause (a shutdown) first.
Rule 5: ENDED is final and carries the outcome; the terminal event is
        published exactly once, on CLEANING → ENDED.

Any other transition (and a second decision) raises :class:`LifecycleError`.
"""

from __future__ import annotations

import enum
from typing import Any

import attrs

from .errors import LifecycleError as LifecycleError
from .events import (
    CancelReason,
    Envelope,
    ErrorInfo,
    RunCancelled,
    RunCompleted,
    RunFailed,
    RunInterrupted,
    RunStatus,
    TerminalEvent,
    Usage,
)


class RunState(enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    CLEANING = "cleaning"
    ENDED = "ended"


class Transition(enum.Enum):
    """What moves a run on (h11's events, for its states)."""

    START = "start"  # run.started is published
    DECIDE = "decide"  # the agent stopped: the outcome is fixed
    END = "end"  # the terminal event is published


_TRANSITIONS: dict[RunState, dict[Transition, RunState]] = {
    RunState.PENDING: {Transition.START: RunState.RUNNING},
    RunState.RUNNING: {Transition.DECIDE: RunState.CLEANING},
    RunState.CLEANING: {Transition.END: RunState.ENDED},
    RunState.ENDED: {},
}

# While a stop may still be asked for (Rule 3).
_STOPPABLE = frozenset({RunState.PENDING, RunState.RUNNING})
_CANCEL_STATUSES = frozenset({RunStatus.CANCELLED, RunStatus.INTERRUPTED})


def _reason_iff_cancelled(outcome: Outcome, attribute: Any, value: CancelReason | None) -> None:
    if (value is not None) != (outcome.status in _CANCEL_STATUSES):
        raise ValueError(f"a {outcome.status.value} outcome with cancel reason {value}")


def _error_iff_failed(outcome: Outcome, attribute: Any, value: ErrorInfo | None) -> None:
    if (value is not None) != (outcome.status is RunStatus.FAILED):
        raise ValueError(f"a {outcome.status.value} outcome with error {value}")


def _ended_status(outcome: Outcome, attribute: Any, value: RunStatus) -> None:
    if value is RunStatus.RUNNING:
        raise ValueError("an outcome is a terminal status")


@attrs.frozen(kw_only=True)
class Outcome:
    """How a run ended: what its terminal event, its record and its metrics say."""

    status: RunStatus = attrs.field(validator=_ended_status)
    cancel_reason: CancelReason | None = attrs.field(default=None, validator=_reason_iff_cancelled)
    error: ErrorInfo | None = attrs.field(default=None, validator=_error_iff_failed)

    def terminal_event(
        self,
        envelope: Envelope,
        *,
        usage: Usage | None,
        finish_reason: str,
        error_details: ErrorInfo | None,
    ) -> TerminalEvent:
        """The one event that publishes this outcome (Rule 5)."""
        if self.error is not None:
            return RunFailed(**envelope, error=self.error, error_details=error_details)
        if self.cancel_reason is not None:
            kind = RunInterrupted if self.status is RunStatus.INTERRUPTED else RunCancelled
            return kind(**envelope, reason=self.cancel_reason, error_details=error_details)
        return RunCompleted(
            **envelope, usage=usage, finish_reason=finish_reason, error_details=error_details
        )


@attrs.define
class Lifecycle:
    state: RunState = RunState.PENDING
    # What asked the run to stop, first one each (Rule 3); fixed by the outcome.
    cancel_reason: CancelReason | None = None
    error: ErrorInfo | None = None
    # The agent returned by itself: a cancel is too late (Rule 3).
    agent_done: bool = False
    # Decided on RUNNING → CLEANING and carried by CLEANING and ENDED (Rules 4, 5).
    outcome: Outcome | None = None

    # --- queries -------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """Producing or cleaning up: what invariant 1 counts."""
        return self.state in (RunState.RUNNING, RunState.CLEANING)

    @property
    def ended(self) -> bool:
        return self.state is RunState.ENDED

    @property
    def status(self) -> RunStatus:
        """``running`` until the terminal event is out, then the outcome's."""
        if self.state is RunState.ENDED:
            assert self.outcome is not None
            return self.outcome.status
        return RunStatus.RUNNING

    @property
    def cut_short(self) -> bool:
        """The agent stopped with no reason, no error and its answer
        incomplete: cancelled from outside (Rule 4)."""
        return (
            self.state is RunState.RUNNING
            and self.cancel_reason is None
            and self.error is None
            and not self.agent_done
        )

    # --- asking to stop (Rule 3) ---------------------------------------------

    def cancel(self, reason: CancelReason) -> bool:
        """Ask the run to stop with ``reason``; whether this call did."""
        if self.state not in _STOPPABLE or self.cancel_reason is not None or self.agent_done:
            return False
        self.cancel_reason = reason
        return True

    def fail(self, error: ErrorInfo) -> None:
        """Record an error (the first one wins)."""
        if self.state not in _STOPPABLE:
            raise LifecycleError(f"an error reported while the run is {self.state.value}")
        if self.error is None:
            self.error = error

    def agent_finished(self) -> None:
        """The agent returned by itself: the run will complete (or fail)."""
        if self.state is not RunState.RUNNING:
            raise LifecycleError(f"the agent finished while the run is {self.state.value}")
        self.agent_done = True

    # --- transitions -----------------------------------------------------------

    def start(self) -> None:
        self._advance(Transition.START)

    def decide(self) -> Outcome:
        """RUNNING → CLEANING: fix the outcome (Rule 4)."""
        if self.cancel_reason is not None:
            ended_by_server = self.cancel_reason.ended_by_server
            status = RunStatus.INTERRUPTED if ended_by_server else RunStatus.CANCELLED
            outcome = Outcome(status=status, cancel_reason=self.cancel_reason)
        elif self.error is not None:
            outcome = Outcome(status=RunStatus.FAILED, error=self.error)
        elif self.agent_done:
            outcome = Outcome(status=RunStatus.COMPLETED)
        else:
            raise LifecycleError("a run stopped without a cause")
        self._advance(Transition.DECIDE)
        self.outcome = outcome
        return outcome

    def end(self) -> Outcome:
        """CLEANING → ENDED: the terminal event is out (Rule 5)."""
        self._advance(Transition.END)
        assert self.outcome is not None
        return self.outcome

    def _advance(self, transition: Transition) -> None:
        new = _TRANSITIONS[self.state].get(transition)
        if new is None:
            raise LifecycleError(
                f"illegal run transition: {transition.value} while {self.state.value}"
            )
        self.state = new
