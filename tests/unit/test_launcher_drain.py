"""The launcher's drain under MockClock: a second shutdown signal (``hurry``)
skips the rest of the drain timeout. The signals themselves are tested on a
real process (tests/integration/test_signals.py)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from server.agents.scripted import ScriptedAgent
from server.core import AgentRequest, CancelReason, SessionManager
from server.core.events import RunInterrupted
from server.core.run import Run
from server.launcher import drain
from server.settings import Settings

PRINCIPAL = "key-test"
SETTINGS = Settings(drain_timeout=30)


async def long_run(nursery: trio.Nursery) -> tuple[SessionManager, Run]:
    manager = SessionManager(agent=ScriptedAgent(token_delay=1.0, reply_words=500))
    await nursery.start(manager.serve)
    run = await manager.submit(PRINCIPAL, "s1", AgentRequest(prompt="a long answer"))
    return manager, run


def assert_interrupted_by_shutdown(run: Run) -> None:
    assert isinstance(run.terminal, RunInterrupted)
    assert run.terminal.reason is CancelReason.SHUTDOWN


async def test_hurry_during_the_drain_interrupts_live_runs_at_once(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    manager, run = await long_run(nursery)
    hurry = trio.Event()

    async def second_signal() -> None:
        await trio.sleep(2)
        hurry.set()

    start = trio.current_time()
    nursery.start_soon(second_signal)
    await drain(manager, SETTINGS, hurry=hurry)

    assert_interrupted_by_shutdown(run)
    assert trio.current_time() - start == pytest.approx(2)


async def test_hurry_before_the_drain_skips_all_of_it(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    manager, run = await long_run(nursery)
    hurry = trio.Event()
    hurry.set()

    start = trio.current_time()
    await drain(manager, SETTINGS, hurry=hurry)

    assert_interrupted_by_shutdown(run)
    assert trio.current_time() == pytest.approx(start)


async def test_without_hurry_the_drain_waits_its_timeout(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    manager, run = await long_run(nursery)

    start = trio.current_time()
    await drain(manager, SETTINGS, hurry=trio.Event())

    assert_interrupted_by_shutdown(run)
    assert trio.current_time() - start == pytest.approx(SETTINGS.drain_timeout)
