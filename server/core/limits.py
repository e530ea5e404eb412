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

# The refusals live with the engine's other exceptions.
from .errors import LimitExceeded as LimitExceeded
from .errors import TooManyRuns as TooManyRuns
from .errors import TooManySessions as TooManySessions
from .errors import TooManySubscribers as TooManySubscribers
