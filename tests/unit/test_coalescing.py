"""Delta coalescing in the run's pump, under MockClock: exact merges at exact
times, flush order, and nothing stranded or published after the end."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from server.core import AgentRequest, CancelReason, EngineConfig, RunStatus, SessionManager
from server.core.events import AgentOutput, RunDelta, TextDelta
from server.core.run import Run
from tests.helpers import assert_well_formed, live_task_count

WINDOW = 0.02


class TimedAgent:
    """Sends each text at its time (seconds after the run started)."""

    name = "timed"

    def __init__(self, schedule: list[tuple[float, str]], finish_at: float | None = None) -> None:
        self.schedule = schedule
        self.finish_at = finish_at

    async def run(
        self, request: AgentRequest, send_channel: trio.MemorySendChannel[AgentOutput]
    ) -> None:
        start = trio.current_time()
        for at, text in self.schedule:
            await trio.sleep_until(start + at)
            await send_channel.send(TextDelta(text))
        if self.finish_at is not None:
            await trio.sleep_until(start + self.finish_at)


async def published(
    agent: TimedAgent, *, cancel_at: float | None = None, **config: float
) -> tuple[Run, list[tuple[float, str]]]:
    """Run ``agent`` once; the deltas as published, with their times."""
    manager = SessionManager(agent=agent, config=EngineConfig(**config))  # type: ignore[arg-type]
    deltas: list[tuple[float, str]] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.serve)
        run = await manager.submit("key-test", "s1", AgentRequest(prompt="p"))
        start = run.started_at
        assert start is not None
        if cancel_at is not None:

            async def cancel_later() -> None:
                await trio.sleep_until(start + cancel_at)
                run.cancel(CancelReason.CLIENT_STOP)

            nursery.start_soon(cancel_later)
        with run.subscribe() as subscription:
            while not subscription.finished:
                for event in subscription.take():
                    if isinstance(event, RunDelta):
                        deltas.append((round(trio.current_time() - start, 6), event.text))
                await subscription.wait()
        await manager.aclose()
    return run, deltas


async def test_first_delta_at_once_then_merged_per_window(
    autojump_clock: trio.testing.MockClock,
) -> None:
    agent = TimedAgent(
        [(0, "a"), (0.005, "b"), (0.010, "c"), (0.025, "d"), (0.030, "e"), (0.070, "f")],
        finish_at=0.1,
    )
    run, deltas = await published(agent, coalesce_window=WINDOW)
    assert deltas == [(0, "a"), (0.02, "bc"), (0.04, "de"), (0.07, "f")]
    assert run.status is RunStatus.COMPLETED
    assert_well_formed(run.log.events)


async def test_window_with_nothing_gathered_ends_and_next_delta_goes_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    agent = TimedAgent([(0, "a"), (0.03, "b"), (0.031, "c")], finish_at=0.1)
    _, deltas = await published(agent, coalesce_window=WINDOW)
    assert deltas == [(0, "a"), (0.03, "b"), (0.05, "c")]


async def test_buffer_reaching_max_chars_is_published_early(
    autojump_clock: trio.testing.MockClock,
) -> None:
    agent = TimedAgent([(0, "aa"), (0.001, "bbb"), (0.002, "ccc"), (0.003, "d")], finish_at=0.1)
    _, deltas = await published(agent, coalesce_window=WINDOW, coalesce_max_chars=5)
    assert deltas == [(0, "aa"), (0.002, "bbbccc"), (0.022, "d")]


async def test_buffered_deltas_flush_before_message_and_completed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    agent = TimedAgent([(0, "a"), (0.005, "b")], finish_at=0.006)
    run, deltas = await published(agent, coalesce_window=WINDOW)
    assert deltas == [(0, "a"), (0.006, "b")]
    assert [event.type for event in run.log.events] == [
        "run.started",
        "run.delta",
        "run.delta",
        "run.message",
        "run.completed",
    ]
    assert run.log.events[-2].text == "ab"  # type: ignore[union-attr]


@pytest.mark.parametrize("late_at", [0.006, 0.0065, 0.007])
async def test_cancel_flushes_the_window_and_a_racing_delta_is_never_stranded(
    autojump_clock: trio.testing.MockClock, late_at: float
) -> None:
    baseline = live_task_count()
    agent = TimedAgent([(0, "a"), (0.005, "b"), (late_at, "late")], finish_at=1)
    run, deltas = await published(agent, cancel_at=0.0065, coalesce_window=WINDOW)
    assert run.status is RunStatus.CANCELLED
    assert_well_formed(run.log.events)
    # Whatever the run took in was published before the terminal event, and
    # nothing after it: published text and the run's text agree.
    assert "".join(text for _, text in deltas) == run.text
    if late_at < 0.0065:
        assert run.text == "ablate"
    elif late_at > 0.0065:
        assert run.text == "ab"
    else:  # the same instant as the cancel: either order, never stranded
        assert run.text in ("ab", "ablate")
    assert live_task_count() == baseline


async def test_zero_window_publishes_every_delta_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    agent = TimedAgent([(0, "a"), (0.001, "b"), (0.002, "c")], finish_at=0.01)
    _, deltas = await published(agent, coalesce_window=0)
    assert deltas == [(0, "a"), (0.001, "b"), (0.002, "c")]
