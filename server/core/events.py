"""Events a run publishes, and the values agents send into a run.

Two vocabularies meet here:

* what an agent sends on its channel (:class:`TextDelta`, :class:`FullMessage`,
  :class:`UsageReport`): no numbering, no identity, just output;
* what a run publishes to its log (:class:`RunStarted` … :class:`RunFailed`):
  every event carries ``run_id``, ``session_id`` and a gap-free ``seq``.

Exactly one of the terminal types ends every run's log.
"""

from __future__ import annotations

import enum
import typing
from typing import ClassVar, TypedDict

import attrs


class CancelReason(enum.StrEnum):
    """Why a run was stopped before its agent finished."""

    SUPERSEDED = "superseded"
    CLIENT_STOP = "client_stop"
    CLIENT_DISCONNECT = "client_disconnect"
    SHUTDOWN = "shutdown"
    DEADLINE = "deadline"
    # Cluster mode: the node lost the session's lease (paused, cut off from
    # the shared state, or its lease expired) and stops its runs there.
    OWNER_LOST = "owner_lost"

    @property
    def ended_by_server(self) -> bool:
        """Shutdown, deadline and owner_lost are the server's doing: the run
        is *interrupted*. The others answer something a client did: *cancelled*."""
        return self in (CancelReason.SHUTDOWN, CancelReason.DEADLINE, CancelReason.OWNER_LOST)


class RunStatus(enum.StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"
    FAILED = "failed"


@attrs.frozen(kw_only=True)
class Usage:
    prompt_tokens: int = attrs.field(
        validator=[attrs.validators.instance_of(int), attrs.validators.ge(0)]
    )
    completion_tokens: int = attrs.field(
        validator=[attrs.validators.instance_of(int), attrs.validators.ge(0)]
    )

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@attrs.frozen(kw_only=True)
class ErrorInfo:
    """A client-safe error: a stable ``code`` and a message written for people.

    Raw exception text never goes here."""

    code: str = attrs.field(validator=attrs.validators.min_len(1))
    message: str


# --- what agents send -------------------------------------------------------


_text = attrs.field(validator=attrs.validators.instance_of(str))


@attrs.frozen
class TextDelta:
    # Validated: agent output is untrusted input to the engine.
    text: str = _text


@attrs.frozen
class FullMessage:
    """The agent's complete answer. Optional: without it the run assembles
    the message from the deltas it saw."""

    text: str = _text


@attrs.frozen(kw_only=True)
class UsageReport:
    usage: Usage = attrs.field(validator=attrs.validators.instance_of(Usage))


@attrs.frozen
class StopReason:
    """Why the model stopped (``stop``, ``length``, ``content_filter``...):
    reported on ``run.completed`` and as the OpenAI ``finish_reason``."""

    reason: str = _text


AgentOutput = TextDelta | FullMessage | UsageReport | StopReason


# --- what runs publish ------------------------------------------------------


class Envelope(TypedDict):
    """What every event of a run carries: whose it is and where in its log."""

    run_id: str
    session_id: str
    seq: int


@attrs.frozen(kw_only=True)
class _RunEvent:
    type: ClassVar[str]
    terminal: ClassVar[bool] = False

    run_id: str
    session_id: str
    seq: int = attrs.field(validator=attrs.validators.ge(0))


@attrs.frozen(kw_only=True)
class RunStarted(_RunEvent):
    type: ClassVar[str] = "run.started"


@attrs.frozen(kw_only=True)
class RunDelta(_RunEvent):
    type: ClassVar[str] = "run.delta"
    text: str


@attrs.frozen(kw_only=True)
class RunMessage(_RunEvent):
    type: ClassVar[str] = "run.message"
    text: str


@attrs.frozen(kw_only=True)
class _TerminalEvent(_RunEvent):
    terminal: ClassVar[bool] = True
    # Something that went wrong around the run (e.g. recording it), for clients.
    error_details: ErrorInfo | None = None


@attrs.frozen(kw_only=True)
class RunCompleted(_TerminalEvent):
    type: ClassVar[str] = "run.completed"
    usage: Usage | None = None
    finish_reason: str = "stop"


@attrs.frozen(kw_only=True)
class RunCancelled(_TerminalEvent):
    type: ClassVar[str] = "run.cancelled"
    reason: CancelReason


@attrs.frozen(kw_only=True)
class RunInterrupted(_TerminalEvent):
    type: ClassVar[str] = "run.interrupted"
    reason: CancelReason


@attrs.frozen(kw_only=True)
class RunFailed(_TerminalEvent):
    type: ClassVar[str] = "run.failed"
    error: ErrorInfo


RunEvent = (
    RunStarted | RunDelta | RunMessage | RunCompleted | RunCancelled | RunInterrupted | RunFailed
)
TerminalEvent = RunCompleted | RunCancelled | RunInterrupted | RunFailed
# The terminal events' types, for events carried as dicts (the cluster's).
TERMINAL_TYPES: frozenset[str] = frozenset(
    event.type for event in typing.get_args(RunEvent) if event.terminal
)


def status_of(event: TerminalEvent) -> RunStatus:
    match event:
        case RunCompleted():
            return RunStatus.COMPLETED
        case RunCancelled():
            return RunStatus.CANCELLED
        case RunInterrupted():
            return RunStatus.INTERRUPTED
        case RunFailed():
            return RunStatus.FAILED
