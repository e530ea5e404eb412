"""What the fake saw: one record per chat request, and per-session concurrency.

A request is *open* from the moment its body has been read until it ends:
just before the fake hands over the last bytes of its reply (or breaks the
connection), or when the client leaves, or when the fake shuts down.
Outcomes:

- ``finished``: the fake sent the whole scripted response, terminal line
  included (a scripted ``@status``, ``@error_after`` or ``@malformed_after``
  reply also finishes);
- ``disconnected``: the client went away first (ASGI ``http.disconnect``);
- ``closed``: ``@close_after`` broke the connection on purpose;
- ``shutdown``: the fake was shut down under it;
- ``crashed``: the fake itself raised (a bug; hypercorn logs the traceback).

Waiting: every change sets an event and replaces it, and the ``wait_*``
methods re-check their condition after each change, so they sleep until the
change they need (no polling). They take no timeout; bound them with the
caller's ``trio.fail_after``. They only work inside the trio run that serves
the fake.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, TypeVar

import attrs
import trio

from ._wire import Api

Outcome = Literal["finished", "disconnected", "closed", "shutdown", "crashed"]
T = TypeVar("T")


@attrs.define(kw_only=True)
class RequestRecord:
    """One chat request, updated while it runs. Times are ``trio.current_time()``."""

    id: int
    api: Api
    path: str
    model: str
    stream: bool
    session: str | None
    prompt: str
    started_at: float
    status: int | None = None  # HTTP status, once the headers are sent
    tokens_sent: int = 0
    outcome: Outcome | None = None
    ended_at: float | None = None

    @property
    def ended(self) -> bool:
        return self.outcome is not None

    @property
    def finished(self) -> bool:
        return self.outcome == "finished"

    @property
    def disconnected(self) -> bool:
        return self.outcome == "disconnected"

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.define(kw_only=True)
class SessionStats:
    """``overlaps`` counts the requests that opened while another request of
    the same session was still open: the instants two streams overlapped."""

    active: int = 0
    max_concurrency: int = 0
    overlaps: int = 0
    requests: int = 0
    disconnected: int = 0


@attrs.define
class Registry:
    requests: list[RequestRecord] = attrs.field(factory=list)
    active: int = 0
    max_active: int = 0
    sessions: dict[str, SessionStats] = attrs.field(factory=dict)
    _next_id: int = attrs.field(default=1, init=False)
    _changed: trio.Event = attrs.field(factory=trio.Event, init=False)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # --- updates (from the app) ------------------------------------------

    def open(
        self, *, api: Api, path: str, model: str, stream: bool, session: str | None, prompt: str
    ) -> RequestRecord:
        record = RequestRecord(
            id=self._next_id,
            api=api,
            path=path,
            model=model,
            stream=stream,
            session=session,
            prompt=prompt,
            started_at=trio.current_time(),
        )
        self._next_id += 1
        self.requests.append(record)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        if session is not None:
            stats = self.sessions.setdefault(session, SessionStats())
            if stats.active:
                stats.overlaps += 1
            stats.active += 1
            stats.requests += 1
            stats.max_concurrency = max(stats.max_concurrency, stats.active)
        self._notify()
        return record

    def headers_sent(self, record: RequestRecord, status: int) -> None:
        record.status = status
        self._notify()

    def token_sent(self, record: RequestRecord, count: int = 1) -> None:
        record.tokens_sent += count
        self._notify()

    def end(self, record: RequestRecord, outcome: Outcome) -> None:
        if record.ended:
            raise RuntimeError(f"request {record.id} ended twice: {record.outcome}, {outcome}")
        record.outcome = outcome
        record.ended_at = trio.current_time()
        self.active -= 1
        if record.session is not None:
            stats = self.sessions[record.session]
            stats.active -= 1
            stats.disconnected += record.disconnected
        self._notify()

    def reset(self) -> None:
        """Forget ended requests and lower the high-water marks to the present."""
        self.requests = [record for record in self.requests if not record.ended]
        self.max_active = self.active
        self.sessions = {
            name: SessionStats(active=stats.active, max_concurrency=stats.active)
            for name, stats in self.sessions.items()
            if stats.active
        }
        self._notify()

    def summary(self) -> dict[str, Any]:
        """The registry as JSON, for ``GET /_fake/stats``."""
        return {
            "active": self.active,
            "max_active": self.max_active,
            "total": len(self.requests),
            "finished": sum(record.finished for record in self.requests),
            "disconnected": sum(record.disconnected for record in self.requests),
            "sessions": {name: attrs.asdict(stats) for name, stats in self.sessions.items()},
            "requests": [record.to_json() for record in self.requests],
        }

    # --- waiting (from tests) --------------------------------------------

    async def wait_until(self, condition: Callable[[], T | None]) -> T:
        """The first truthy value of ``condition()``, re-checked after every change."""
        while not (value := condition()):
            await self._changed.wait()
        return value

    async def wait_for_request(
        self, predicate: Callable[[RequestRecord], bool] = lambda record: True
    ) -> RequestRecord:
        """The earliest request matching ``predicate`` (re-tested as requests
        progress, so it can wait for e.g. ``record.tokens_sent >= 3``)."""
        return await self.wait_until(
            lambda: next((record for record in self.requests if predicate(record)), None)
        )

    async def wait_ended(self, record: RequestRecord) -> RequestRecord:
        await self.wait_until(lambda: record.ended)
        return record

    async def wait_disconnected(self, record: RequestRecord) -> None:
        """Until ``record`` sees its client go away; fails at once if it ends otherwise."""
        await self.wait_ended(record)
        if not record.disconnected:
            raise AssertionError(f"request {record.id} ended {record.outcome}, not disconnected")

    async def wait_idle(self) -> None:
        """Until no request is open."""
        await self.wait_until(lambda: self.active == 0)
