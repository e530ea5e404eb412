"""The blocking adapter with real worker threads (real time: MockClock does
not mix with threads). Assertions are about order and outcome."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import trio

from server.agents.blocking import BlockingAgent, ThreadAccounting
from server.core import AgentError, AgentRequest, CancelReason, RunStatus, SessionManager
from server.core.events import AgentOutput, TextDelta
from tests.helpers import assert_well_formed

REQUEST = AgentRequest(prompt="hi")


class Recorder:
    """A sleeping token generator that records what it produced."""

    def __init__(self, tokens: int = 1000, pause: float = 0.005) -> None:
        self.tokens, self.pause = tokens, pause
        self.produced: list[str] = []
        self.closed = threading.Event()

    def __call__(self, request: AgentRequest) -> Iterator[str]:
        try:
            for index in range(self.tokens):
                time.sleep(self.pause)
                token = f"{request.prompt}{index} "
                self.produced.append(token)
                yield token
        finally:
            self.closed.set()


async def collect(
    agent: BlockingAgent, *, stop_after: int | None = None, request: AgentRequest = REQUEST
) -> list[str]:
    """Run the agent as a run would, cancelling it after ``stop_after`` tokens."""
    received: list[str] = []
    send_channel, receive_channel = trio.open_memory_channel[AgentOutput](0)

    async def drive(scope: trio.CancelScope) -> None:
        with scope:
            async with send_channel:
                await agent.run(request, send_channel)

    scope = trio.CancelScope()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(drive, scope)
        async with receive_channel:
            async for output in receive_channel:
                assert isinstance(output, TextDelta)
                received.append(output.text)
                if stop_after is not None and len(received) == stop_after:
                    scope.cancel()
    return received


async def test_tokens_cross_from_the_thread_in_order() -> None:
    recorder = Recorder(tokens=20, pause=0)
    received = await collect(BlockingAgent(generate=recorder))
    assert received == recorder.produced
    assert recorder.closed.is_set()


async def test_cancelled_generator_stops_within_one_token() -> None:
    recorder = Recorder()
    accounting = ThreadAccounting()
    agent = BlockingAgent(generate=recorder, grace=5.0, accounting=accounting)
    with trio.fail_after(10):
        received = await collect(agent, stop_after=3)
    assert received == recorder.produced[:3]
    # At most the token in flight at the moment of the cancel was produced
    # beyond what was delivered, and the generator was closed in its thread.
    assert len(recorder.produced) <= 4
    assert recorder.closed.is_set()
    assert accounting.abandoned == 0


async def test_thread_blocked_forever_is_abandoned_counted_and_never_emits_later() -> None:
    release = threading.Event()
    returned = trio.Event()
    trio_token = trio.lowlevel.current_trio_token()

    late_delivered: list[bool] = []

    def stuck(request: AgentRequest) -> Iterator[str]:
        try:
            yield "before "
            release.wait()  # a synchronous SDK call that never returns
            yield "late "
            late_delivered.append(True)  # resumed only if "late " was taken
        finally:
            trio_token.run_sync_soon(returned.set)

    accounting = ThreadAccounting()
    agent = BlockingAgent(generate=stuck, grace=0.2, accounting=accounting)
    with trio.fail_after(10):
        received = await collect(agent, stop_after=1)
    assert received == ["before "]
    assert accounting.abandoned == 1

    # The next run on the same agent is unaffected, and when the stuck call
    # finally returns its token goes nowhere.
    fresh = BlockingAgent(generate=Recorder(tokens=3, pause=0), accounting=accounting)
    assert await collect(fresh) == ["hi0 ", "hi1 ", "hi2 "]
    release.set()
    with trio.fail_after(10):
        await returned.wait()
    assert late_delivered == []
    assert accounting.abandoned == 1


async def test_generator_error_fails_the_run_with_its_code() -> None:
    def broken(request: AgentRequest) -> Iterator[str]:
        yield "one "
        raise AgentError("upstream_error", "The model server reported an error.")

    with pytest.RaisesGroup(
        pytest.RaisesExc(AgentError, check=lambda error: error.code == "upstream_error")
    ):
        await collect(BlockingAgent(generate=broken))


async def test_limiter_bounds_worker_threads() -> None:
    limiter = trio.CapacityLimiter(2)
    inside = 0
    most_inside = 0
    lock = threading.Lock()

    def counted(request: AgentRequest) -> Iterator[str]:
        nonlocal inside, most_inside
        with lock:
            inside += 1
            most_inside = max(most_inside, inside)
        time.sleep(0.02)
        with lock:
            inside -= 1
        yield "done "

    agent = BlockingAgent(generate=counted, limiter=limiter)
    async with trio.open_nursery() as nursery:
        for _ in range(6):
            nursery.start_soon(collect, agent)
    assert most_inside == 2


async def test_supersede_reaches_the_thread_and_the_next_run_streams() -> None:
    recorder = Recorder()
    manager = SessionManager(agent=BlockingAgent(generate=recorder))
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.serve)
        first = await manager.submit("key-test", "s1", AgentRequest(prompt="A"))
        with first.subscribe() as subscription:
            while subscription.cursor < 4:  # run.started and three deltas
                subscription.take()
                await subscription.wait()
        second = await manager.submit("key-test", "s1", AgentRequest(prompt="B"))
        assert first.ended and first.status is RunStatus.CANCELLED
        assert first.cancel_reason is CancelReason.SUPERSEDED
        assert recorder.closed.is_set()
        with second.subscribe() as subscription:
            while subscription.cursor < 3:
                subscription.take()
                await subscription.wait()
        assert all(not token.startswith("A") for token in second.text.split())
        second.cancel(CancelReason.CLIENT_STOP)
        await second.wait_ended()
        await manager.aclose()
    assert_well_formed(first.log.events)
    assert_well_formed(second.log.events)
