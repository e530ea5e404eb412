"""The engine's limits under trio's MockClock: sessions and concurrent runs
taken atomically at admission, the run deadline, the run log's size, readers
per run, and slow readers dropped after the send timeout."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from server.agents.scripted import ScriptedAgent
from server.cli import parse_settings
from server.core import (
    AgentRequest,
    CancelReason,
    EngineConfig,
    SessionManager,
    TooManyRuns,
    TooManySessions,
    TooManySubscribers,
)
from server.core.agent import Agent
from server.core.events import (
    AgentOutput,
    FullMessage,
    RunDelta,
    RunFailed,
    RunInterrupted,
    RunStatus,
    TextDelta,
)
from server.core.run import Run
from server.web.streaming import RunStream
from server.wire import NativeNdjsonEncoder, OpenAIChunkEncoder
from tests.helpers import AliveProbe, SlowCleanupAgent, assert_well_formed, live_task_count

ALICE = "key-alice"
BOB = "key-bob"


def ask(prompt: str) -> AgentRequest:
    return AgentRequest(prompt=prompt)


async def open_manager(nursery: trio.Nursery, agent: Agent, **config: float) -> SessionManager:
    manager = SessionManager(agent=agent, config=EngineConfig(**config))
    started: SessionManager = await nursery.start(manager.serve)
    return started


def slow_agent(words: int = 10) -> ScriptedAgent:
    return ScriptedAgent(token_delay=1.0, reply_words=words)


# --- sessions ---------------------------------------------------------------


async def test_sessions_per_principal_are_refused_and_nothing_is_left_behind(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    manager = await open_manager(
        nursery, slow_agent(2), max_sessions_per_principal=2, idle_timeout=60
    )
    first = await manager.submit(ALICE, "s1", ask("a"))
    await manager.submit(ALICE, "s2", ask("b"))

    with pytest.raises(TooManySessions) as refused:
        await manager.submit(ALICE, "s3", ask("c"))
    assert refused.value.code == "too_many_sessions"
    assert "2 open sessions" in refused.value.message
    assert manager.find_session(ALICE, "s3") is None
    assert len(manager.sessions) == 2
    # A session without an id is a session too.
    with pytest.raises(TooManySessions):
        await manager.submit(ALICE, None, ask("d"))
    assert len(manager.sessions) == 2

    # Existing sessions still take prompts; other principals are not counted.
    again = await manager.submit(ALICE, "s1", ask("again"))
    assert first.cancel_reason is CancelReason.SUPERSEDED
    await manager.submit(BOB, "s3", ask("bob"))

    # Once an idle session is dropped, there is room again.
    await again.wait_ended()
    await trio.sleep(61)
    assert manager.sessions == {}
    run = await manager.submit(ALICE, "s3", ask("c"))
    await run.wait_ended()
    assert run.status is RunStatus.COMPLETED


async def test_sessions_in_total_are_refused(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    manager = await open_manager(nursery, slow_agent(2), max_sessions=2)
    await manager.submit(ALICE, "s1", ask("a"))
    await manager.submit(BOB, "s1", ask("b"))
    with pytest.raises(TooManySessions) as refused:
        await manager.submit(BOB, "s2", ask("c"))
    assert "server has as many open sessions" in refused.value.message
    assert len(manager.sessions) == 2


# --- concurrent runs --------------------------------------------------------


async def test_runs_per_principal_are_refused_until_one_ends(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    manager = await open_manager(nursery, slow_agent(10), max_runs_per_principal=2)
    first = await manager.submit(ALICE, "s1", ask("a"))
    await manager.submit(ALICE, "s2", ask("b"))
    assert manager.busy_sessions == 2

    with pytest.raises(TooManyRuns) as refused:
        await manager.submit(ALICE, "s3", ask("c"))
    assert refused.value.code == "too_many_runs"
    assert refused.value.retry_after >= 1
    # Refused before anything was made: no session, no run to look up.
    assert manager.find_session(ALICE, "s3") is None
    assert manager.runs.for_session(ALICE, "s3", 10) == []

    # Superseding in a busy session reuses its slot; other keys are not counted.
    second = await manager.submit(ALICE, "s1", ask("a2"))
    assert first.status is RunStatus.CANCELLED
    await manager.submit(BOB, "s3", ask("bob"))
    assert manager.busy_sessions == 3

    second.cancel(CancelReason.CLIENT_STOP)
    await second.wait_ended()
    assert manager.busy_sessions == 2
    third = await manager.submit(ALICE, "s3", ask("c"))
    assert third.alive


async def test_runs_in_total_are_refused(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    manager = await open_manager(nursery, slow_agent(3), max_runs=2)
    one = await manager.submit(ALICE, "s1", ask("a"))
    await manager.submit(BOB, "s1", ask("b"))
    with pytest.raises(TooManyRuns) as refused:
        await manager.submit(BOB, "s2", ask("c"))
    assert "server is running as many runs" in refused.value.message
    await one.wait_ended()
    await trio.testing.wait_all_tasks_blocked()
    await manager.submit(BOB, "s2", ask("c"))


async def test_concurrent_admissions_cannot_overtake_the_run_limit(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Fifty submissions at once, each to a new session, against a limit of
    five: the limit is taken before the first checkpoint, so exactly five
    are admitted and the refused ones leave no session behind."""
    manager = await open_manager(
        nursery,
        SlowCleanupAgent(AliveProbe(), delay=1.0, words=5, cleanup=0.5),
        max_runs_per_principal=5,
    )
    admitted: list[Run] = []
    refused = 0

    async def submit(index: int) -> None:
        nonlocal refused
        try:
            admitted.append(await manager.submit(ALICE, f"s{index}", ask(f"p{index}")))
        except TooManyRuns:
            refused += 1

    async with trio.open_nursery() as burst:
        for index in range(50):
            burst.start_soon(submit, index)
    assert (len(admitted), refused) == (5, 45)
    assert len(manager.sessions) == 5
    for run in admitted:
        await run.wait_ended()
        assert_well_formed(run.log.events)
    assert manager.busy_sessions == 0


