"""Every exception the engine raises, each with its one-line meaning.

Refusals (:class:`Draining` … :class:`TooManySubscribers`) answer a
submission or a subscription and are client-facing: the HTTP edge
(``server/web/errors.py``) maps each to a status and a JSON body, in one
place. :class:`AgentError` and :class:`ObserverError` carry client-safe
codes and messages for a run's terminal event. :class:`LifecycleError` is
never client input: it is a bug in the engine.

The modules that raised these before they lived here re-export them
(``from .errors import X as X``), so older imports keep working.
"""

from __future__ import annotations

from typing import ClassVar

from .events import ErrorInfo

# --- refusals: a submission that was not admitted -----------------------------


class Draining(Exception):
    """The server is shutting down and admits no new runs."""


class RunInProgress(Exception):
    """``on_conflict=reject``: the session has a live (or starting) run."""


class QueueFull(Exception):
    """``on_conflict=enqueue``: the session's line of waiting prompts is full."""


class SessionClosed(Exception):
    """The session went away (it failed to start) while a submission waited
    for it; the submission may be retried."""


class SessionMoved(SessionClosed):
    """Cluster mode: the session's ownership moved to another node (handed
    over, or its lease lost) while a submission waited: it asks again."""


class CoordinatorUnavailable(Exception):
    """Cluster mode: the shared state (Redis) could not be reached in time,
    so the session's ownership could not be settled; nothing was started.
    The HTTP edge answers 503 ``coordinator_unavailable`` with Retry-After."""

    retry_after = 2


class LimitExceeded(Exception):
    """A configured limit refused the request; nothing was created.

    Carries a client-safe ``code`` and ``message`` and how many seconds a
    client should wait before retrying (``retry_after``)."""

    code: ClassVar[str]
    retry_after: ClassVar[int]

    def __init__(self, message: str) -> None:
        super().__init__(f"{self.code}: {message}")
        self.message = message


class TooManySessions(LimitExceeded):
    """``max_sessions`` / ``max_sessions_per_principal``: a new session would
    exceed them. Idle sessions go away after the idle timeout."""

    code = "too_many_sessions"
    retry_after = 10


class TooManyRuns(LimitExceeded):
    """``max_runs`` / ``max_runs_per_principal``: a session that is not busy
    would start one more concurrent run."""

    code = "too_many_runs"
    retry_after = 1


class TooManySubscribers(LimitExceeded):
    """``max_subscribers``: the run already has that many readers."""

    code = "too_many_subscribers"
    retry_after = 1


# --- failures around a run: reported on its terminal event --------------------


class AgentError(Exception):
    """An agent failure with a client-safe ``code`` and ``message``.

    Raise this (or a subclass) to say what clients should see; any other
    exception becomes the generic ``agent_error``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ObserverError(Exception):
    """An observer (the run store) failed; ``error_info`` is client-safe and
    goes on the run's terminal event as ``error_details``."""

    @property
    def error_info(self) -> ErrorInfo:
        return ErrorInfo(code="observer_failed", message="The run could not be recorded.")


# --- bugs -----------------------------------------------------------------------


class LifecycleError(RuntimeError):
    """An illegal lifecycle transition or event order: a bug in the engine,
    never client input."""
