"""The upstream model server breaks the connection mid-reply, for both
upstream dialects: an orderly close mid-body (the fake upstream's
``@close_after``: FIN without the end of the chunked body) and a TCP reset
(:mod:`.resetting_upstream`). The client gets ``run.failed`` with
``upstream_error``, the run is recorded failed, the server is idle and
serving afterwards (a fresh prompt completes against the healthy fake)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
import trio

from tests.integration.harness import FakeUpstreamProcess, ServerProcess, running_server

from .resetting_upstream import RESET, ResettingUpstream
from .support import (
    assert_nothing_running,
    fault_server,
    idle_baseline,
    native_events,
    settle,
    stored_runs,
)

pytestmark = pytest.mark.integration

RUNS = 4


@pytest.fixture(scope="module")
def fake_upstream() -> Iterator[ServerProcess]:
    with running_server("--delay", "0.005", kind=FakeUpstreamProcess) as process:
        yield process


def agent_args(agent: str, url: str) -> tuple[str, ...]:
    if agent == "openai":
        return ("--agent", "openai", "--upstream-url", f"{url}/v1", "--model", "fake")
    return ("--agent", "ollama", "--ollama-url", url, "--model", "fake")


async def run_broken_prompts(
    server: ServerProcess, prompt: str, tag: str
) -> list[list[dict[str, object]]]:
    streams: list[list[dict[str, object]]] = []
    async with httpx2.AsyncClient(base_url=server.url, timeout=30.0) as client:

        async def one(index: int) -> None:
            status, events = await native_events(client, prompt, session_id=f"{tag}-{index}")
            assert status == 200, events
            streams.append(events)

        async with trio.open_nursery() as nursery:
            for index in range(RUNS):
                nursery.start_soon(one, index)
    return streams


def assert_upstream_failed(streams: list[list[dict[str, object]]]) -> set[str]:
    for events in streams:
        types = [event["type"] for event in events]
        assert types[0] == "run.started" and types[-1] == "run.failed", types
        assert events[-1]["error"]["code"] == "upstream_error", events[-1]  # type: ignore[index]
        assert [event["seq"] for event in events] == list(range(len(events)))
    return {str(events[0]["run_id"]) for events in streams}


async def assert_serves_upstream(server: ServerProcess) -> None:
    async with httpx2.AsyncClient(base_url=server.url, timeout=30.0) as client:
        status, events = await native_events(client, "@tokens=3 hello", session_id="fresh")
    assert status == 200 and events[-1]["type"] == "run.completed", events


@pytest.mark.parametrize("agent", ["openai", "ollama"])
async def test_upstream_closing_mid_body_fails_runs_cleanly(
    agent: str, fake_upstream: ServerProcess, tmp_path: Path
) -> None:
    with fault_server(tmp_path, *agent_args(agent, fake_upstream.url)) as server:
        baseline = await idle_baseline(server)
        streams = await run_broken_prompts(server, "@tokens=30 @close_after=3 go", "fin")
        run_ids = assert_upstream_failed(streams)
        await settle(server, baseline)
        await assert_serves_upstream(server)
        await settle(server, baseline)
        assert server.stop() == 0
    runs = stored_runs(tmp_path)
    assert_nothing_running(runs)
    assert {runs[run_id]["status"] for run_id in run_ids} == {"failed"}


@pytest.mark.parametrize("agent", ["openai", "ollama"])
async def test_upstream_resetting_the_connection_fails_runs_cleanly(
    agent: str, fake_upstream: ServerProcess, tmp_path: Path
) -> None:
    upstream = ResettingUpstream(tokens=3)
    async with trio.open_nursery() as nursery:
        await nursery.start(upstream.serve)
        with fault_server(tmp_path, *agent_args(agent, upstream.url)) as server:
            baseline = await idle_baseline(server)
            streams = await run_broken_prompts(server, f"{RESET} go", "rst")
            run_ids = assert_upstream_failed(streams)
            assert upstream.resets == RUNS
            # Some text arrived before the reset.
            assert all(any(e["type"] == "run.delta" for e in events) for events in streams)
            await settle(server, baseline)
            await assert_serves_upstream(server)
            await settle(server, baseline)
            assert server.stop() == 0
            nursery.cancel_scope.cancel()
    runs = stored_runs(tmp_path)
    assert_nothing_running(runs)
    assert {runs[run_id]["status"] for run_id in run_ids} == {"failed"}
