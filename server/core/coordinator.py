"""Where cross-process coordination will plug in.

A session may only be owned by one process at a time. Within one process
the session table already guarantees that, so the in-process coordinator
just keeps the books and refuses a double acquire (a bug). A Redis
coordinator (a lease with a fencing token per session, cancel intents the
owner acknowledges) will implement the same two calls.
"""

from __future__ import annotations

from typing import Protocol

import attrs

from .session import SessionKey


class Coordinator(Protocol):
    async def acquire(self, key: SessionKey) -> None:
        """Become the owner of ``key``'s session; wait while another owns it."""

    def release(self, key: SessionKey) -> None:
        """Give up ownership (the session was dropped)."""


@attrs.define
class InProcessCoordinator:
    owned: set[SessionKey] = attrs.field(factory=set)

    async def acquire(self, key: SessionKey) -> None:
        if key in self.owned:
            raise RuntimeError(f"session {key} acquired twice in one process")
        self.owned.add(key)

    def release(self, key: SessionKey) -> None:
        self.owned.discard(key)
