"""What the routes share: settings, the agent, keys and the running engine."""

from __future__ import annotations

import attrs
import trio
from quart_trio import QuartTrio

from ..core.agent import Agent
from ..core.manager import SessionManager
from ..settings import Settings
from ..store import Retention, SqliteRunStore
from .auth import KeyRing
from .errors import ApiError
from .metrics import Metrics
from .requests import parse_limiter


@attrs.define(eq=False)
class AppState:
    settings: Settings
    agent: Agent
    keyring: KeyRing
    manager: SessionManager | None = None
    store: SqliteRunStore | None = None
    retention: Retention | None = None
    metrics: Metrics = attrs.field(factory=Metrics)
    # Bounds the worker threads that parse large request bodies.
    parse_limiter: trio.CapacityLimiter = attrs.field(factory=parse_limiter)

    def running_manager(self) -> SessionManager:
        if self.manager is None:
            raise ApiError(503, "starting", "The server is starting.", headers={"Retry-After": "1"})
        return self.manager


def app_state(app: QuartTrio) -> AppState:
    state: AppState = app.extensions["stream_server"]
    return state
