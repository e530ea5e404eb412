"""A run's start is recorded before ``run.started`` is published and before
its submitter learns the run (finding 3 of issue 11), and the run is owned
by its session from its first step, whatever becomes of the submitter."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from server.agents.scripted import ScriptedAgent
from server.core import AgentRequest, CancelReason, EngineConfig, SessionManager
from server.core.errors import SessionClosed
from server.core.events import RunStarted, RunStatus
from server.core.result import RunResult
from server.core.run import Run
from tests.helpers import assert_well_formed

PRINCIPAL = "key-test"
RECORDING = 1.0  # seconds the fake store takes to insert a row


class SlowStore:
    """Records what the log held while each start was being recorded."""

    def __init__(self) -> None:
        self.log_while_recording: dict[str, int] = {}
        self.recorded: set[str] = set()

    async def run_started(self, run: Run) -> None:
        self.log_while_recording[run.run_id] = len(run.log)
        await trio.sleep(RECORDING)
        self.recorded.add(run.run_id)

    async def run_ended(self, run: Run, result: RunResult) -> None:
        return None

    async def run_discarded(self, run: Run) -> None:
        return None


async def open_manager(nursery: trio.Nursery, store: SlowStore, **config: float) -> SessionManager:
    manager = SessionManager(
        agent=ScriptedAgent(token_delay=0.5, reply_words=5),
        config=EngineConfig(**config),  # type: ignore[arg-type]
        observer=store,
    )
    started: SessionManager = await nursery.start(manager.serve)
    return started


async def test_the_submitter_learns_the_run_only_after_its_start_is_recorded(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    store = SlowStore()
    manager = await open_manager(nursery, store)
    run = await manager.submit(PRINCIPAL, "s1", AgentRequest(prompt="hello"))
    assert store.log_while_recording[run.run_id] == 0  # nothing published meanwhile
    assert run.run_id in store.recorded
    assert [type(event) for event in run.log.events] == [RunStarted]
    await run.wait_ended()
    assert run.status is RunStatus.COMPLETED


async def test_a_run_stopped_while_its_start_is_recorded_still_starts_then_ends(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    store = SlowStore()
    manager = await open_manager(nursery, store)
    async with trio.open_nursery() as submitters:
        submitters.start_soon(manager.submit, PRINCIPAL, "s1", AgentRequest(prompt="hello"))
        await trio.sleep(RECORDING / 2)
        session = manager.find_session(PRINCIPAL, "s1")
        assert session is not None and session.current is not None
        run = session.current
        await manager.drain(grace_period=0)
    assert run.status is RunStatus.INTERRUPTED
    assert run.cancel_reason is CancelReason.SHUTDOWN
    assert_well_formed(run.log.events)  # run.started (seq 0), then the terminal event


async def test_a_submitter_that_leaves_while_the_start_is_recorded_leaves_the_run_owned(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    store = SlowStore()
    # An idle session would be dropped at once: the recording run keeps it.
    manager = await open_manager(nursery, store, idle_timeout=0)
    with trio.move_on_after(RECORDING / 2) as gone:
        await manager.submit(PRINCIPAL, "s1", AgentRequest(prompt="hello"))
    assert gone.cancelled_caught
    await trio.testing.wait_all_tasks_blocked()
    session = manager.find_session(PRINCIPAL, "s1")
    assert session is not None and session.current is not None
    run = session.current
    assert manager.runs.lookup(PRINCIPAL, run.run_id) is run
    await run.wait_ended()
    assert run.status is RunStatus.COMPLETED
    assert_well_formed(run.log.events)


async def test_an_engine_failure_before_run_started_strands_no_waiter(
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An engine bug while the run is still pending (publishing run.started
    fails) ends that session, and neither its submitter nor the next
    submission on the same session id waits forever."""
    store = SlowStore()
    manager = await open_manager(nursery, store)

    def broken(self: Run) -> None:
        raise RuntimeError("engine bug")

    with monkeypatch.context() as patch:
        patch.setattr(Run, "_publish_started", broken)
        # The session failed under its submitter, which may retry.
        with trio.fail_after(30), pytest.raises(SessionClosed):
            await manager.submit(PRINCIPAL, "s1", AgentRequest(prompt="hello"))
        await trio.testing.wait_all_tasks_blocked()  # the session is dropped
    assert manager.find_session(PRINCIPAL, "s1") is None
    with trio.fail_after(30):
        run = await manager.submit(PRINCIPAL, "s1", AgentRequest(prompt="again"))
        await run.wait_ended()
    assert run.status is RunStatus.COMPLETED
