"""The engine's limits: what a refused admission raises.

Every limit is checked and taken in one synchronous step at admission (no
checkpoint between "is there room?" and "take it"), so concurrent requests
cannot both squeeze through the last slot, and a refusal leaves nothing
behind: no session, no run, no registry entry.

Each refusal carries a client-safe ``code`` and ``message`` and how many
seconds a client should wait before retrying (``retry_after``); the HTTP
edge answers them as 429 with ``Retry-After``.
"""

from __future__ import annotations

from typing import ClassVar


class LimitExceeded(Exception):
    """A configured limit refused the request."""

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
