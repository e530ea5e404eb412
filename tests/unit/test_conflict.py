"""Double-texting strategies (on_conflict), under MockClock."""

from __future__ import annotations

import itertools

import pytest
import trio
import trio.testing

from server.agents.scripted import ScriptedAgent
from server.core import (
    AgentRequest,
    CancelReason,
    EngineConfig,
    OnConflict,
    QueueFull,
    RunInProgress,
    RunStatus,
    SessionManager,
)
from server.core.result import RunResult
from server.core.run import Run
from tests.helpers import assert_well_formed
from tests.unit.test_http import AUTH, PATH, serving

PRINCIPAL = "key-test"


class RecordingObserver:
    def __init__(self) -> None:
        self.discarded: list[str] = []

    async def run_started(self, run: Run) -> None:
        return None

    async def run_ended(self, run: Run, result: RunResult) -> None:
        return None

    async def run_discarded(self, run: Run) -> None:
        self.discarded.append(run.run_id)


async def manager_in(nursery: trio.Nursery, **config: int) -> SessionManager:
    manager = SessionManager(
        agent=ScriptedAgent(token_delay=1.0, reply_words=3),
        config=EngineConfig(**config),
        observer=RecordingObserver(),
    )
    started: SessionManager = await nursery.start(manager.serve)
    return started


async def test_reject_refuses_while_a_run_is_live(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        manager = await manager_in(nursery)
        first = await manager.submit(PRINCIPAL, "s1", AgentRequest(prompt="A"))
        with pytest.raises(RunInProgress):
            await manager.submit(
                PRINCIPAL, "s1", AgentRequest(prompt="B"), on_conflict=OnConflict.REJECT
            )
        await first.wait_ended()
        assert first.status is RunStatus.COMPLETED
        after = await manager.submit(
            PRINCIPAL, "s1", AgentRequest(prompt="C"), on_conflict=OnConflict.REJECT
        )
        await after.wait_ended()
        assert after.status is RunStatus.COMPLETED
        await manager.aclose()


async def test_enqueue_runs_each_prompt_after_the_last_in_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    runs: list[Run] = []
    async with trio.open_nursery() as nursery:
        manager = await manager_in(nursery)

        async def submit(prompt: str) -> None:
            runs.append(
                await manager.submit(
                    PRINCIPAL, "s1", AgentRequest(prompt=prompt), on_conflict=OnConflict.ENQUEUE
                )
            )

        async with trio.open_nursery() as submitters:
            for prompt in ("A", "B", "C"):
                submitters.start_soon(submit, prompt)
                await trio.testing.wait_all_tasks_blocked()
        for run in runs:
            await run.wait_ended()
        await manager.aclose()
    assert [run.request.prompt for run in runs] == ["A", "B", "C"]
    assert all(run.status is RunStatus.COMPLETED for run in runs)
    for earlier, later in itertools.pairwise(runs):
        assert earlier.ended_at is not None and later.started_at is not None
        assert earlier.ended_at <= later.started_at
    assert runs[1].started_at == pytest.approx(3.0) and runs[2].started_at == pytest.approx(6.0)


async def test_enqueue_beyond_the_line_is_queue_full(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        manager = await manager_in(nursery, max_queued=2)
        await manager.submit(PRINCIPAL, "s1", AgentRequest(prompt="A"))
        async with trio.open_nursery() as waiting:
            for prompt in ("B", "C"):
                waiting.start_soon(
                    lambda p=prompt: manager.submit(
                        PRINCIPAL, "s1", AgentRequest(prompt=p), on_conflict=OnConflict.ENQUEUE
                    )
                )
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(QueueFull):
                await manager.submit(
                    PRINCIPAL, "s1", AgentRequest(prompt="D"), on_conflict=OnConflict.ENQUEUE
                )
        await manager.aclose()


async def test_rollback_interrupts_and_forgets_the_superseded_run(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        manager = await manager_in(nursery)
        old = await manager.submit(PRINCIPAL, "s1", AgentRequest(prompt="A"))
        await trio.sleep(1.5)
        new = await manager.submit(
            PRINCIPAL, "s1", AgentRequest(prompt="B"), on_conflict=OnConflict.ROLLBACK
        )
        assert old.status is RunStatus.CANCELLED
        assert old.cancel_reason is CancelReason.SUPERSEDED
        assert_well_formed(old.log.events)  # its readers still saw it end
        assert manager.runs.lookup(PRINCIPAL, old.run_id) is None
        assert manager.runs.lookup(PRINCIPAL, new.run_id) is new
        assert manager.observer.discarded == [old.run_id]  # type: ignore[attr-defined]
        await new.wait_ended()
        await manager.aclose()


async def test_rollback_keeps_a_previous_run_that_had_already_ended(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        manager = await manager_in(nursery)
        done = await manager.submit(PRINCIPAL, "s1", AgentRequest(prompt="A"))
        await done.wait_ended()
        new = await manager.submit(
            PRINCIPAL, "s1", AgentRequest(prompt="B"), on_conflict=OnConflict.ROLLBACK
        )
        assert manager.runs.lookup(PRINCIPAL, done.run_id) is done
        assert manager.observer.discarded == []  # type: ignore[attr-defined]
        await new.wait_ended()
        await manager.aclose()


@pytest.mark.parametrize(
    ("on_conflict", "status", "code"),
    [("reject", 409, "run_in_progress"), ("bogus", 422, "invalid_request")],
)
async def test_on_conflict_over_http(
    autojump_clock: trio.testing.MockClock, on_conflict: str, status: int, code: str
) -> None:
    async with serving(token_delay=1.0, reply_words=5) as app:
        client = app.test_client()
        headers = {**AUTH, "X-Session-Id": "s1"}
        async with client.request(PATH, method="POST", headers=headers) as first:
            await first.send(b'{"prompt": "A", "stream": true}')
            await first.send_complete()
            await first.receive()
            refused = await client.post(
                PATH, headers=headers, json={"prompt": "B", "on_conflict": on_conflict}
            )
            assert refused.status_code == status
            assert (await refused.get_json())["error"]["code"] == code
            while True:
                try:
                    await first.receive()
                except trio.EndOfChannel:
                    break
