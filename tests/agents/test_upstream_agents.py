"""The HTTP-upstream agents against a fake upstream that is a real HTTP
server on loopback, driven through the engine (real time: real sockets).

Every "the upstream saw the disconnect" below is observed by the fake from
its own side of the connection."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import trio

from server.agents import build_agent
from server.agents.ollama import OllamaAgent
from server.agents.openai_compat import OpenAICompatAgent
from server.agents.upstream import UpstreamTimeouts
from server.core import AgentRequest, CancelReason, RunStatus, SessionManager
from server.core.agent import Agent
from server.core.events import RunFailed
from server.core.run import Run
from server.settings import Settings
from tests.fakes import FakeUpstream, RequestRecord, open_fake_upstream, token_text
from tests.helpers import assert_well_formed

PRINCIPAL = "key-test"
WAIT = 10  # seconds: generous bound for anything that should be prompt

MakeAgent = Callable[[str, UpstreamTimeouts], Agent]


def make_ollama(url: str, timeouts: UpstreamTimeouts) -> Agent:
    return OllamaAgent(base_url=url, model="fake-model", timeouts=timeouts)


def make_openai(url: str, timeouts: UpstreamTimeouts) -> Agent:
    return OpenAICompatAgent(base_url=f"{url}/v1", model="fake-model", timeouts=timeouts)


def make_blocking(url: str, timeouts: UpstreamTimeouts) -> Agent:
    settings = Settings(
        agent="examples.blocking_openai:make_agent",
        upstream_url=f"{url}/v1",
        upstream_timeout=timeouts.read,
        cleanup_budget=5.0,
    )
    return build_agent(settings)


def make_openai_asyncio(url: str, timeouts: UpstreamTimeouts) -> Agent:
    settings = Settings(
        agent="openai-asyncio",
        upstream_url=f"{url}/v1",
        upstream_timeout=timeouts.read,
        connect_timeout=timeouts.connect,
    )
    return build_agent(settings)


AGENTS = [  # every built-in upstream agent
    pytest.param(make_ollama, id="ollama"),
    pytest.param(make_openai, id="openai"),
    pytest.param(make_openai_asyncio, id="openai-asyncio"),
]
# ...and the blocking example, which shares their parsing and error mapping.
CANCELLABLE = [*AGENTS, pytest.param(make_blocking, id="blocking")]


@asynccontextmanager
async def engine(
    make_agent: MakeAgent, *, read_timeout: float = 30.0
) -> AsyncIterator[tuple[SessionManager, FakeUpstream]]:
    async with open_fake_upstream(default_delay=0.005) as fake:
        agent = make_agent(fake.url, UpstreamTimeouts(connect=5.0, read=read_timeout))
        manager = SessionManager(agent=agent)
        async with trio.open_nursery() as nursery:
            serve_agent = getattr(agent, "serve", None)  # the asyncio loop's host
            if serve_agent is not None:
                await nursery.start(serve_agent)
            await nursery.start(manager.serve)
            try:
                yield manager, fake
            finally:
                with trio.move_on_after(WAIT, shield=True):
                    await manager.aclose()
                    aclose = getattr(agent, "aclose", None)
                    if aclose is not None:
                        await aclose()


async def first_delta(run: Run) -> str:
    with run.subscribe() as subscription, trio.fail_after(WAIT):
        while True:
            for event in subscription.take():
                if event.type == "run.delta":
                    return event.text  # type: ignore[union-attr]
            await subscription.wait()


async def upstream_request(fake: FakeUpstream, marker: str) -> RequestRecord:
    with trio.fail_after(WAIT):
        return await fake.wait_for_request(lambda record: marker in record.prompt)


@pytest.mark.parametrize("make_agent", AGENTS)
async def test_stream_content_usage_and_finish_reason(make_agent: MakeAgent) -> None:
    async with engine(make_agent) as (manager, fake):
        run = await manager.submit(PRINCIPAL, "s1", AgentRequest(prompt="hello @tokens=5"))
        with trio.fail_after(WAIT):
            await run.wait_ended()
        assert run.status is RunStatus.COMPLETED, run.terminal
        assert run.text == "".join(token_text(index) for index in range(5))
        assert run.usage is not None and run.usage.completion_tokens == 5
        assert run.finish_reason == "stop"
        assert_well_formed(run.log.events)
        assert (await upstream_request(fake, "hello")).finished


@pytest.mark.parametrize("stall", ["@stall_after=2", "@stall_first", "@stall_headers"])
@pytest.mark.parametrize("make_agent", CANCELLABLE)
async def test_supersede_closes_the_old_upstream_and_the_new_run_streams(
    make_agent: MakeAgent, stall: str
) -> None:
    async with engine(make_agent) as (manager, fake):
        old = await manager.submit(PRINCIPAL, "s1", AgentRequest(prompt=f"old {stall}"))
        old_request = await upstream_request(fake, "old")
        if stall != "@stall_headers":
            with trio.fail_after(WAIT):
                await fake.wait_for_request(
                    lambda record: record is old_request and record.status is not None
                )
        new = await manager.submit(PRINCIPAL, "s1", AgentRequest(prompt="new @tokens=3"))
        # The old run had ended, and the fake saw its connection go, before
        # the new run started.
        assert old.status is RunStatus.CANCELLED
        assert old.cancel_reason is CancelReason.SUPERSEDED
        with trio.fail_after(WAIT):
            await fake.wait_disconnected(old_request)
        assert await first_delta(new) == token_text(0)
        with trio.fail_after(WAIT):
            await new.wait_ended()
        assert new.status is RunStatus.COMPLETED


@pytest.mark.parametrize(
    "reason", [CancelReason.CLIENT_STOP, CancelReason.CLIENT_DISCONNECT, CancelReason.SHUTDOWN]
)
@pytest.mark.parametrize("make_agent", CANCELLABLE)
async def test_stop_and_disconnect_close_the_upstream(
    make_agent: MakeAgent, reason: CancelReason
) -> None:
    async with engine(make_agent) as (manager, fake):
        run = await manager.submit(PRINCIPAL, "s1", AgentRequest(prompt="long @stall_after=1"))
        await first_delta(run)
        run.cancel(reason)
        with trio.fail_after(WAIT):
            await run.wait_ended()
            await fake.wait_disconnected(await upstream_request(fake, "long"))
        assert run.cancel_reason is reason


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize(
    ("directive", "code"),
    [
        ("@status=500", "upstream_error"),
        ("@status=404", "upstream_error"),
        ("@error_after=2", "upstream_error"),
        ("@malformed_after=2", "upstream_error"),
        ("@close_after=2", "upstream_error"),
        ("@stall_after=1", "upstream_timeout"),
        ("@stall_first", "upstream_timeout"),
    ],
)
@pytest.mark.parametrize("make_agent", CANCELLABLE)
async def test_upstream_failure_fails_the_run_and_the_session_stays_usable(
    make_agent: MakeAgent, directive: str, code: str
) -> None:
    async with engine(make_agent, read_timeout=0.3) as (manager, _fake):
        run = await manager.submit(PRINCIPAL, "s1", AgentRequest(prompt=f"bad {directive}"))
        with trio.fail_after(WAIT):
            await run.wait_ended()
        assert isinstance(run.terminal, RunFailed), run.terminal
        assert run.terminal.error.code == code
        assert_well_formed(run.log.events)
        again = await manager.submit(PRINCIPAL, "s1", AgentRequest(prompt="good @tokens=2"))
        with trio.fail_after(WAIT):
            await again.wait_ended()
        assert again.status is RunStatus.COMPLETED


@pytest.mark.parametrize("make_agent", CANCELLABLE)
async def test_unreachable_upstream_is_upstream_unavailable(make_agent: MakeAgent) -> None:
    agent = make_agent(f"http://127.0.0.1:{closed_port()}", UpstreamTimeouts(connect=2.0))
    manager = SessionManager(agent=agent)
    async with trio.open_nursery() as nursery:
        serve_agent = getattr(agent, "serve", None)
        if serve_agent is not None:
            await nursery.start(serve_agent)
        await nursery.start(manager.serve)
        run = await manager.submit(PRINCIPAL, "s1", AgentRequest(prompt="anyone there?"))
        with trio.fail_after(WAIT):
            await run.wait_ended()
        assert isinstance(run.terminal, RunFailed)
        assert run.terminal.error.code == "upstream_unavailable"
        await manager.aclose()
        await agent.aclose()  # type: ignore[attr-defined]


@pytest.mark.parametrize("make_agent", AGENTS)
async def test_more_concurrent_runs_than_a_default_connection_pool(make_agent: MakeAgent) -> None:
    # Each streaming run holds an upstream connection for its whole answer;
    # a pool capped at httpx2's default of 100 queued the rest until a pool
    # timeout failed them.
    runs = 150
    async with engine(make_agent) as (manager, fake):
        for index in range(runs):
            await manager.submit(PRINCIPAL, f"s{index}", AgentRequest(prompt="wait @stall_first"))
        with trio.fail_after(WAIT):
            await fake.registry.wait_until(lambda: fake.registry.active == runs)
