"""The run state machine and the event log's rules, without an event loop."""

from __future__ import annotations

import pytest

from server.core.eventlog import EventLog
from server.core.events import CancelReason, ErrorInfo, RunCancelled, RunStarted, RunStatus
from server.core.lifecycle import Lifecycle, LifecycleError, Outcome, RunState


def test_lifecycle_rejects_illegal_transitions() -> None:
    lifecycle = Lifecycle()
    with pytest.raises(LifecycleError):
        lifecycle.end()
    with pytest.raises(LifecycleError):
        lifecycle.decide()
    lifecycle.start()
    with pytest.raises(LifecycleError):
        lifecycle.start()
    lifecycle.agent_finished()
    lifecycle.decide()
    with pytest.raises(LifecycleError):
        lifecycle.decide()
    lifecycle.end()
    for transition in (lifecycle.start, lifecycle.decide, lifecycle.end):
        with pytest.raises(LifecycleError):
            transition()
    assert lifecycle.state is RunState.ENDED


def ended(lifecycle: Lifecycle) -> Lifecycle:
    lifecycle.decide()
    lifecycle.end()
    return lifecycle


def test_ended_carries_the_outcome_and_status_reads_it() -> None:
    lifecycle = Lifecycle()
    lifecycle.start()
    lifecycle.agent_finished()
    assert lifecycle.status is RunStatus.RUNNING
    lifecycle.decide()
    assert lifecycle.status is RunStatus.RUNNING  # until the terminal event is out
    assert lifecycle.end() == Outcome(status=RunStatus.COMPLETED)
    assert lifecycle.status is RunStatus.COMPLETED


def test_the_first_cancel_wins_and_decides_cancelled_or_interrupted() -> None:
    stopped = Lifecycle()
    assert stopped.cancel(CancelReason.CLIENT_STOP)  # before it ran (Rule 2)
    assert not stopped.cancel(CancelReason.SUPERSEDED)
    stopped.start()
    assert ended(stopped).outcome == Outcome(
        status=RunStatus.CANCELLED, cancel_reason=CancelReason.CLIENT_STOP
    )
    shut_down = Lifecycle()
    shut_down.start()
    shut_down.fail(ErrorInfo(code="agent_error", message="x"))
    assert shut_down.cancel(CancelReason.SHUTDOWN)  # a cancel outranks an error
    assert ended(shut_down).status is RunStatus.INTERRUPTED


def test_a_cancel_is_refused_once_the_agent_finished_or_the_run_is_cleaning() -> None:
    done = Lifecycle()
    done.start()
    done.agent_finished()
    assert not done.cancel(CancelReason.CLIENT_STOP)
    assert ended(done).status is RunStatus.COMPLETED
    cleaning = Lifecycle()
    cleaning.start()
    cleaning.fail(ErrorInfo(code="agent_error", message="x"))
    cleaning.decide()
    assert not cleaning.cancel(CancelReason.CLIENT_STOP)
    with pytest.raises(LifecycleError):
        cleaning.fail(ErrorInfo(code="late", message="x"))
    assert cleaning.end() == Outcome(
        status=RunStatus.FAILED, error=ErrorInfo(code="agent_error", message="x")
    )


def test_a_run_stopped_without_a_cause_is_a_bug_until_one_is_named() -> None:
    lifecycle = Lifecycle()
    lifecycle.start()
    assert lifecycle.cut_short
    with pytest.raises(LifecycleError):
        lifecycle.decide()
    assert lifecycle.cancel(CancelReason.SHUTDOWN)
    assert not lifecycle.cut_short
    assert ended(lifecycle).status is RunStatus.INTERRUPTED


def test_an_outcome_is_coherent_by_construction() -> None:
    with pytest.raises(ValueError):
        Outcome(status=RunStatus.RUNNING)
    with pytest.raises(ValueError):
        Outcome(status=RunStatus.COMPLETED, cancel_reason=CancelReason.SHUTDOWN)
    with pytest.raises(ValueError):
        Outcome(status=RunStatus.FAILED)


def test_event_log_refuses_gaps_and_events_after_terminal() -> None:
    log = EventLog()
    log.append(RunStarted(run_id="r", session_id="s", seq=0))
    with pytest.raises(LifecycleError):
        log.append(RunStarted(run_id="r", session_id="s", seq=2))
    log.append(RunCancelled(run_id="r", session_id="s", seq=1, reason=CancelReason.CLIENT_STOP))
    with pytest.raises(LifecycleError):
        log.append(RunStarted(run_id="r", session_id="s", seq=2))
