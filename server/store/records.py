"""What the run store keeps about a run, and how a store failure looks.

A :class:`RunRecord` is one row: who asked what, which agent answered, how
the run ended and what it produced: a run's
:class:`~server.core.result.RunResult` (what the store keeps of it) and its
prompt. Its constructor enforces the same rules
as the table's CHECK constraints, so a record read back is always coherent:

* ``status`` is ``running`` exactly when ``finished_at`` is ``None``;
* ``cancel_reason`` is set only on ``cancelled`` and ``interrupted`` runs, and
  is a :class:`~server.core.events.CancelReason` value or ``crash_recovery``
  (a run the store found still ``running`` when it opened);
* ``error_code`` and ``error_message`` come together, and are client-safe
  (an :class:`~server.core.events.ErrorInfo`'s, never exception text).
"""

from __future__ import annotations

from typing import Any

import attrs

from ..core.errors import ObserverError
from ..core.events import CancelReason, ErrorInfo, RunStatus, Usage
from ..core.result import RunResult

CRASH_RECOVERY = "crash_recovery"
STORED_CANCEL_REASONS = frozenset({reason.value for reason in CancelReason} | {CRASH_RECOVERY})
ENDED_STATUSES = frozenset(RunStatus) - {RunStatus.RUNNING}


def _check_cancel_reason(record: RunRecord, attribute: Any, value: str | None) -> None:
    if value is None:
        return
    if value not in STORED_CANCEL_REASONS:
        raise ValueError(f"unknown cancel reason {value!r}")
    if record.status not in (RunStatus.CANCELLED, RunStatus.INTERRUPTED):
        raise ValueError(f"a {record.status.value} run has no cancel reason")


def _check_finished_at(record: RunRecord, attribute: Any, value: float | None) -> None:
    if (value is None) != (record.status is RunStatus.RUNNING):
        raise ValueError("finished_at is set exactly when the run has ended")


def _check_error_message(record: RunRecord, attribute: Any, value: str | None) -> None:
    if (value is None) != (record.error_code is None):
        raise ValueError("error_code and error_message come together")


@attrs.frozen(kw_only=True)
class RunRecord:
    run_id: str = attrs.field(validator=attrs.validators.min_len(1))
    principal: str
    session_id: str
    # None unless the server stores prompts (--store-prompts).
    prompt: str | None
    agent: str
    status: RunStatus = attrs.field(converter=RunStatus)
    created_at: float
    cancel_reason: str | None = attrs.field(default=None, validator=_check_cancel_reason)
    text: str = ""
    usage: Usage | None = None
    finished_at: float | None = attrs.field(default=None, validator=_check_finished_at)
    error_code: str | None = None
    error_message: str | None = attrs.field(default=None, validator=_check_error_message)

    @property
    def ended(self) -> bool:
        return self.status is not RunStatus.RUNNING

    @property
    def error(self) -> ErrorInfo | None:
        if self.error_code is None:
            return None
        return ErrorInfo(code=self.error_code, message=self.error_message or "")

    @classmethod
    def started(cls, result: RunResult, *, prompt: str | None) -> RunRecord:
        """The row a run's start inserts (its result while it runs)."""
        return cls(
            run_id=result.run_id,
            principal=result.principal,
            session_id=result.session_id,
            prompt=prompt,
            agent=result.agent,
            status=RunStatus.RUNNING,
            created_at=result.created_at,
        )

    @property
    def result(self) -> RunResult:
        """The run's result as far as the store keeps it: no event count,
        no finish reason, no error details."""
        return RunResult(
            run_id=self.run_id,
            principal=self.principal,
            session_id=self.session_id,
            agent=self.agent,
            status=self.status,
            cancel_reason=self.cancel_reason,
            text=self.text,
            usage=self.usage,
            error=self.error,
            created_at=self.created_at,
            finished_at=self.finished_at,
        )


class StoreError(ObserverError):
    """The run store could not do what was asked.

    ``code`` and ``message`` are client-safe (fit for ``error_details`` on a
    terminal event or an HTTP error body); the real cause is in the server
    log and on ``__cause__``, never in ``str(error)``."""

    code = "store_error"
    message = "The run store failed."

    def __init__(self, operation: str, *, transient: bool = False) -> None:
        super().__init__(self.message)
        self.operation = operation
        # The store refused for now (disk full, I/O error, locked): the same
        # call may succeed later. Not transient: it never will (no such row,
        # a constraint, the store closed).
        self.transient = transient

    @property
    def error_info(self) -> ErrorInfo:  # reported as error_details by the engine
        return ErrorInfo(code=self.code, message=self.message)


class StoreWriteError(StoreError):
    """A write did not happen: the record is missing or stale.

    Raised for SQLite errors (disk full, I/O, constraint), for a run that has
    no row to update, and for any write once the store is closing."""

    code = "store_write_failed"
    message = "The run could not be recorded."


class StoreReadError(StoreError):
    """A read failed (or the store is closed)."""

    code = "store_read_failed"
    message = "Run records are unavailable."


class StoreOpenError(StoreError):
    """The store could not be opened: bad data directory, a database from a
    newer server, or another server process already using the directory."""

    code = "store_unavailable"
    message = "The run store could not be opened."

    def __init__(self, operation: str, reason: str) -> None:
        super().__init__(operation)
        # Operator-facing (startup error), not for clients.
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.message} {self.reason}"
