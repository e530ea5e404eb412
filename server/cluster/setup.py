"""Making this process a node of a cluster (``--redis-url``).

The Redis backend is imported by name, lazily: without ``--redis-url``
nothing of it (nor its client library, the ``cluster`` extra) is loaded.
Its connection tasks belong to the task that enters it, so
:func:`host_backend` enters it in a task of the app's nursery and leaves it
when told to, after the session manager has stopped.
"""

from __future__ import annotations

import importlib
from typing import Any

import attrs
import trio

from ..core.lifecycle_log import set_process_node
from ..settings import Settings
from .backend import BackendUnavailable, ClusterBackend, SessionRef
from .coordinator import ClusterCoordinator
from .held import ClusterConfig, new_node_id
from .urls import redacted

REDIS_BACKEND = "server.cluster.redis_backend"


class ClusterUnreachable(Exception):
    """Redis could not be reached (or its backend loaded) at start-up."""


def redis_backend(settings: Settings) -> Any:
    try:
        module = importlib.import_module(REDIS_BACKEND)
    except ImportError as exc:
        raise ClusterUnreachable(
            f"the Redis backend cannot be loaded ({exc.name or exc}); "
            "install the 'cluster' extra (pip install 'trio-stream-server[cluster]')"
        ) from exc
    return module.RedisBackend.from_url(
        settings.redis_url or "", retain_seconds=settings.retain_seconds
    )


@attrs.define(eq=False)
class HostedBackend:
    backend: ClusterBackend
    _done: trio.Event = attrs.field(factory=trio.Event, init=False)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        enter = getattr(self.backend, "__aenter__", None)
        if enter is None:
            task_status.started()
            await self._done.wait()
            return
        async with self.backend:  # type: ignore[attr-defined]
            task_status.started()
            await self._done.wait()

    def stop(self) -> None:
        self._done.set()


async def check_reachable(backend: ClusterBackend, url: str, within: float) -> None:
    try:
        with trio.fail_after(within):
            await backend.holder(SessionRef(principal="", session_id="startup-check"))
    except (BackendUnavailable, trio.TooSlowError, OSError) as exc:
        raise ClusterUnreachable(
            f"cannot reach Redis at {redacted(url)}; check --redis-url"
        ) from exc


async def open_cluster(
    settings: Settings, nursery: trio.Nursery
) -> tuple[ClusterCoordinator, HostedBackend]:
    """The coordinator of this node, its backend entered in ``nursery`` and
    checked reachable; raises :class:`ClusterUnreachable`."""
    hosted = HostedBackend(redis_backend(settings))
    await nursery.start(hosted.serve)
    try:
        await check_reachable(hosted.backend, settings.redis_url or "", settings.connect_timeout)
    except BaseException:
        hosted.stop()
        raise
    node = new_node_id()
    set_process_node(node)
    coordinator = ClusterCoordinator(
        backend=hosted.backend, config=cluster_config(settings), node=node
    )
    return coordinator, hosted


def cluster_config(settings: Settings) -> ClusterConfig:
    return ClusterConfig(
        lease_ttl=settings.lease_ttl,
        cleanup_budget=settings.cleanup_budget,
        call_timeout=settings.redis_timeout,
        max_run_events=settings.max_run_events,
        retain_seconds=settings.retain_seconds,
    )
