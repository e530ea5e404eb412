"""An agent that raises mid-stream: the client gets ``run.failed`` with the
generic ``agent_error`` (never the exception text), the run is recorded
failed, and the server is idle and serving afterwards."""

from __future__ import annotations

from pathlib import Path

import httpx2
import pytest
import trio

from .agents import SECRET
from .support import (
    assert_nothing_running,
    assert_serves,
    fault_server,
    idle_baseline,
    native_events,
    settle,
    stored_runs,
)

pytestmark = pytest.mark.integration

AGENT = ("--agent", "tests.faults.agents:make_agent", "--token-delay", "0.01")


async def test_agent_raising_mid_stream_fails_the_run_and_leaves_the_server_idle(
    tmp_path: Path,
) -> None:
    with fault_server(tmp_path, *AGENT) as server:
        baseline = await idle_baseline(server)
        async with httpx2.AsyncClient(base_url=server.url, timeout=30.0) as client:
            results: list[tuple[int, list[dict[str, object]]]] = []

            async def one(index: int) -> None:
                prompt = f"tokens=50 raise_after={index + 1}"
                results.append(await native_events(client, prompt, session_id=f"raise-{index}"))

            # Several at once: one run's failure must not touch the others.
            async with trio.open_nursery() as nursery:
                for index in range(5):
                    nursery.start_soon(one, index)

        for status, events in results:
            assert status == 200
            types = [event["type"] for event in events]
            assert types[0] == "run.started" and types[-1] == "run.failed", types
            assert "run.delta" in types
            assert events[-1]["error"]["code"] == "agent_error"
            assert [event["seq"] for event in events] == list(range(len(events)))
        assert SECRET not in repr(results)
        run_ids = {events[0]["run_id"] for _, events in results}
        await settle(server, baseline)
        await assert_serves(server)
        await settle(server, baseline)
        assert server.stop() == 0

    assert SECRET in server.log_text()  # the operator sees it; clients do not
    runs = stored_runs(tmp_path)
    assert_nothing_running(runs)
    assert {runs[run_id]["status"] for run_id in run_ids} == {"failed"}
    assert {runs[run_id]["error_code"] for run_id in run_ids} == {"agent_error"}
