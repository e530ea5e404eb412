"""Asyncio agents through trio-asyncio: the adapter over toy asyncio
generators, and the ``openai`` package's AsyncOpenAI against the fake
upstream. Agents are driven directly: ``agent.run`` in a nursery with a
consumer task. Assertions are about order and outcome, not wall time: real
sockets need real time, and only the toy agents that ignore cancellation run
under MockClock (trio-asyncio's loop keeps trio's time), to check bounds."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

import attrs
import pytest
import trio
import trio.testing

from server.agents.asyncio_adapter import (
    AsyncioAgentAdapter,
    AsyncioLoopHost,
    AsyncioLoopNotRunning,
)
from server.agents.openai_asyncio import OpenAIAsyncioAgent
from server.agents.openai_compat import OpenAICompatAgent
from server.agents.upstream import UpstreamTimeouts
from server.core import CancelReason, RunStatus, SessionManager
from server.core.agent import Agent, AgentError, AgentRequest
from server.core.events import AgentOutput, StopReason, TextDelta, Usage, UsageReport
from tests.fakes import FakeUpstream, RequestRecord, open_fake_upstream, token_text
from tests.helpers import live_task_count

WAIT = 10  # seconds: generous bound for anything that should be prompt


# --- helpers -----------------------------------------------------------------


@asynccontextmanager
async def loop_host() -> AsyncIterator[AsyncioLoopHost]:
    host = AsyncioLoopHost()
    async with trio.open_nursery() as nursery:
        await nursery.start(host.serve)
        try:
            yield host
        finally:
            nursery.cancel_scope.cancel()


def asyncio_tasks(host: AsyncioLoopHost) -> set[asyncio.Task[object]]:
    """Every asyncio task still pending on the host's loop."""
    return asyncio.all_tasks(host.loop)


async def drive(
    agent: Agent,
    prompt: str,
    *,
    stop_after: int | None = None,
    stop_reading_after: int | None = None,
    cancel_when: Callable[[], Awaitable[object]] | None = None,
    received: list[AgentOutput] | None = None,
    on_returned: Callable[[], None] = lambda: None,
) -> list[AgentOutput]:
    """Run ``agent`` with a consumer; cancel the lot after ``stop_after``
    text deltas or once ``cancel_when()`` returns. After
    ``stop_reading_after`` text deltas the consumer stops reading (the
    producer then blocks in ``send``). ``on_returned`` is called the moment
    ``run()`` has returned or raised."""
    outputs = [] if received is None else received
    send_channel, receive_channel = trio.open_memory_channel[AgentOutput](0)

    async def produce() -> None:
        async with send_channel:
            try:
                await agent.run(AgentRequest(prompt=prompt), send_channel)
            finally:
                on_returned()

    async def consume() -> None:
        async with receive_channel:
            async for output in receive_channel:
                outputs.append(output)
                if stop_after is not None and len(texts(outputs)) >= stop_after:
                    nursery.cancel_scope.cancel()
                if stop_reading_after is not None and len(texts(outputs)) >= stop_reading_after:
                    await trio.sleep_forever()

    async def canceller() -> None:
        assert cancel_when is not None
        await cancel_when()
        nursery.cancel_scope.cancel()

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume)
            nursery.start_soon(produce)
            if cancel_when is not None:
                nursery.start_soon(canceller)
    return outputs


def texts(outputs: list[AgentOutput]) -> list[str]:
    return [output.text for output in outputs if isinstance(output, TextDelta)]


def fails_with(code: str, message: str = "") -> pytest.RaisesGroup[AgentError]:
    """An AgentError with ``code`` (and ``message`` in its text), out of the nursery."""
    return pytest.RaisesGroup(
        pytest.RaisesExc(AgentError, check=lambda exc: exc.code == code and message in exc.message)
    )


# --- the adapter over toy asyncio agents -------------------------------------------