async def test_a_session_that_fails_to_start_gives_its_slots_back(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    class RefusingCoordinator:
        node = None
        run_started = None

        async def acquire(self, session: object, on_conflict: object) -> None:
            raise RuntimeError("no lease")

        def release(self, session: object) -> None:
            pass

    manager = SessionManager(
        agent=slow_agent(1),
        config=EngineConfig(max_runs=1, max_sessions=1),
        coordinator=RefusingCoordinator(),
    )
    await nursery.start(manager.serve)
    for _ in range(3):
        with pytest.raises(RuntimeError):
            await manager.submit(ALICE, "s1", ask("a"))
        assert manager.busy_sessions == 0
        assert manager.sessions == {}


# --- the run deadline -------------------------------------------------------


async def test_run_timeout_interrupts_with_reason_deadline_after_bounded_cleanup(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    agent = SlowCleanupAgent(AliveProbe(), delay=1.0, words=100, cleanup=2.0)
    manager = await open_manager(nursery, agent, run_timeout=5.0, cleanup_budget=3.0)
    started = trio.current_time()
    run = await manager.submit(ALICE, "s1", ask("A"))
    await run.wait_ended()

    terminal = run.terminal
    assert isinstance(terminal, RunInterrupted)
    assert terminal.reason is CancelReason.DEADLINE
    assert run.status is RunStatus.INTERRUPTED
    assert run.cancel_reason is CancelReason.DEADLINE
    assert_well_formed(run.log.events)
    # The agent's own shielded cleanup (2 s) ran before the terminal event.
    assert agent.cleaned_up_at["A"] == pytest.approx(started + 5.0 + 2.0)
    assert run.ended_at == pytest.approx(started + 7.0)
    assert agent.probe.alive == {"?": 0}
    # The session goes on: the next prompt starts at once.
    after = await manager.submit(ALICE, "s1", ask("B"))
    assert after.alive


async def test_run_timeout_leaves_short_runs_and_explicit_cancels_alone(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    manager = await open_manager(nursery, slow_agent(3), run_timeout=5.0)
    short = await manager.submit(ALICE, "s1", ask("A"))
    await short.wait_ended()
    assert short.status is RunStatus.COMPLETED

    manager.agent = slow_agent(100)  # for new sessions
    stopped = await manager.submit(ALICE, "s2", ask("B"))
    await trio.sleep(2)
    stopped.cancel(CancelReason.CLIENT_STOP)
    await stopped.wait_ended()
    assert stopped.status is RunStatus.CANCELLED
    assert stopped.cancel_reason is CancelReason.CLIENT_STOP


# --- the run log ------------------------------------------------------------


class FloodAgent:
    """Sends ``count`` deltas of ``size`` characters, ``delay`` apart (two
    for the prompt "short")."""

    name = "flood"

    def __init__(self, *, count: int, size: int, delay: float = 0.1) -> None:
        self.count = count
        self.size = size
        self.delay = delay
        self.cancelled = False

    async def run(
        self, request: AgentRequest, send_channel: trio.MemorySendChannel[AgentOutput]
    ) -> None:
        try:
            for _ in range(2 if request.prompt == "short" else self.count):
                await trio.sleep(self.delay)
                await send_channel.send(TextDelta("x" * self.size))
            if request.prompt == "with message":
                await send_channel.send(FullMessage("y" * (2 * self.count * self.size)))
        except trio.Cancelled:
            self.cancelled = True
            raise


@pytest.mark.parametrize(
    ("limit", "prompt", "delay"),
    [
        ({"max_run_bytes": 1000}, "deltas", 0.1),
        ({"max_run_events": 10, "coalesce_window": 0}, "deltas", 0.1),
        ({"max_run_bytes": 5000}, "with message", 0.1),
        # An agent that never pauses is blocked in send when the pump refuses.
        ({"max_run_bytes": 1000}, "deltas", 0),
        ({"max_run_events": 10, "coalesce_window": 0}, "deltas", 0),
    ],
    ids=["bytes", "events", "full-message", "bytes-fast-agent", "events-fast-agent"],
)
async def test_a_run_past_its_log_limit_fails_with_run_too_large(
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    limit: dict[str, float],
    prompt: str,
    delay: float,
) -> None:
    agent = FloodAgent(count=30 if prompt == "with message" else 1000, size=100, delay=delay)
    manager = await open_manager(nursery, agent, **limit)
    run = await manager.submit(ALICE, "s1", ask(prompt))
    await run.wait_ended()

    terminal = run.terminal
    assert isinstance(terminal, RunFailed)
    assert terminal.error.code == "run_too_large"
    assert agent.cancelled != (prompt == "with message")  # it was stopped mid-answer
    events = run.log.events
    assert_well_formed(events)
    assert len(events) <= limit.get("max_run_events", 100_000)
    published = sum(len(getattr(event, "text", "")) for event in events)
    assert published <= limit.get("max_run_bytes", 8 * 1024 * 1024)
    if prompt == "deltas":  # the answer on record is what was published
        assert run.text == "".join(e.text for e in events if isinstance(e, RunDelta))
    # The session is unharmed.
    after = await manager.submit(ALICE, "s1", ask("short"))
    await after.wait_ended()
    assert after.status is RunStatus.COMPLETED


# --- readers ----------------------------------------------------------------


async def test_subscribers_per_run_are_limited_and_counted_back(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    manager = await open_manager(nursery, slow_agent(5), max_subscribers=2)
    run = await manager.submit(ALICE, "s1", ask("a"))
    first = run.subscribe().open()
    with run.subscribe():
        with pytest.raises(TooManySubscribers) as refused:
            run.subscribe()
        assert refused.value.code == "too_many_subscribers"
    with run.subscribe():
        assert run.subscriber_count == 2
    first.close()
    assert run.subscriber_count == 0


async def read_frame(frames: AsyncIterator[bytes]) -> bytes:
    return await frames.__anext__()


async def test_slow_reader_gets_merged_frames_then_is_dropped_and_the_run_goes_on(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    manager = await open_manager(
        nursery, ScriptedAgent(token_delay=0.1, reply_words=200), coalesce_window=0
    )
    run = await manager.submit(ALICE, "s1", ask("hello"))
    slow = RunStream(run, NativeNdjsonEncoder(), heartbeat_interval=15, send_timeout=2.0)
    fast = RunStream(run, NativeNdjsonEncoder(), heartbeat_interval=15, send_timeout=2.0)
    baseline = live_task_count()

    fast_events: list[dict[str, object]] = []

    async def read_fast() -> None:
        async for frame in fast:
            fast_events.extend(json.loads(line) for line in frame.splitlines() if line)

    nursery.start_soon(read_fast)
    slow_frames = aiter(slow)
    await read_frame(slow_frames)
    # Each write takes a second: the reader falls behind, and every frame
    # carries everything pending since the last (merged frames).
    await trio.sleep(1.0)
    merged = await read_frame(slow_frames)
    assert len(merged.splitlines()) >= 5
    # One write that takes longer than the send timeout: dropped.
    await trio.sleep(2.5)
    closing = await read_frame(slow_frames)
    notice = json.loads(closing)
    assert notice["type"] == "stream.dropped"
    assert notice["error"]["code"] == "slow_reader"
    assert notice["after"] >= 1
    with pytest.raises(StopAsyncIteration):
        await read_frame(slow_frames)
    assert slow.dropped
    assert run.subscriber_count == 1  # the fast reader's

    # The run was not cancelled (on_disconnect=cancel notwithstanding) and
    # the other reader got everything.
    await run.wait_ended()
    assert run.status is RunStatus.COMPLETED
    await trio.testing.wait_all_tasks_blocked()
    assert fast_events[-1]["type"] == "run.completed"
    assert [event["seq"] for event in fast_events] == list(range(len(run.log)))
    assert live_task_count() <= baseline


async def test_reader_closed_during_an_overdue_write_does_not_cancel_the_run(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    manager = await open_manager(nursery, ScriptedAgent(token_delay=0.1, reply_words=100))
    stuck_run = await manager.submit(ALICE, "s1", ask("stuck"))
    stuck = RunStream(stuck_run, NativeNdjsonEncoder(), heartbeat_interval=15, send_timeout=2.0)
    frames = aiter(stuck)
    await read_frame(frames)  # handed over the first frame; its write never ends
    await trio.sleep(3)
    await frames.aclose()  # the connection is broken under it
    assert stuck.dropped
    await stuck_run.wait_ended()
    assert stuck_run.status is RunStatus.COMPLETED

    # A reader that leaves quickly is a client going away: the run is cancelled.
    gone_run = await manager.submit(ALICE, "s2", ask("gone"))
    gone = RunStream(gone_run, NativeNdjsonEncoder(), heartbeat_interval=15, send_timeout=2.0)
    frames = aiter(gone)
    await read_frame(frames)
    await trio.sleep(0.5)
    await frames.aclose()
    assert not gone.dropped
    await gone_run.wait_ended()
    assert gone_run.cancel_reason is CancelReason.CLIENT_DISCONNECT


async def test_openai_readers_are_dropped_with_a_final_error_chunk_and_done(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    manager = await open_manager(nursery, ScriptedAgent(token_delay=0.1, reply_words=100))
    run = await manager.submit(ALICE, "s1", ask("hello"))
    stream = RunStream(
        run,
        OpenAIChunkEncoder(created=0, model="m"),
        heartbeat_interval=15,
        send_timeout=1.0,
    )
    frames = aiter(stream)
    await read_frame(frames)
    await trio.sleep(1.5)  # the write of that frame takes too long
    closing = (await read_frame(frames)).decode()
    data = [line[len("data: ") :] for line in closing.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    final = json.loads(data[0])
    assert final["choices"][0]["finish_reason"] == "error"
    assert final["error"]["code"] == "slow_reader"
    assert run.run_id in final["error"]["message"]
    await frames.aclose()
    await run.wait_ended()
    assert run.status is RunStatus.COMPLETED


# --- configuration ----------------------------------------------------------

LIMIT_FLAGS = {
    "--max-prompt-chars": ("max_prompt_chars", "5000"),
    "--max-messages": ("max_messages", "7"),
    "--max-header-bytes": ("max_header_bytes", "4096"),
    "--max-sessions": ("max_sessions", "11"),
    "--max-sessions-per-key": ("max_sessions_per_key", "5"),
    "--max-runs": ("max_runs", "9"),
    "--max-runs-per-key": ("max_runs_per_key", "3"),
    "--run-timeout": ("run_timeout", "2.5"),
    "--max-run-events": ("max_run_events", "500"),
    "--max-run-bytes": ("max_run_bytes", "65536"),
    "--max-subscribers": ("max_subscribers", "4"),
    "--send-timeout": ("send_timeout", "7.5"),
    "--keep-alive-timeout": ("keep_alive_timeout", "2.5"),
}


@pytest.mark.parametrize("flag", LIMIT_FLAGS)
def test_every_limit_is_a_flag_and_an_environment_variable(flag: str) -> None:
    field, value = LIMIT_FLAGS[flag]
    env = "STREAM_SERVER_" + flag.removeprefix("--").replace("-", "_").upper()
    default = getattr(parse_settings([], environ={}), field)
    from_env = getattr(parse_settings([], environ={env: value}), field)
    from_flag = getattr(parse_settings([flag, value], environ={env: "1"}), field)
    assert from_env == from_flag == type(default)(value) != default


@pytest.mark.parametrize(
    "argv", [["--max-runs", "0"], ["--run-timeout", "-1"], ["--max-run-events", "3"]]
)
def test_a_limit_out_of_range_is_a_usage_error(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_settings(argv, environ={})
    assert exit_info.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


class SurrogateAgent:
    async def run(
        self, request: AgentRequest, send_channel: trio.MemorySendChannel[AgentOutput]
    ) -> None:
        await send_channel.send(TextDelta("a\ud800b"))
        await send_channel.send(FullMessage("a\ud800b"))


async def test_a_lone_surrogate_from_an_agent_is_counted_not_a_failure(
    nursery: trio.Nursery,
) -> None:
    # Upstream models can emit them; the encoders replace them with U+FFFD.
    manager = await open_manager(nursery, SurrogateAgent(), max_run_bytes=1000)
    run = await manager.submit(ALICE, "s1", ask("hi"))
    await run.wait_ended()
    assert run.status is RunStatus.COMPLETED, run.terminal
