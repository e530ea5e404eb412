"""Client-chosen run ids never reach Redis' key names, and an error reply
from Redis (a bug, not an outage) is a 500 that leaves the node ready:
against a real redis-server."""

from __future__ import annotations

import pytest

from server.cluster.backend import BackendError, Lease, SessionRef
from server.cluster.coordinator import ClusterCoordinator
from server.cluster.redis_backend import RedisBackend
from server.settings import Settings
from server.web.app import create_app
from tests.unit.test_http import AUTH

from .redis_process import RedisProcess

S = SessionRef(principal="key-a", session_id="s")
RUN = "run_" + "ab" * 16


async def publish_a_run(backend: RedisBackend) -> None:
    lease = await backend.acquire(S, "n1", 10.0)
    assert isinstance(lease, Lease)
    started = {"type": "run.started", "run_id": RUN, "session_id": "s", "seq": 0}
    record = {
        "run_id": RUN,
        "principal": "key-a",
        "session_id": "s",
        "status": "running",
        "created_at": 1.0,
    }
    await backend.publish(lease, RUN, [started], record=record, max_events=100, retain_seconds=60)


async def test_an_error_reply_is_a_bug_not_an_outage(redis_server: RedisProcess) -> None:
    async with RedisBackend.from_url(redis_server.url) as backend:
        await publish_a_run(backend)
        coordinator = ClusterCoordinator(backend=backend, node="n2")
        # The run's stream key read as a record: WRONGTYPE.
        with pytest.raises(BackendError):
            await coordinator.run_record("key-b", RUN + ":events")
        assert coordinator.metrics.reachable
        assert coordinator.metrics.backend_errors == 0


async def test_a_run_id_naming_another_key_is_404_and_the_node_stays_ready(
    redis_server: RedisProcess,
) -> None:
    app = create_app(Settings(data_dir="", redis_url=redis_server.url))
    async with app.test_app():
        async with RedisBackend.from_url(redis_server.url) as backend:
            await publish_a_run(backend)
        client = app.test_client()
        for path in (f"/v1/runs/{RUN}:events", f"/v1/runs/{RUN}:events/events"):
            response = await client.get(path, headers=AUTH)
            assert response.status_code == 404
            assert (await response.get_json())["error"]["code"] == "run_not_found"
        response = await client.post(f"/v1/runs/{RUN}:events/cancel", headers=AUTH)
        assert response.status_code == 404
        assert (await client.get("/readyz")).status_code == 200