@attrs.define
class ToyAgent:
    """An asyncio generator of ``tok{i} `` tokens, ``delay`` apart (asyncio
    sleeps), that records how it ended and on which side."""

    tokens: int = 1_000_000
    delay: float = 0.0
    pause_after: int | None = None  # then sleeps for an hour
    fail_with: Exception | None = None
    extra: tuple[object, ...] = ()
    name: str = "toy"
    opened: int = 0
    ended: list[str] = attrs.field(factory=list)
    ended_on_asyncio: list[bool] = attrs.field(factory=list)

    @property
    def open_now(self) -> int:
        return self.opened - len(self.ended)

    async def stream(self, request: AgentRequest) -> AsyncIterator[AgentOutput | str]:
        self.opened += 1
        how = "exhausted"
        try:
            for index in range(self.tokens):
                if index == self.pause_after:
                    await asyncio.sleep(3600)
                await asyncio.sleep(self.delay)
                yield f"tok{index} "
            for item in self.extra:
                yield item  # type: ignore[misc]  # deliberately not an output
            if self.fail_with is not None:
                raise self.fail_with
        except asyncio.CancelledError:
            how = "cancelled"
            raise
        except GeneratorExit:
            how = "closed"
            raise
        finally:
            self.ended.append(how)
            self.ended_on_asyncio.append(asyncio.current_task() is not None)


async def test_tokens_and_outputs_cross_from_asyncio_in_order() -> None:
    usage = UsageReport(usage=Usage(prompt_tokens=1, completion_tokens=3))
    toy = ToyAgent(tokens=3, delay=0.001, extra=(usage, StopReason("stop")))
    async with loop_host() as host:
        outputs = await drive(AsyncioAgentAdapter(agent=toy, host=host), "hi")
        assert outputs == [
            TextDelta("tok0 "),
            TextDelta("tok1 "),
            TextDelta("tok2 "),
            usage,
            StopReason("stop"),
        ]
        assert toy.ended == ["exhausted"]
        assert asyncio_tasks(host) == set()


async def test_cancel_during_an_asyncio_await_cancels_and_finishes_the_generator() -> None:
    toy = ToyAgent(pause_after=2)
    ended_when_run_returned: list[list[str]] = []
    async with loop_host() as host:
        outputs = await drive(
            AsyncioAgentAdapter(agent=toy, host=host),
            "hi",
            cancel_when=lambda: trio.testing.wait_all_tasks_blocked(0.01),
            on_returned=lambda: ended_when_run_returned.append(list(toy.ended)),
        )
        assert texts(outputs) == ["tok0 ", "tok1 "]
        # The generator saw CancelledError at its asyncio.sleep and its
        # finally ran on the asyncio loop, all before run() returned.
        assert ended_when_run_returned == [["cancelled"]]
        assert toy.ended_on_asyncio == [True]
        assert asyncio_tasks(host) == set()


async def test_generator_parked_at_yield_gets_generator_exit() -> None:
    toy = ToyAgent()
    ended_when_run_returned: list[list[str]] = []
    async with loop_host() as host:
        adapter = AsyncioAgentAdapter(agent=toy, host=host)
        send_channel, receive_channel = trio.open_memory_channel[AgentOutput](0)

        async def produce() -> None:
            try:
                await adapter.run(AgentRequest(prompt="hi"), send_channel)
            finally:
                ended_when_run_returned.append(list(toy.ended))

        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery, receive_channel:
                nursery.start_soon(produce)
                assert await receive_channel.receive() == TextDelta("tok0 ")
                # Nobody reads tok1: the producer blocks in send() with the
                # generator suspended at its yield.
                await trio.testing.wait_all_tasks_blocked(0.01)
                nursery.cancel_scope.cancel()
        assert ended_when_run_returned == [["closed"]]
        assert toy.ended_on_asyncio == [True]
        assert asyncio_tasks(host) == set()


async def test_a_hundred_superseded_runs_leave_no_asyncio_task_and_no_trio_task() -> None:
    toy = ToyAgent(delay=0.0005)
    async with loop_host() as host:
        adapter = AsyncioAgentAdapter(agent=toy, host=host)
        await drive(adapter, "warm-up", stop_after=1)
        baseline = live_task_count()
        for index in range(100):
            outputs = await drive(adapter, f"run{index}", stop_after=1 + index % 2)
            assert texts(outputs)[: 1 + index % 2] == ["tok0 ", "tok1 "][: 1 + index % 2]
            assert toy.open_now == 0
        assert toy.opened == 101
        assert set(toy.ended) <= {"cancelled", "closed"}
        assert asyncio_tasks(host) == set()
        assert live_task_count() == baseline


