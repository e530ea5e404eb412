"""The run state machine and the event log's rules, without an event loop."""

from __future__ import annotations

import pytest

from server.core.eventlog import EventLog
from server.core.events import CancelReason, RunCancelled, RunStarted
from server.core.lifecycle import Lifecycle, LifecycleError, RunState


def test_lifecycle_rejects_illegal_transitions() -> None:
    lifecycle = Lifecycle()
    with pytest.raises(LifecycleError):
        lifecycle.advance(RunState.ENDED)
    lifecycle.advance(RunState.RUNNING)
    with pytest.raises(LifecycleError):
        lifecycle.advance(RunState.PENDING)
    lifecycle.advance(RunState.CLEANING)
    lifecycle.advance(RunState.ENDED)
    for state in RunState:
        with pytest.raises(LifecycleError):
            lifecycle.advance(state)


def test_event_log_refuses_gaps_and_events_after_terminal() -> None:
    log = EventLog()
    log.append(RunStarted(run_id="r", session_id="s", seq=0))
    with pytest.raises(LifecycleError):
        log.append(RunStarted(run_id="r", session_id="s", seq=2))
    log.append(RunCancelled(run_id="r", session_id="s", seq=1, reason=CancelReason.CLIENT_STOP))
    with pytest.raises(LifecycleError):
        log.append(RunStarted(run_id="r", session_id="s", seq=2))
