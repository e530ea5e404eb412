"""The engine on its own, under trio's MockClock (``autojump_clock``): no
HTTP, no real sleeps."""

from __future__ import annotations

import itertools

import pytest
import trio
import trio.testing

from server.agents.scripted import ScriptedAgent
from server.core import AgentError, AgentRequest, CancelReason, EngineConfig, SessionManager
from server.core.agent import Agent
from server.core.events import RunCancelled, RunFailed, RunInterrupted, RunStatus
from server.core.lifecycle import RunState
from server.core.result import RunResult
from server.core.run import Run, RunObserver
from tests.helpers import (
    AliveProbe,
    FailingAgent,
    SlowCleanupAgent,
    assert_well_formed,
    live_task_count,
)

PRINCIPAL = "key-test"


def ask(prompt: str, marker: str = "s1") -> AgentRequest:
    return AgentRequest(prompt=prompt, model=marker)


async def open_manager(
    nursery: trio.Nursery, agent: Agent, observer: RunObserver | None = None, **config: float
) -> SessionManager:
    manager = SessionManager(
        agent=agent,
        config=EngineConfig(**config),
        **({"observer": observer} if observer is not None else {}),
    )
    started: SessionManager = await nursery.start(manager.serve)
    return started


async def test_supersede_waits_for_previous_cleanup(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    probe = AliveProbe()
    agent = SlowCleanupAgent(probe, delay=1.0, words=10, cleanup=3.0)
    manager = await open_manager(nursery, agent)

    first = await manager.submit(PRINCIPAL, "s1", ask("A"))
    await trio.sleep(2.5)
    second = await manager.submit(PRINCIPAL, "s1", ask("B"))

    # B was admitted only after A's three-second cleanup finished.
    assert first.ended
    assert first.ended_at is not None and second.started_at is not None
    assert agent.cleaned_up_at["A"] <= first.ended_at <= second.started_at
    assert second.started_at - 2.5 == pytest.approx(3.0)
    assert isinstance(first.terminal, RunCancelled)
    assert first.terminal.reason is CancelReason.SUPERSEDED
    await second.wait_ended()
    assert second.status is RunStatus.COMPLETED
    assert probe.most_alive == 1
    assert_well_formed(first.log.events)
    assert_well_formed(second.log.events)


async def test_fifty_concurrent_submits_leave_one_completed_run(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    probe = AliveProbe()
    agent = SlowCleanupAgent(probe, delay=0.5, words=4, cleanup=0.2)
    manager = await open_manager(nursery, agent)
    runs: list[Run] = []

    async def submit(index: int) -> None:
        runs.append(await manager.submit(PRINCIPAL, "s1", ask(f"p{index}")))

    async with trio.open_nursery() as submitters:
        for index in range(50):
            submitters.start_soon(submit, index)
            # Admission order is the order submitters reach the lock.
            await trio.testing.wait_all_tasks_blocked()
    for run in runs:
        await run.wait_ended()

    statuses = [run.status for run in runs]
    assert statuses.count(RunStatus.COMPLETED) == 1
    assert statuses.count(RunStatus.CANCELLED) == 49
    # The last admitted prompt is the one that completed.
    assert runs[-1].request.prompt == "p49" and runs[-1].status is RunStatus.COMPLETED
    assert all(
        isinstance(run.terminal, RunCancelled) and run.terminal.reason is CancelReason.SUPERSEDED
        for run in runs[:-1]
    )
    # Invariant 1: never two alive at once, and each started after the
    # previous one ended.
    assert probe.most_alive == 1
    for earlier, later in itertools.pairwise(runs):
        assert earlier.ended_at is not None and later.started_at is not None
        assert earlier.ended_at <= later.started_at
    for run in runs:
        assert_well_formed(run.log.events)


class StuckObserver:
    """Persistence that never returns (a locked database, say)."""

    def __init__(self) -> None:
        self.calls = 0

    async def run_started(self, run: Run) -> None:
        return None

    async def run_ended(self, run: Run, result: RunResult) -> None:
        self.calls += 1
        await trio.sleep_forever()


async def test_cleanup_over_budget_still_ends_run_and_session_proceeds(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    observer = StuckObserver()
    manager = await open_manager(
        nursery, ScriptedAgent(token_delay=1.0, reply_words=20), observer, cleanup_budget=2.0
    )
    first = await manager.submit(PRINCIPAL, "s1", ask("A"))
    await trio.sleep(3.5)
    cancelled_at = trio.current_time()
    second = await manager.submit(PRINCIPAL, "s1", ask("B"))

    assert first.status is RunStatus.CANCELLED
    assert first.ended_at == pytest.approx(cancelled_at + 2.0)
    # Its record may be missing: the terminal event says so.
    assert first.terminal is not None and first.terminal.error_details is not None
    assert second.started_at == pytest.approx(first.ended_at)
    with trio.fail_after(60):
        await second.wait_ended()
    assert second.status is RunStatus.COMPLETED
    assert observer.calls == 2


async def test_agent_error_fails_run_without_leaking_exception_text(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    manager = await open_manager(nursery, FailingAgent(after=2))
    run = await manager.submit(PRINCIPAL, "s1", ask("fail A"))
    await run.wait_ended()
    assert isinstance(run.terminal, RunFailed)
    assert run.terminal.error.code == "agent_error"
    assert "secret" not in run.terminal.error.message
    assert [event.type for event in run.log.events] == [
        "run.started",
        "run.delta",
        "run.delta",
        "run.failed",
    ]
    # The session is still usable.
    again = await manager.submit(PRINCIPAL, "s1", ask("B"))
    await again.wait_ended()
    assert again.status is RunStatus.COMPLETED


async def test_agent_error_code_and_message_reach_the_client(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    agent = FailingAgent(after=0, error=AgentError("upstream_timeout", "The model took too long."))
    manager = await open_manager(nursery, agent)
    run = await manager.submit(PRINCIPAL, "s1", ask("fail A"))
    await run.wait_ended()
    assert isinstance(run.terminal, RunFailed)
    assert (run.terminal.error.code, run.terminal.error.message) == (
        "upstream_timeout",
        "The model took too long.",
    )


async def test_completed_run_publishes_deltas_then_message_then_completed(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    manager = await open_manager(nursery, ScriptedAgent(token_delay=0.5, reply_words=5))
    run = await manager.submit(PRINCIPAL, None, ask("hello world"))
    await run.wait_ended()
    events = run.log.events
    assert_well_formed(events)
    assert [event.type for event in events] == ["run.started"] + ["run.delta"] * 5 + [
        "run.message",
        "run.completed",
    ]
    deltas = "".join(event.text for event in events if event.type == "run.delta")  # type: ignore[union-attr]
    assert events[-2].text == deltas == run.text  # type: ignore[union-attr]
    assert run.usage is not None and run.usage.completion_tokens == 5


async def test_stop_is_idempotent_and_first_reason_wins(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    manager = await open_manager(nursery, ScriptedAgent(token_delay=1.0, reply_words=10))
    run = await manager.submit(PRINCIPAL, "s1", ask("A"))
    await trio.sleep(2.5)
    assert run.cancel(CancelReason.CLIENT_STOP) is True
    assert run.cancel(CancelReason.CLIENT_DISCONNECT) is False
    await run.wait_ended()
    assert isinstance(run.terminal, RunCancelled)
    assert run.terminal.reason is CancelReason.CLIENT_STOP
    assert run.cancel(CancelReason.CLIENT_STOP) is False
    assert_well_formed(run.log.events)


async def test_two_principals_with_one_session_id_do_not_touch(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    manager = await open_manager(nursery, ScriptedAgent(token_delay=1.0, reply_words=5))
    mine = await manager.submit("key-a", "shared", ask("A"))
    theirs = await manager.submit("key-b", "shared", ask("B"))
    await mine.wait_ended()
    await theirs.wait_ended()
    assert mine.status is theirs.status is RunStatus.COMPLETED
    assert len(manager.sessions) == 2


async def test_task_count_returns_to_baseline_after_burst(
    autojump_clock: trio.testing.MockClock,
) -> None:
    baseline = live_task_count()
    async with trio.open_nursery() as nursery:
        manager = await open_manager(
            nursery,
            SlowCleanupAgent(AliveProbe(), delay=0.3, words=3, cleanup=0.1),
            idle_timeout=30,
        )
        with_manager = live_task_count()
        runs = []
        named = set()
        for index in range(60):
            session = f"s{index % 6}" if index % 3 else None
            named.add(session)
            runs.append(await manager.submit(PRINCIPAL, session, ask(f"p{index}")))
            await trio.sleep(0.05)
        for run in runs:
            await run.wait_ended()
        for run in runs:
            assert_well_formed(run.log.events)
        # Ended runs leave nothing behind; named sessions keep one task each
        # until their idle timeout.
        await trio.testing.wait_all_tasks_blocked()
        assert live_task_count() == with_manager + len(manager.sessions)
        assert len(manager.sessions) == len(named - {None})
        await trio.sleep(31)
        assert manager.sessions == {}
        assert live_task_count() == with_manager
        await manager.aclose()
    assert live_task_count() == baseline


async def test_idle_sessions_are_dropped_after_timeout(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    manager = await open_manager(
        nursery, ScriptedAgent(token_delay=1.0, reply_words=5), idle_timeout=60
    )
    run = await manager.submit(PRINCIPAL, "s1", ask("A"))
    await run.wait_ended()
    ended = trio.current_time()
    assert manager.find_session(PRINCIPAL, "s1") is not None
    await trio.sleep(59)
    assert manager.find_session(PRINCIPAL, "s1") is not None
    await trio.sleep(2)
    assert manager.find_session(PRINCIPAL, "s1") is None
    assert trio.current_time() - ended == pytest.approx(61)

    # A session without an id is its own and goes as soon as it is idle.
    anonymous = await manager.submit(PRINCIPAL, None, ask("B"))
    assert manager.find_session(PRINCIPAL, anonymous.session_id) is not None
    await anonymous.wait_ended()
    await trio.testing.wait_all_tasks_blocked()
    assert manager.find_session(PRINCIPAL, anonymous.session_id) is None


async def test_session_with_a_reader_is_not_dropped(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    manager = await open_manager(
        nursery, ScriptedAgent(token_delay=1.0, reply_words=2), idle_timeout=10
    )
    run = await manager.submit(PRINCIPAL, "s1", ask("A"))
    with run.subscribe():
        await run.wait_ended()
        await trio.sleep(100)
        assert manager.find_session(PRINCIPAL, "s1") is not None
    await trio.sleep(11)
    assert manager.find_session(PRINCIPAL, "s1") is None


async def test_drain_lets_short_runs_finish_and_interrupts_the_rest(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    manager = await open_manager(nursery, ScriptedAgent(token_delay=1.0, reply_words=5))
    short = await manager.submit(PRINCIPAL, "short", ask("A"))
    manager.agent = ScriptedAgent(token_delay=1.0, reply_words=500)
    long = await manager.submit(PRINCIPAL, "long", ask("B"))
    await trio.sleep(1.5)
    await manager.drain(grace_period=10)
    assert short.status is RunStatus.COMPLETED
    assert isinstance(long.terminal, RunInterrupted)
    assert long.terminal.reason is CancelReason.SHUTDOWN
    assert trio.current_time() == pytest.approx(11.5)
    from server.core import Draining

    with pytest.raises(Draining):
        await manager.submit(PRINCIPAL, "short", ask("C"))


async def test_closing_the_manager_interrupts_live_runs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        manager = await open_manager(nursery, ScriptedAgent(token_delay=1.0, reply_words=50))
        run = await manager.submit(PRINCIPAL, "s1", ask("A"))
        await trio.sleep(3)
        await manager.aclose()
    assert isinstance(run.terminal, RunInterrupted)
    assert run.terminal.reason is CancelReason.SHUTDOWN
    assert_well_formed(run.log.events)


class QuickAgent:
    name = "quick"

    async def run(
        self, request: AgentRequest, send_channel: trio.MemorySendChannel[object]
    ) -> None:
        from server.core.events import TextDelta

        await send_channel.send(TextDelta(request.prompt))


async def test_submit_at_the_idle_deadline_is_served_and_drain_finishes(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    manager = await open_manager(nursery, QuickAgent(), idle_timeout=10)  # type: ignore[arg-type]
    first = await manager.submit(PRINCIPAL, "s1", ask("A"))
    await first.wait_ended()
    await trio.testing.wait_all_tasks_blocked()
    await trio.sleep_until(first.ended_at + 10)  # type: ignore[operator]
    second = await manager.submit(PRINCIPAL, "s1", ask("B"))
    await second.wait_ended()
    assert second.status is RunStatus.COMPLETED
    with trio.fail_after(60):
        await manager.drain(grace_period=0)
    assert manager.live_runs.runs == set()


class GatedCoordinator:
    """Holds every session's creation until ``gate`` opens."""

    node = None
    run_started = None

    def __init__(self) -> None:
        self.gate = trio.Event()

    async def acquire(self, session: object, on_conflict: object) -> None:
        await self.gate.wait()

    def release(self, session: object) -> None:
        pass


async def test_later_prompt_wins_while_the_session_is_being_created(
    autojump_clock: trio.testing.MockClock,
) -> None:
    coordinator = GatedCoordinator()
    manager = SessionManager(
        agent=ScriptedAgent(token_delay=1.0, reply_words=5),
        coordinator=coordinator,  # type: ignore[arg-type]
    )
    runs: dict[str, Run] = {}

    async def submit(prompt: str) -> None:
        runs[prompt] = await manager.submit(PRINCIPAL, "new", ask(prompt))

    async with trio.open_nursery() as nursery:
        await nursery.start(manager.serve)
        async with trio.open_nursery() as submitters:
            submitters.start_soon(submit, "first")
            await trio.testing.wait_all_tasks_blocked()
            # "first" is creating the session (held at the gate) when "second"
            # is admitted.
            submitters.start_soon(submit, "second")
            await trio.testing.wait_all_tasks_blocked()
            coordinator.gate.set()
        for run in runs.values():
            await run.wait_ended()
        await manager.aclose()
    assert runs["first"].status is RunStatus.CANCELLED
    assert runs["second"].status is RunStatus.COMPLETED


class FailingObserver:
    async def run_started(self, run: Run) -> None:
        raise OSError("database is down")

    async def run_ended(self, run: Run, result: RunResult) -> None:
        raise OSError("database is down")


async def test_observer_failure_is_logged_and_the_run_still_ends(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    manager = await open_manager(
        nursery, ScriptedAgent(token_delay=0.1, reply_words=3), FailingObserver()
    )
    run = await manager.submit(PRINCIPAL, "s1", ask("A"))
    await run.wait_ended()
    assert run.status is RunStatus.COMPLETED
    assert_well_formed(run.log.events)
    assert "observer failed" in caplog.text
    # Reported to the client on the terminal event, without the cause's text.
    assert run.terminal is not None and run.terminal.error_details is not None
    assert run.terminal.error_details.code == "observer_failed"
    assert "database" not in run.terminal.error_details.message
    again = await manager.submit(PRINCIPAL, "s1", ask("B"))
    await again.wait_ended()
    assert again.status is RunStatus.COMPLETED


class RefusingCoordinator:
    node = None
    run_started = None

    async def acquire(self, session: object, on_conflict: object) -> None:
        await trio.sleep(1)
        raise ConnectionError("coordinator unreachable")

    def release(self, session: object) -> None:
        raise AssertionError("released a session it never granted")


async def test_session_that_fails_to_start_wakes_its_waiters(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from server.core import SessionClosed

    async with trio.open_nursery() as nursery:
        manager = SessionManager(agent=QuickAgent(), coordinator=RefusingCoordinator())  # type: ignore[arg-type]
        await nursery.start(manager.serve)
        outcomes: list[str] = []

        async def submit() -> None:
            try:
                await manager.submit(PRINCIPAL, "s1", ask("A"))
            except ConnectionError:
                outcomes.append("creator failed")
            except SessionClosed:
                outcomes.append("waiter told")

        async with trio.open_nursery() as submitters:
            submitters.start_soon(submit)
            await trio.testing.wait_all_tasks_blocked()  # creating, held in acquire
            submitters.start_soon(submit)
        assert sorted(outcomes) == ["creator failed", "waiter told"]
        assert manager.sessions == {}
        await manager.aclose()


async def test_cancel_after_the_agent_finished_is_too_late(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    manager = await open_manager(nursery, ScriptedAgent(token_delay=1.0, reply_words=2))
    run = await manager.submit(PRINCIPAL, "s1", ask("A"))
    with run.subscribe() as subscription:
        while "run.message" not in [event.type for event in subscription.take()]:
            if run.lifecycle.state is RunState.CLEANING:
                break
            await subscription.wait()
    # Completed already, or at least past the agent: stopping it now changes nothing.
    assert run.cancel(CancelReason.CLIENT_STOP) is False
    await run.wait_ended()
    assert run.status is RunStatus.COMPLETED


async def test_engine_failure_in_one_session_leaves_the_others_serving(
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    real_end = Run._end

    def broken_end(self: Run) -> None:
        if self.request.prompt == "bug":
            raise LookupError("engine bug")
        real_end(self)

    monkeypatch.setattr(Run, "_end", broken_end)
    manager = await open_manager(nursery, ScriptedAgent(token_delay=1.0, reply_words=5))
    healthy = await manager.submit(PRINCIPAL, "healthy", ask("fine"))
    broken = await manager.submit(PRINCIPAL, "broken", ask("bug"))
    await broken.wait_ended()
    await healthy.wait_ended()
    await trio.testing.wait_all_tasks_blocked()
    assert healthy.status is RunStatus.COMPLETED
    assert "session broken failed and was dropped" in caplog.text
    assert manager.find_session(PRINCIPAL, "broken") is None
    assert manager.live_runs.runs == set()


class BadOutputAgent:
    name = "bad-output"

    async def run(
        self, request: AgentRequest, send_channel: trio.MemorySendChannel[object]
    ) -> None:
        from server.core.events import TextDelta

        await send_channel.send(TextDelta("fine "))
        if request.prompt == "wrong type":
            await send_channel.send({"text": "not an output"})
        else:
            await send_channel.send(TextDelta(5))  # type: ignore[arg-type]


@pytest.mark.parametrize("prompt", ["wrong type", "wrong field"])
async def test_agent_output_of_the_wrong_shape_fails_only_that_run(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, prompt: str
) -> None:
    manager = await open_manager(nursery, BadOutputAgent())  # type: ignore[arg-type]
    run = await manager.submit(PRINCIPAL, "s1", ask(prompt))
    await run.wait_ended()
    assert isinstance(run.terminal, RunFailed)
    assert run.terminal.error.code == "agent_error"
    assert_well_formed(run.log.events)
    assert manager.find_session(PRINCIPAL, "s1") is not None
