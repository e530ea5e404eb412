"""Redis trouble under real nodes: never a hang. Redis restarted mid-run
(empty: the run's lease is gone), Redis gone (503 coordinator_unavailable
with Retry-After, /readyz not ready, runs in progress end with a recorded
status), recovery when it is back; Redis unreachable at start (exit 2, one
line)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from tests.faults.support import assert_nothing_running
from tests.integration.harness import ServerProcess, loopback_client
from tests.integration.test_startup_errors import assert_one_line_error, start_server

from .real import (
    SHORT,
    Streamed,
    archive,
    metric,
    prompt_text,
    running_node,
    start_long_run,
    stream_prompt,
)
from .redis_process import RedisProcess, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RECOVERY_TIMEOUT = 20.0


async def readyz(node: ServerProcess) -> tuple[int, dict[str, str], str]:
    async with loopback_client(node.url) as client:
        response = await client.get("/readyz")
    return response.status_code, dict(response.headers), response.text


async def prompt_until_served(node: ServerProcess, session: str) -> Streamed:
    """Recovery: the node answers a prompt again by itself (503 until then)."""
    with trio.fail_after(RECOVERY_TIMEOUT):
        while True:
            async with loopback_client(node.url) as client:
                result = await stream_prompt(client, session, prompt_text(session, "R", SHORT))
            if result.status != 503:
                return result
            await trio.sleep(0.1)


async def test_redis_restarted_mid_run(
    redis_server: RedisProcess, upstream: ServerProcess, tmp_path: Path
) -> None:
    with (
        running_node(redis_server.url, upstream, data_dir=tmp_path / "one") as one,
        running_node(redis_server.url, upstream) as two,
    ):
        async with trio.open_nursery() as nursery:
            a = await start_long_run(one, "restart-1", nursery)
            redis_server.restart()  # empty: A's lease is gone
        # A ended (no hang), with one terminal event: its node's next write
        # under the lease Redis no longer has was refused (fencing).
        assert a.status == 200 and a.types[-1] == "run.interrupted", a.events[-3:]
        assert a.terminal["reason"] == "owner_lost", a.terminal
        line = await one.wait_for_line(r" lease_lost .*session=restart-1")
        assert " cause=publish refused" in line or " cause=renewal refused" in line, line
        assert await metric(one, "stream_server_cluster_fenced_writes_refused_total") >= 1
        b = await prompt_until_served(two, "restart-1")
        assert b.status == 200 and b.types[-1] == "run.completed", (b.body, b.events)
    stored = archive(one)
    assert_nothing_running(stored)
    assert stored[a.run_id or ""]["cancel_reason"] == "owner_lost"


async def test_redis_gone_then_back(
    redis_server: RedisProcess, upstream: ServerProcess, tmp_path: Path
) -> None:
    with (
        running_node(redis_server.url, upstream, data_dir=tmp_path / "one") as one,
        running_node(redis_server.url, upstream) as two,
    ):
        async with trio.open_nursery() as nursery:
            a = await start_long_run(one, "gone-1", nursery)
            redis_server.stop()
            # A new prompt: 503 coordinator_unavailable with Retry-After, no hang.
            async with loopback_client(two.url) as client:
                b = await stream_prompt(client, "gone-2", prompt_text("gone-2", "B", SHORT))
            assert b.status == 503 and b.body is not None, (b.status, b.body)
            assert b.body["error"]["code"] == "coordinator_unavailable", b.body
            assert "retry-after" in b.headers, b.headers
            for node in (one, two):
                status, headers, text = await readyz(node)
                assert status == 503 and "coordinator_unavailable" in text, text
                assert "retry-after" in headers, headers
        # The run in progress ended (owner_lost once no renewal worked for a
        # ttl, well before its 200 tokens were out).
        assert a.status == 200 and a.types[-1] == "run.interrupted", a.events[-3:]
        assert a.terminal["reason"] == "owner_lost", a.terminal
        redis_server.start()
        for node, session in ((one, "gone-1"), (two, "gone-3")):
            result = await prompt_until_served(node, session)
            assert result.status == 200 and result.types[-1] == "run.completed", result
        status, _, text = await readyz(two)
        assert status == 200, text
    stored = archive(one)
    assert_nothing_running(stored)
    assert (stored[a.run_id or ""]["status"], stored[a.run_id or ""]["cancel_reason"]) == (
        "interrupted",
        "owner_lost",
    )


async def test_redis_hanging_is_never_a_hang(
    redis_server: RedisProcess, upstream: ServerProcess
) -> None:
    # SIGSTOP: the kernel accepts connections, nothing answers. Every call is
    # bounded, so a prompt gets its 503 and /readyz says not ready.
    with running_node(redis_server.url, upstream) as one:
        redis_server.pause()
        try:
            async with loopback_client(one.url) as client:
                b = await stream_prompt(client, "hang-1", prompt_text("hang-1", "B", SHORT))
            assert b.status == 503 and b.body is not None, (b.status, b.body)
            assert b.body["error"]["code"] == "coordinator_unavailable", b.body
            assert "retry-after" in b.headers, b.headers
            status, _, text = await readyz(one)
            assert status == 503 and "coordinator_unavailable" in text, text
        finally:
            redis_server.resume()
        result = await prompt_until_served(one, "hang-2")
        assert result.status == 200 and result.types[-1] == "run.completed", result


def test_redis_unreachable_at_start_exits_2_with_one_line(tmp_path: Path) -> None:
    # Regression: coredis' retry lines (INFO) came before the error line.
    url = f"redis://127.0.0.1:{free_port()}/0"
    result = start_server("--port", "0", "--redis-url", url, "--data-dir", str(tmp_path))
    assert_one_line_error(result, f"cluster: cannot reach Redis at {url}; check --redis-url")
    assert "coredis" not in result.stderr