@attrs.define
class SpawningAgent:
    """Starts asyncio tasks of its own: one awaited, one left behind."""

    name: str = "spawning"
    helper_ended: list[str] = attrs.field(factory=list)
    forgotten: asyncio.Task[None] | None = None

    async def _forgotten(self) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.helper_ended.append("cancelled")
            raise

    async def stream(self, request: AgentRequest) -> AsyncIterator[AgentOutput | str]:
        helper = asyncio.create_task(asyncio.sleep(0, result="awaited "))
        yield await helper
        self.forgotten = asyncio.create_task(self._forgotten())  # never awaited, on purpose
        yield "done"


async def test_tasks_an_agent_leaves_behind_are_cancelled_before_run_returns() -> None:
    spawning = SpawningAgent()
    async with loop_host() as host:
        adapter = AsyncioAgentAdapter(agent=spawning, host=host, cleanup_budget=0.2)
        assert texts(await drive(adapter, "hi")) == ["awaited ", "done"]
        # The forgotten task outlived the cleanup budget: cancelled and awaited.
        assert spawning.helper_ended == ["cancelled"]
        assert asyncio_tasks(host) == set()


async def test_concurrent_runs_settle_only_their_own_tasks() -> None:
    slow, fast = ToyAgent(delay=0.002), ToyAgent(tokens=5, delay=0.001)
    async with loop_host() as host:
        slow_adapter = AsyncioAgentAdapter(agent=slow, host=host)
        fast_adapter = AsyncioAgentAdapter(agent=fast, host=host)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drive, slow_adapter, "slow")
            # Completes and settles while the endless slow run's steps are in flight.
            assert len(texts(await drive(fast_adapter, "fast"))) == 5
            assert fast.ended == ["exhausted"]
            assert slow.ended == []
            nursery.cancel_scope.cancel()
        assert slow.ended in (["cancelled"], ["closed"])
        assert asyncio_tasks(host) == set()


async def test_agent_error_passes_through_and_other_errors_are_reraised() -> None:
    async with loop_host() as host:
        failing = ToyAgent(tokens=1, fail_with=AgentError("model_broke", "It broke."))
        received: list[AgentOutput] = []
        with fails_with("model_broke", "It broke."):
            await drive(AsyncioAgentAdapter(agent=failing, host=host), "hi", received=received)
        assert texts(received) == ["tok0 "]

        with pytest.RaisesGroup(pytest.RaisesExc(ValueError, match="^raw$")):
            await drive(
                AsyncioAgentAdapter(
                    agent=ToyAgent(fail_with=ValueError("raw"), tokens=0), host=host
                ),
                "hi",
            )

        odd = ToyAgent(tokens=0, extra=(42,))
        with pytest.RaisesGroup(pytest.RaisesExc(TypeError, match="yielded int")):
            await drive(AsyncioAgentAdapter(agent=odd, host=host), "hi")
        # Failing on the trio side still closes the generator on asyncio.
        assert odd.ended == ["closed"]
        assert asyncio_tasks(host) == set()


async def test_run_without_a_running_loop_host_fails_clearly() -> None:
    host = AsyncioLoopHost()
    adapter = AsyncioAgentAdapter(agent=ToyAgent(), host=host)
    with pytest.RaisesGroup(pytest.RaisesExc(AsyncioLoopNotRunning, match="nursery.start")):
        await drive(adapter, "hi")
    async with trio.open_nursery() as nursery:
        await nursery.start(host.serve)
        assert await drive(adapter, "hi", stop_after=1) == [TextDelta("tok0 ")]
        nursery.cancel_scope.cancel()
    with pytest.RaisesGroup(pytest.RaisesExc(AsyncioLoopNotRunning)):
        await drive(adapter, "hi")


@attrs.define
class ClosableToy(ToyAgent):
    closed_on_asyncio: list[bool] = attrs.field(factory=list)

    async def aclose(self) -> None:
        await asyncio.sleep(0)
        self.closed_on_asyncio.append(asyncio.current_task() is not None)


