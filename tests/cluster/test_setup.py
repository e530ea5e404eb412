"""--redis-url and --lease-ttl, and a node's start-up when Redis is away."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from server.cli import parse_settings
from server.cluster import setup
from server.cluster.memory import MemoryBackend
from server.cluster.redis_clients import check_url
from server.cluster.urls import redacted
from server.settings import Settings
from server.startup import app_error


def test_redis_url_and_lease_ttl_from_flags_and_environment() -> None:
    assert parse_settings([], {}).redis_url is None
    assert parse_settings([], {}).lease_ttl == 10.0
    settings = parse_settings(
        ["--lease-ttl", "6", "--cleanup-budget", "1"],
        {"STREAM_SERVER_REDIS_URL": "redis://127.0.0.1:6390/0"},
    )
    assert (settings.redis_url, settings.lease_ttl) == ("redis://127.0.0.1:6390/0", 6.0)


def test_a_lease_ttl_shorter_than_cleanup_and_two_calls_exits_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_settings(["--lease-ttl", "9", "--redis-url", "redis://127.0.0.1:6390/0"], {})
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
    assert "--lease-ttl must exceed --cleanup-budget + 2 x --redis-timeout (9 s here)" in line


def test_a_shorter_redis_timeout_allows_a_shorter_lease_and_bounds_every_call() -> None:
    argv = ["--lease-ttl", "7.5", "--redis-timeout", "1", "--redis-url", "redis://127.0.0.1:1/0"]
    settings = parse_settings(argv, {})
    assert (settings.lease_ttl, settings.redis_timeout) == (7.5, 1.0)
    assert setup.cluster_config(settings).call_timeout == 1.0


def test_lease_ttl_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_settings(["--lease-ttl", "0"], {})
    assert exit_info.value.code == 2


async def test_unreachable_redis_at_start_is_one_line(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = MemoryBackend(available=False)
    monkeypatch.setattr(setup, "redis_backend", lambda settings: backend)
    settings = Settings(redis_url="redis://127.0.0.1:1/0")
    async with trio.open_nursery() as nursery:
        with pytest.raises(setup.ClusterUnreachable) as raised:
            await setup.open_cluster(settings, nursery)
    error = app_error(raised.value)
    assert error is not None
    assert str(error) == "cluster: cannot reach Redis at redis://127.0.0.1:1/0; check --redis-url"


async def test_a_node_opens_with_a_reachable_backend(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = MemoryBackend()
    monkeypatch.setattr(setup, "redis_backend", lambda settings: backend)
    async with trio.open_nursery() as nursery:
        coordinator, hosted = await setup.open_cluster(
            Settings(redis_url="redis://x/0", lease_ttl=6, cleanup_budget=1), nursery
        )
        assert coordinator.config.lease_ttl == 6
        hosted.stop()


def test_the_redis_password_never_appears_in_messages() -> None:
    assert redacted("redis://user:s3cret@host:6390/0") == "redis://user:***@host:6390/0"
    assert redacted("redis://:s3cret@host/0") == "redis://:***@host/0"
    assert redacted("redis://host:6390/0") == "redis://host:6390/0"
    assert redacted("redis://user@host/0") == "redis://user@host/0"
    with pytest.raises(ValueError) as raised:
        check_url("http://user:s3cret@host/0")
    assert "s3cret" not in str(raised.value)


async def test_unreachable_redis_with_a_password_is_redacted(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = MemoryBackend(available=False)
    monkeypatch.setattr(setup, "redis_backend", lambda settings: backend)
    settings = Settings(redis_url="redis://:s3cret@127.0.0.1:1/0")
    async with trio.open_nursery() as nursery:
        with pytest.raises(setup.ClusterUnreachable) as raised:
            await setup.open_cluster(settings, nursery)
    assert "s3cret" not in str(raised.value)
    assert "redis://:***@127.0.0.1:1/0" in str(raised.value)
