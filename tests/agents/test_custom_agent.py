"""The custom-agent example from docs/agents.md, loaded the way --agent
module:factory loads it."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from server.agents import AgentConfigError, build_agent
from server.cli import parse_settings
from server.core import AgentRequest, RunStatus, SessionManager
from server.settings import Settings


async def test_example_agent_loads_by_module_factory_and_streams(
    autojump_clock: trio.testing.MockClock,
) -> None:
    settings = parse_settings(
        ["--agent", "examples.reverse_agent:make_agent", "--token-delay", "0.5"], environ={}
    )
    agent = build_agent(settings)
    assert agent.name == "reverse"
    manager = SessionManager(agent=agent)
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.serve)
        run = await manager.submit("key-test", None, AgentRequest(prompt="one two three"))
        await run.wait_ended()
        await manager.aclose()
    assert run.status is RunStatus.COMPLETED
    assert run.text == "three two one "
    assert trio.current_time() == pytest.approx(1.5)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("examples.nonesuch:make_agent", "cannot import agent module"),
        ("examples.reverse_agent:nothing_here", "has no callable 'nothing_here'"),
        ("examples.reverse_agent:Settings", "failed: TypeError"),
        ("builtins:str", "did not return an agent"),
    ],
)
def test_bad_custom_agent_is_a_clear_configuration_error(spec: str, message: str) -> None:
    with pytest.raises(AgentConfigError, match=message):
        build_agent(Settings(agent=spec))
