"""Rows of the ``runs`` table and :class:`~.records.RunRecord` values, both ways."""

from __future__ import annotations

from typing import Any

from ..core.events import RunStatus, Usage
from .records import RunRecord

COLUMNS = (
    "run_id, principal, session_id, prompt, agent, status, cancel_reason, output_text,"
    " prompt_tokens, completion_tokens, created_at, finished_at, error_code, error_message"
)

# A valid record to evolve when checking finish()'s arguments.
PROBE = RunRecord(
    run_id="probe",
    principal="",
    session_id="",
    prompt="",
    agent="",
    status=RunStatus.RUNNING,
    created_at=0.0,
)


def to_row(record: RunRecord) -> tuple[Any, ...]:
    return (
        record.run_id,
        record.principal,
        record.session_id,
        record.prompt,
        record.agent,
        record.status.value,
        record.cancel_reason,
        record.text,
        None if record.usage is None else record.usage.prompt_tokens,
        None if record.usage is None else record.usage.completion_tokens,
        record.created_at,
        record.finished_at,
        record.error_code,
        record.error_message,
    )


def to_record(row: tuple[Any, ...]) -> RunRecord:
    (
        run_id,
        principal,
        session_id,
        prompt,
        agent,
        status,
        cancel_reason,
        text,
        prompt_tokens,
        completion_tokens,
        created_at,
        finished_at,
        error_code,
        error_message,
    ) = row
    return RunRecord(
        run_id=run_id,
        principal=principal,
        session_id=session_id,
        prompt=prompt,
        agent=agent,
        status=RunStatus(status),
        cancel_reason=cancel_reason,
        text=text,
        usage=None
        if prompt_tokens is None
        else Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens),
        created_at=created_at,
        finished_at=finished_at,
        error_code=error_code,
        error_message=error_message,
    )