async def test_adapter_aclose_runs_on_the_loop_and_the_host_closes_the_rest() -> None:
    closed_by_app, left_open = ClosableToy(), ClosableToy()
    async with loop_host() as host:
        first = AsyncioAgentAdapter(agent=closed_by_app, host=host)
        AsyncioAgentAdapter(agent=left_open, host=host)
        await first.aclose()
        assert closed_by_app.closed_on_asyncio == [True]
        assert left_open.closed_on_asyncio == []
    # On its way out the host ran every closer on the loop, once more for
    # the one the app had closed already (closers are idempotent).
    assert closed_by_app.closed_on_asyncio == [True, True]
    assert left_open.closed_on_asyncio == [True]


async def test_adapter_that_owns_the_host_closes_the_agent_once_with_the_loop() -> None:
    toy = ClosableToy()
    host = AsyncioLoopHost()
    adapter = AsyncioAgentAdapter(agent=toy, host=host, owns_host=True)
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            await nursery.start(adapter.serve)
            assert await drive(adapter, "hi", stop_after=1) == [TextDelta("tok0 ")]
            await adapter.aclose()  # serve() returns: the nursery exits uncancelled
            assert not host.running
    assert toy.closed_on_asyncio == [True]


async def refuse_cancellation(refusals: list[str], where: str) -> None:
    """Wait forever, swallowing every CancelledError: asyncio code gone wrong."""
    never = asyncio.Event()
    while True:
        with contextlib.suppress(asyncio.CancelledError):
            await never.wait()
        refusals.append(where)


@attrs.define
class StubbornIterator:
    """An async iterator that yields one token, then ignores cancellation in
    ``__anext__`` and in ``aclose``."""

    refusals: list[str]
    started: bool = False

    def __aiter__(self) -> StubbornIterator:
        return self

    async def __anext__(self) -> str:
        if not self.started:
            self.started = True
            return "tok0 "
        await refuse_cancellation(self.refusals, "step")
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        await refuse_cancellation(self.refusals, "close")


@attrs.define
class StubbornAgent:
    name: str = "stubborn"
    refusals: list[str] = attrs.field(factory=list)

    def stream(self, request: AgentRequest) -> AsyncIterator[AgentOutput | str]:
        return StubbornIterator(self.refusals)


def logged(caplog: pytest.LogCaptureFixture, prefix: str) -> list[str]:
    return [
        record.getMessage() for record in caplog.records if record.getMessage().startswith(prefix)
    ]


