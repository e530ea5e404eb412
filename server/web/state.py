"""What the routes share: settings, the agent, keys and the running engine."""

from __future__ import annotations

import attrs
import trio
from quart_trio import QuartTrio

from ..agents.blocking import ThreadAccounting, abandoned_threads
from ..cluster.coordinator import ClusterCoordinator
from ..cluster.setup import HostedBackend
from ..core.agent import Agent
from ..core.manager import SessionManager
from ..settings import Settings
from ..store import Retention, SqliteRunStore
from .auth import KeyRing
from .errors import ApiError
from .metrics import EngineGauges, Metrics
from .requests import parse_limiter


@attrs.define(eq=False)
class AppState:
    settings: Settings
    agent: Agent
    keyring: KeyRing
    manager: SessionManager | None = None
    store: SqliteRunStore | None = None
    retention: Retention | None = None
    # Cluster mode (--redis-url): this node's coordinator and its backend's host.
    cluster: ClusterCoordinator | None = None
    cluster_backend: HostedBackend | None = None
    metrics: Metrics = attrs.field(factory=Metrics)
    # Bounds the worker threads that parse large request bodies.
    parse_limiter: trio.CapacityLimiter = attrs.field(factory=parse_limiter)

    def running_manager(self) -> SessionManager:
        if self.manager is None:
            raise ApiError(503, "starting", "The server is starting.", headers={"Retry-After": "1"})
        return self.manager

    def engine_gauges(self) -> EngineGauges:
        """For ``GET /metrics`` (a :class:`~server.web.metrics.MetricsSource`)."""
        manager = self.manager
        return EngineGauges(
            sessions=0 if manager is None else len(manager.sessions),
            runs=0 if manager is None else len(manager.live_runs.runs),
            draining=manager is not None and manager.draining,
            store_write_failures=0 if self.store is None else self.store.write_failures,
            abandoned_threads=self._abandoned_threads(),
        )

    def _abandoned_threads(self) -> int:
        # The adapter's default accounting is process-wide; an agent may
        # bring its own.
        own = getattr(self.agent, "accounting", None)
        extra = (
            own.abandoned
            if isinstance(own, ThreadAccounting) and own is not abandoned_threads
            else 0
        )
        return abandoned_threads.abandoned + extra


def app_state(app: QuartTrio) -> AppState:
    state: AppState = app.extensions["stream_server"]
    return state
