"""A run's result as one frozen value.

Built once, when the run ends (:attr:`Run.result <server.core.run.Run.result>`),
and read by everything that reports on ended runs: the run store records
it, metrics label it, the records API (``GET /v1/runs/{id}``) renders it. A
live run gives a snapshot of the same shape (status ``running``), and a run
known only to the store gives what the store kept (no event count, no
finish reason, no error details).
"""

from __future__ import annotations

from typing import Any

import attrs

from .events import ErrorInfo, RunStatus, Usage


def _finished_iff_ended(result: RunResult, attribute: Any, value: float | None) -> None:
    if (value is None) != (result.status is RunStatus.RUNNING):
        raise ValueError("finished_at is set exactly when the run has ended")


@attrs.frozen(kw_only=True)
class RunResult:
    run_id: str = attrs.field(validator=attrs.validators.min_len(1))
    principal: str
    session_id: str
    # The agent's name.
    agent: str
    status: RunStatus
    # A CancelReason value on cancelled and interrupted runs (and on a live
    # run asked to stop); the store adds ``crash_recovery``.
    cancel_reason: str | None = None
    # The model's stop reason, on runs that completed (None from the store).
    finish_reason: str | None = None
    text: str = ""
    usage: Usage | None = None
    # Why a failed run failed (client-safe).
    error: ErrorInfo | None = None
    # What went wrong around the run (recording it), as on its terminal event.
    error_details: ErrorInfo | None = None
    # Events in its log; None when only the store knows the run.
    events: int | None = None
    # Wall clock, UNIX seconds.
    created_at: float
    finished_at: float | None = attrs.field(default=None, validator=_finished_iff_ended)

    @property
    def ended(self) -> bool:
        return self.status is not RunStatus.RUNNING

    @property
    def end_reason(self) -> str:
        """One word for why it ended: the cancel reason of a cancelled or
        interrupted run, the error code of a failed one, else ``none``."""
        if self.cancel_reason is not None and self.status in (
            RunStatus.CANCELLED,
            RunStatus.INTERRUPTED,
        ):
            return self.cancel_reason
        if self.status is RunStatus.FAILED and self.error is not None:
            return self.error.code
        return "none"