async def test_asyncio_code_that_ignores_cancellation_cannot_hang_a_run_or_the_shutdown(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    budget = 1.0
    stubborn = StubbornAgent()
    host = AsyncioLoopHost(shutdown_budget=budget)
    adapter = AsyncioAgentAdapter(agent=stubborn, host=host, cleanup_budget=budget)
    async with trio.open_nursery() as nursery:
        await nursery.start(host.serve)
        cancelled_at = returned_at = 0.0

        async def cancel_when_stuck() -> None:
            nonlocal cancelled_at
            await trio.testing.wait_all_tasks_blocked()
            cancelled_at = trio.current_time()

        def on_returned() -> None:
            nonlocal returned_at
            returned_at = trio.current_time()

        outputs = await drive(adapter, "hi", cancel_when=cancel_when_stuck, on_returned=on_returned)
        assert outputs == [TextDelta("tok0 ")]
        # Cleanup is three shielded waits of at most one budget each (the
        # close's wait ends with its step's), whatever the asyncio code does.
        assert returned_at - cancelled_at <= 3 * budget
        # The step and the close were cancelled, and ignored it.
        assert set(stubborn.refusals) == {"step", "close"}
        assert len(asyncio_tasks(host)) == 2
        refused_in_run = Counter(stubborn.refusals)

        closing_at = trio.current_time()
        with trio.fail_after(WAIT):
            await host.aclose()
        assert trio.current_time() - closing_at <= 3 * budget
        assert not host.running
    # Cancelled once more by the host, then left behind: the step and the close.
    assert Counter(stubborn.refusals) - refused_in_run == Counter(step=1, close=1)
    assert host.abandoned_tasks == 2
    assert len(logged(caplog, "asyncio_task_abandoned count=2 budget_s=1.0 ")) == 1


async def test_host_shutdown_abandons_an_async_generator_that_will_not_close(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    refusals: list[str] = []
    parked: list[AsyncIterator[int]] = []

    async def stubborn_generator() -> AsyncIterator[int]:
        try:
            yield 1
        except GeneratorExit:
            refusals.append("closed")
        # Closed at its yield, it waits forever instead of finishing.
        await refuse_cancellation(refusals, "generator")

    async def park_one() -> None:
        generator = stubborn_generator()
        await anext(generator)
        parked.append(generator)  # alive at its yield until the loop closes

    host = AsyncioLoopHost(shutdown_budget=1.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(host.serve)
        await host.call(park_one)
        with trio.fail_after(WAIT):
            await host.aclose()
    assert refusals == ["closed", "generator"]
    # The generator's aclose() and the loop's shutdown_asyncgens() waiting for it.
    assert host.abandoned_tasks == 2
    assert len(logged(caplog, "asyncio_task_abandoned count=2 budget_s=1.0 ")) == 1


# --- AsyncOpenAI against the fake upstream ---------------------------------------


@asynccontextmanager
async def openai_agent(
    *, read_timeout: float = 30.0, url: str | None = None
) -> AsyncIterator[tuple[AsyncioAgentAdapter, AsyncioLoopHost, FakeUpstream]]:
    async with open_fake_upstream(default_delay=0.002) as fake, loop_host() as host:
        inner = OpenAIAsyncioAgent(
            base_url=f"{url or fake.url}/v1",
            model="fake-model",
            timeouts=UpstreamTimeouts(connect=5.0, read=read_timeout),
        )
        adapter = AsyncioAgentAdapter(agent=inner, host=host)
        try:
            yield adapter, host, fake
        finally:
            await adapter.aclose()
            assert inner.closed


async def request_seen(fake: FakeUpstream, marker: str) -> RequestRecord:
    with trio.fail_after(WAIT):
        return await fake.wait_for_request(lambda record: marker in record.prompt)


async def test_openai_stream_content_usage_and_finish_reason() -> None:
    async with openai_agent() as (agent, host, fake):
        outputs = await drive(agent, "hello there @tokens=5")
        assert texts(outputs) == [token_text(index) for index in range(5)]
        assert outputs[-2:] == [
            StopReason("stop"),
            UsageReport(usage=Usage(prompt_tokens=3, completion_tokens=5)),
        ]
        assert (await request_seen(fake, "hello")).finished
        # openai leaves generators to asyncio's finalizer tasks; the run waited for them.
        assert asyncio_tasks(host) == set()


async def test_openai_cancel_mid_stream_disconnects_the_upstream() -> None:
    async with openai_agent() as (agent, host, fake):
        outputs = await drive(agent, "mid @tokens=1000 @delay=0.01", stop_after=3)
        assert asyncio_tasks(host) == set()
        assert texts(outputs)[:3] == [token_text(index) for index in range(3)]
        record = await request_seen(fake, "mid")
        with trio.fail_after(WAIT):
            await fake.wait_disconnected(record)
        assert record.tokens_sent < 1000


async def test_openai_cancel_while_the_stream_waits_for_a_reader() -> None:
    async with openai_agent() as (agent, host, fake):

        async def upstream_ran_ahead() -> None:
            # The consumer stopped at 2 tokens: the agent holds the third,
            # its generator parked at a yield, while the upstream goes on.
            await fake.wait_for_request(lambda r: "parked" in r.prompt and r.tokens_sent >= 6)

        outputs = await drive(
            agent,
            "parked @tokens=1000 @delay=0.005",
            stop_reading_after=2,
            cancel_when=upstream_ran_ahead,
        )
        assert asyncio_tasks(host) == set()
        assert texts(outputs) == [token_text(0), token_text(1)]
        record = await request_seen(fake, "parked")
        with trio.fail_after(WAIT):
            await fake.wait_disconnected(record)


async def test_openai_cancel_while_upstream_stalls_before_first_byte() -> None:
    async with openai_agent() as (agent, host, fake):

        async def headers_sent() -> None:
            await fake.wait_for_request(lambda record: record.status == 200)

        outputs = await drive(agent, "stalled @stall_first", cancel_when=headers_sent)
        assert asyncio_tasks(host) == set()
        assert outputs == []
        record = await request_seen(fake, "stalled")
        with trio.fail_after(WAIT):
            await fake.wait_disconnected(record)


def closed_port() -> int:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        port: int = listener.getsockname()[1]
    return port


async def test_openai_connection_refused_is_upstream_unavailable() -> None:
    async with openai_agent(url=f"http://127.0.0.1:{closed_port()}") as (agent, host, _):
        with fails_with("upstream_unavailable", "could not be reached"):
            await drive(agent, "hi")
        assert asyncio_tasks(host) == set()


@pytest.mark.parametrize(
    ("prompt", "code", "message", "tokens_first"),
    [
        ("@status=500", "upstream_error", "answered with status 500", 0),
        ("@error_after=2", "upstream_error", "reported an error", 2),
        ("@close_after=2", "upstream_error", "closed the stream before finishing", 2),
        ("@malformed_after=2", "upstream_error", "malformed response", 2),
        ("@stall_after=1", "upstream_timeout", "stopped responding", 1),
    ],
)
async def test_openai_upstream_failures_map_to_agent_errors(
    prompt: str, code: str, message: str, tokens_first: int
) -> None:
    async with openai_agent(read_timeout=0.3) as (agent, host, fake):
        received: list[AgentOutput] = []
        with fails_with(code, message):
            await drive(agent, f"fail {prompt}", received=received)
        assert asyncio_tasks(host) == set()
        assert texts(received) == [token_text(index) for index in range(tokens_first)]
        record = await request_seen(fake, "fail")
        with trio.fail_after(WAIT):
            await fake.wait_ended(record)


# --- what the fake upstream cannot send, through both OpenAI agents ---------------


@asynccontextmanager
async def raw_upstream(body: bytes, *headers: str) -> AsyncIterator[str]:
    """A loopback HTTP server that answers every request with ``body`` as a
    200 event stream (plus ``headers``), then closes the connection. Yields
    its base URL."""

    async def answer(stream: trio.SocketStream) -> None:
        async with stream:
            request = b""
            while b"\r\n\r\n" not in request:
                if not (data := await stream.receive_some()):
                    return
                request += data
            head, _, content = request.partition(b"\r\n\r\n")
            length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            while length is not None and len(content) < int(length[1]):
                if not (data := await stream.receive_some()):
                    return
                content += data
            lines = [
                "HTTP/1.1 200 OK",
                "content-type: text/event-stream",
                f"content-length: {len(body)}",
                "connection: close",
                *headers,
            ]
            await stream.send_all(
                "".join(f"{line}\r\n" for line in lines).encode() + b"\r\n" + body
            )

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, answer, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        try:
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            nursery.cancel_scope.cancel()


def sse(*data: bytes) -> bytes:
    return b"".join(b"data: " + item + b"\n\n" for item in data)


FINISH = sse(b'{"choices":[{"delta":{"content":"ok"},"finish_reason":"stop"}]}', b"[DONE]")
CARRIED_ON = [TextDelta("ok"), StopReason("stop")]
MALFORMED = ("upstream_error", "The model server sent a malformed response.")

# name: (response body, extra response headers, the outputs or the error's code and message)
BOTH_AGENTS = {
    "content-not-a-string": (
        sse(b'{"choices":[{"delta":{"content":5}}]}') + FINISH,
        (),
        CARRIED_ON,
    ),
    "choices-an-object": (
        sse(b'{"choices":{"0":{"delta":{"content":"x"}}}}') + FINISH,
        (),
        CARRIED_ON,
    ),
    "delta-a-string": (sse(b'{"choices":[{"delta":"x"}]}') + FINISH, (), CARRIED_ON),
    "choice-not-an-object": (sse(b'{"choices":[5]}') + FINISH, (), CARRIED_ON),
    "finish-reason-a-number": (
        sse(b'{"choices":[{"delta":{},"finish_reason":5}]}') + FINISH,
        (),
        CARRIED_ON,
    ),
    "usage-empty": (sse(b'{"choices":[],"usage":{}}') + FINISH, (), CARRIED_ON),
    "usage-strings": (
        sse(b'{"usage":{"prompt_tokens":"3","completion_tokens":"4"}}') + FINISH,
        (),
        CARRIED_ON,
    ),
    "chunk-a-list": (sse(b"[]") + FINISH, (), MALFORMED),
    "chunk-a-number": (sse(b"5") + FINISH, (), MALFORMED),
    "chunk-null": (sse(b"null") + FINISH, (), MALFORMED),
    "chunk-not-json": (sse(b"{nope") + FINISH, (), MALFORMED),
    "body-not-gzip": (
        b"these bytes are not gzip",
        ("content-encoding: gzip",),
        ("upstream_error", "The request to the model server failed."),
    ),
}
# The httpx2 agent decodes with U+FFFD for a bad byte and reads a chunk as
# plain JSON; openai decodes strictly and builds a chunk object.
ASYNCIO_AGENT_ONLY = {
    "not-utf-8": (sse(b'{"choices":[{"delta":{"content":"\xff"}}]}') + FINISH, (), MALFORMED),
    "pydantic-control-key": (sse(b'{"_fields_set":5}') + FINISH, (), MALFORMED),
}


@asynccontextmanager
async def agent_for(kind: str, url: str) -> AsyncIterator[Agent]:
    """The ``openai`` (httpx2) or the ``openai-asyncio`` agent, for ``url``."""
    if kind == "openai":
        agent = OpenAICompatAgent(base_url=url, model="fake-model")
        try:
            yield agent
        finally:
            await agent.aclose()
    else:
        async with loop_host() as host:
            inner = OpenAIAsyncioAgent(base_url=url, model="fake-model")
            adapter = AsyncioAgentAdapter(agent=inner, host=host)
            try:
                yield adapter
            finally:
                await adapter.aclose()
            assert asyncio_tasks(host) == set()


@pytest.mark.parametrize(
    ("kind", "body", "headers", "expected"),
    [
        *(
            pytest.param(kind, *case, id=f"{kind}-{name}")
            for name, case in BOTH_AGENTS.items()
            for kind in ("openai", "openai-asyncio")
        ),
        *(
            pytest.param("openai-asyncio", *case, id=f"openai-asyncio-{name}")
            for name, case in ASYNCIO_AGENT_ONLY.items()
        ),
    ],
)
async def test_odd_upstream_bodies_end_the_same_on_both_openai_agents(
    kind: str,
    body: bytes,
    headers: tuple[str, ...],
    expected: list[AgentOutput] | tuple[str, str],
) -> None:
    async with raw_upstream(body, *headers) as url, agent_for(kind, url) as agent:
        if isinstance(expected, list):
            assert await drive(agent, "hi") == expected
        else:
            code, message = expected
            with fails_with(code, message):
                await drive(agent, "hi")


# --- through the engine, in the app's start-up and shutdown order ------------------


async def test_engine_supersede_then_shutdown_in_the_app_order() -> None:
    async with open_fake_upstream(default_delay=0.002) as fake:
        host = AsyncioLoopHost()
        inner = OpenAIAsyncioAgent(base_url=f"{fake.url}/v1", model="fake-model")
        agent = AsyncioAgentAdapter(agent=inner, host=host)
        manager = SessionManager(agent=agent)
        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:
                await nursery.start(host.serve)
                await nursery.start(manager.serve)
                old = await manager.submit("key", "s1", AgentRequest(prompt="old @tokens=1000"))
                old_request = await fake.wait_for_request(
                    lambda r: "old" in r.prompt and r.tokens_sent >= 2
                )
                new = await manager.submit("key", "s1", AgentRequest(prompt="new @tokens=1000"))
                # The old run, its asyncio side included, was over before the
                # new one started.
                assert old.cancel_reason is CancelReason.SUPERSEDED
                assert old.status is RunStatus.CANCELLED
                await fake.wait_disconnected(old_request)
                new_request = await fake.wait_for_request(
                    lambda r: "new" in r.prompt and r.tokens_sent >= 2
                )
                # The upstream never had the two requests open at once.
                assert fake.registry.max_active == 1

                # after_serving: engine, then agents, then the loop host.
                await manager.aclose()
                assert new.status is RunStatus.INTERRUPTED
                await fake.wait_disconnected(new_request)
                assert asyncio_tasks(host) == set()
                await agent.aclose()
                assert inner.closed
                await host.aclose()  # serve() returns: the nursery exits uncancelled
                assert not host.running
