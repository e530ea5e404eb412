"""Fixtures for the cluster tests: a real ``redis-server`` of their own.

Each test gets a fresh ``redis-server`` (Debian's package) on a free
loopback port, persistence off, in a temporary directory, stopped and waited
for at teardown; :class:`~tests.cluster.redis_process.RedisProcess` can
``stop``, ``restart`` (same port, empty) and ``pause``/``resume`` it. A
missing binary skips these tests with the reason, unless
``STREAM_SERVER_REQUIRE_REDIS=1`` (set by ``.ci/run``) makes it a failure.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator

import pytest

from server.core.lifecycle_log import set_process_node
from tests.integration.harness import FakeUpstreamProcess, ServerProcess, running_server

from .redis_process import RedisProcess, redis_server_path, running_redis

REQUIRE_REDIS = os.environ.get("STREAM_SERVER_REQUIRE_REDIS") == "1"


def redis_unavailable(reason: str) -> None:
    if REQUIRE_REDIS:
        pytest.fail(f"{reason} (STREAM_SERVER_REQUIRE_REDIS=1 requires the cluster tests)")
    pytest.skip(f"{reason}; install Debian's redis-server (apt-get install redis-server)")


@pytest.fixture(scope="session")
def redis_executable() -> str:
    path = redis_server_path()
    if path is None:
        redis_unavailable("no redis-server executable on this machine")
    assert path is not None
    return path


@pytest.fixture
def redis_server(redis_executable: str) -> Iterator[RedisProcess]:
    """A fresh, empty redis-server for this test."""
    with running_redis(redis_executable) as redis:
        yield redis


@pytest.fixture(scope="module")
def shared_redis(redis_executable: str) -> Iterator[RedisProcess]:
    """One redis-server for a module's tests (each uses its own sessions)."""
    with running_redis(redis_executable) as redis:
        yield redis


@pytest.fixture(scope="module")
def upstream() -> Iterator[ServerProcess]:
    """The fake LLM upstream as a process, for a module's real nodes."""
    with running_server("--delay", "0.01", kind=FakeUpstreamProcess) as upstream:
        yield upstream


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        redis = getattr(item, "funcargs", {}).get("redis_server")
        if isinstance(redis, RedisProcess):
            report.sections.append((f"redis-server log :{redis.port}", redis.log_text()))
    return report


@pytest.fixture(autouse=True)
def no_process_node() -> Iterator[None]:
    """A node id set for the process by a test is reset after it."""
    yield
    set_process_node(None)
