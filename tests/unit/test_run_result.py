"""A run's result: one frozen value, built once when the run ends, and the
one JSON shape the records API renders from it (live, ended or stored)."""

from __future__ import annotations

import attrs
import pytest
import trio
import trio.testing

from server.agents.scripted import ScriptedAgent
from server.core import CancelReason, EngineConfig
from server.core.agent import AgentRequest
from server.core.events import RunStatus, TextDelta
from server.core.run import Run
from server.store import RunRecord
from server.web.runs import run_json
from tests.helpers import FailingAgent


class BurstAgent:
    """Three deltas at once: the last two wait in the coalescing window when
    the agent returns, so the run's end flushes them."""

    name = "burst"

    async def run(
        self, request: AgentRequest, send_channel: trio.MemorySendChannel[object]
    ) -> None:
        for word in ("one ", "two ", "three"):
            await send_channel.send(TextDelta(word))


def make_run(agent: object, prompt: str = "hello") -> Run:
    return Run(
        session_id="s1",
        principal="alice",
        request=AgentRequest(prompt=prompt),
        agent=agent,  # type: ignore[arg-type]
        config=EngineConfig(coalesce_window=1.0),
    )


async def test_an_ended_runs_result_is_built_once_and_matches_its_log(
    autojump_clock: trio.testing.MockClock,
) -> None:
    run = make_run(BurstAgent())
    await run.run()
    result = run.result
    assert result is run.result
    assert (result.status, result.cancel_reason, result.error) == (RunStatus.COMPLETED, None, None)
    assert result.status is run.status and result.ended
    # Counted before the buffered delta, run.message and run.completed went out.
    assert result.events == len(run.log) == 5
    assert (result.text, result.finish_reason) == ("one two three", "stop")
    assert result.finished_at is not None and result.end_reason == "none"


@pytest.mark.parametrize(
    ("reason", "status"),
    [
        (CancelReason.CLIENT_STOP, RunStatus.CANCELLED),
        (CancelReason.SHUTDOWN, RunStatus.INTERRUPTED),
    ],
)
async def test_a_cancelled_runs_result_carries_its_reason(
    autojump_clock: trio.testing.MockClock, reason: CancelReason, status: RunStatus
) -> None:
    run = make_run(ScriptedAgent(token_delay=1.0, reply_words=50))
    async with trio.open_nursery() as nursery:
        await nursery.start(run.run)
        await run.wait_started()
        await trio.sleep(2.5)
        snapshot = run.result
        assert (snapshot.status, snapshot.finished_at) == (RunStatus.RUNNING, None)
        assert snapshot.events == len(run.log)
        run.cancel(reason)
    result = run.result
    assert (result.status, result.cancel_reason, result.end_reason) == (
        status,
        reason.value,
        reason.value,
    )
    assert result.finish_reason is None and result.events == len(run.log)


async def test_a_failed_runs_result_carries_its_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    run = make_run(FailingAgent(after=1), prompt="fail now")
    await run.run()
    assert run.result.status is RunStatus.FAILED
    assert run.result.error == run.error and run.result.end_reason == "agent_error"


async def test_live_ended_and_stored_runs_render_the_same_shape(
    autojump_clock: trio.testing.MockClock,
) -> None:
    run = make_run(BurstAgent())
    live = run_json(run.result)
    await run.run()
    ended = run_json(run.result)
    record = RunRecord.started(run.result, prompt="hello")
    finished = attrs.evolve(
        record, status=RunStatus.COMPLETED, text=run.text, finished_at=run.result.finished_at
    )
    stored = run_json(finished.result)
    assert live.keys() == ended.keys() == stored.keys()
    assert (live["status"], live["finished_at"]) == ("running", None)
    assert {key: ended[key] for key in ("id", "status", "text", "created_at", "finished_at")} == {
        key: stored[key] for key in ("id", "status", "text", "created_at", "finished_at")
    }
    # What only the engine knows: the store keeps no event count or finish reason.
    assert (ended["events"], ended["finish_reason"]) == (5, "stop")
    assert (stored["events"], stored["finish_reason"]) == (None, None)
