"""``GET /metrics``, parsed with prometheus_client's own parser, moves as runs
end. Engine timing under MockClock; the store and thread counters with real
threads (and real time)."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families
from quart.typing import TestHTTPConnectionProtocol as HTTPConnection
from quart_trio import QuartTrio

from server.agents.blocking import BlockingAgent, ThreadAccounting
from server.core.agent import Agent, AgentRequest
from server.core.events import AgentOutput, TextDelta
from server.core.run import Run
from server.settings import Settings
from server.web.app import create_app
from server.web.auth import principal_of
from server.web.state import app_state
from tests.unit.test_http import AUTH, PATH, open_stream, read_frames

PRINCIPAL = principal_of("devkey")
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@asynccontextmanager
async def serving(agent: Agent | None = None, **settings: Any) -> AsyncIterator[QuartTrio]:
    app = create_app(Settings(**{"data_dir": "", **settings}), agent=agent)
    async with app.test_app():
        yield app


async def scrape(app: QuartTrio) -> Samples:
    response = await app.test_client().get("/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = (await response.get_data()).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def find_run(app: QuartTrio, run_id: str) -> Run:
    manager = app_state(app).manager
    assert manager is not None
    run = manager.runs.lookup(PRINCIPAL, run_id)
    assert isinstance(run, Run)
    return run


def run_id_of(connection: HTTPConnection) -> str:
    assert connection.headers is not None  # the response has started
    return connection.headers["X-Run-Id"]


@attrs.define
class PacedAgent:
    """A token a second, three of them. ``fail`` raises after the first;
    ``slow`` also takes ``cleanup`` seconds to let go when cancelled (shielded,
    bounded), like an upstream connection being closed."""

    cleanup: float = 3.0
    name: str = "paced"

    async def run(
        self, request: AgentRequest, send_channel: trio.MemorySendChannel[AgentOutput]
    ) -> None:
        done = False
        try:
            for index in range(3):
                await trio.sleep(1.0)
                await send_channel.send(TextDelta(f"t{index} "))
                if request.prompt == "fail":
                    raise RuntimeError("boom")
            done = True
        finally:
            if not done and request.prompt == "slow":
                with trio.move_on_after(self.cleanup, shield=True):
                    await trio.sleep(self.cleanup)


async def test_counters_move_as_runs_end(autojump_clock: trio.testing.MockClock) -> None:
    async with serving(PacedAgent(cleanup=3.0), idle_timeout=1.0, coalesce_ms=0) as app:
        baseline = await scrape(app)
        assert value(baseline, "stream_server_runs_ended_total", status="completed") == 0
        session = {"X-Session-Id": "s1"}
        async with open_stream(app, {"prompt": "slow", "stream": True}, session) as first:
            await trio.sleep(1.5)  # its first token is out
            during = await scrape(app)
            assert value(during, "stream_server_runs_active") == 1
            assert value(during, "stream_server_sessions_active") == 1
            async with open_stream(app, {"prompt": "quick", "stream": True}, session) as second:
                first_frames = await read_frames(first)
                second_frames = await read_frames(second)
                first_id, second_id = run_id_of(first), run_id_of(second)
        failed = await app.test_client().post(PATH, headers=AUTH, json={"prompt": "fail"})
        assert failed.status_code == 502

        samples = await scrape(app)
        ended = "stream_server_runs_ended_total"
        assert value(samples, ended, status="completed", reason="none") == 1
        assert value(samples, ended, status="cancelled", reason="superseded") == 1
        assert value(samples, ended, status="failed", reason="agent_error") == 1
        assert value(samples, "stream_server_runs_started_total") == 3
        # The superseding prompt waited exactly for the slow cleanup.
        assert value(samples, "stream_server_supersede_wait_seconds_count") == 1
        assert value(samples, "stream_server_supersede_wait_seconds_sum") == 3.0
        bucket = "stream_server_supersede_wait_seconds_bucket"
        assert value(samples, bucket, le="2.5") == 0 and value(samples, bucket, le="5.0") == 1
        # Every run's first token came a second after it started.
        assert value(samples, "stream_server_time_to_first_token_seconds_count") == 3
        assert value(samples, "stream_server_time_to_first_token_seconds_sum") == 3.0
        # What the two streaming clients received, exactly.
        streamed = [first_frames, second_frames]
        received_bytes = sum(len(data) for frames in streamed for _, data in frames)
        assert value(samples, "stream_server_streamed_bytes_total") == received_bytes
        events = len(find_run(app, first_id).log) + len(find_run(app, second_id).log)
        assert value(samples, "stream_server_streamed_events_total") == events
        assert value(samples, "stream_server_runs_active") == 0

        # Once the session's idle timeout passed, it and its tasks are gone.
        await trio.sleep(2.0)
        await trio.testing.wait_all_tasks_blocked()
        idle = await scrape(app)
        assert value(idle, "stream_server_sessions_active") == 0
        assert value(idle, "stream_server_trio_tasks") == value(
            baseline, "stream_server_trio_tasks"
        )


async def test_coalesced_deltas_are_the_deltas_without_an_event_of_their_own(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with serving(token_delay=0.005, reply_words=40, coalesce_ms=20) as app:
        response = await app.test_client().post(PATH, headers=AUTH, json={"prompt": "hi"})
        run = find_run(app, response.headers["X-Run-Id"])
        delta_events = sum(1 for event in run.log.events if event.type == "run.delta")
        assert 1 < delta_events < 40
        samples = await scrape(app)
        assert value(samples, "stream_server_coalesced_deltas_total") == 40 - delta_events


async def test_a_fresh_app_counts_from_zero(autojump_clock: trio.testing.MockClock) -> None:
    async with serving(token_delay=0.01, reply_words=3) as app:
        await app.test_client().post(PATH, headers=AUTH, json={"prompt": "hi"})
        assert value(await scrape(app), "stream_server_runs_started_total") == 1
    async with serving(token_delay=0.01, reply_words=3) as other:
        assert value(await scrape(other), "stream_server_runs_started_total") == 0


# --- real threads, real time -------------------------------------------------


@asynccontextmanager
async def locked_database(path: Path) -> AsyncIterator[None]:
    """Another connection holds the write lock (as a backup tool might)."""
    connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        connection.execute("BEGIN EXCLUSIVE")
        yield
    finally:
        connection.execute("ROLLBACK")
        connection.close()


async def test_store_write_failures_are_counted(tmp_path: Path) -> None:
    async with serving(token_delay=0.01, reply_words=3, data_dir=str(tmp_path)) as app:
        assert value(await scrape(app), "stream_server_store_write_failures_total") == 0
        with trio.fail_after(20):
            async with locked_database(tmp_path / "runs.sqlite3"):
                response = await app.test_client().post(PATH, headers=AUTH, json={"prompt": "x"})
        assert response.status_code == 200
        samples = await scrape(app)
        # The start was not recorded, nor (retried at the end) the whole run.
        assert value(samples, "stream_server_store_write_failures_total") >= 2
        ended = {"status": "completed", "reason": "none"}
        assert value(samples, "stream_server_runs_ended_total", **ended) == 1


def stuck_generator(release: threading.Event) -> Iterator[str]:
    yield "before "
    release.wait()  # a synchronous SDK call that does not return
    yield "late "


async def test_abandoned_threads_are_counted() -> None:
    release = threading.Event()
    agent = BlockingAgent(
        generate=lambda request: stuck_generator(release),
        grace=0.2,
        accounting=ThreadAccounting(),
    )
    try:
        async with serving(agent, coalesce_ms=0) as app:
            before = value(await scrape(app), "stream_server_abandoned_threads_total")
            client = app.test_client()
            with trio.fail_after(10):
                async with open_stream(app, {"prompt": "x", "stream": True}) as stream:
                    received = b""
                    while b"before" not in received:  # the thread is in its stuck call
                        received += await stream.receive()
                    run_id = run_id_of(stream)
                    stop = await client.post(f"/v1/runs/{run_id}/cancel", headers=AUTH)
                    assert stop.status_code == 200
                    await read_frames(stream)
            samples = await scrape(app)
            assert value(samples, "stream_server_abandoned_threads_total") == before + 1
            reason = {"status": "cancelled", "reason": "client_stop"}
            assert value(samples, "stream_server_runs_ended_total", **reason) == 1
    finally:
        release.set()
