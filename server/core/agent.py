"""What an agent is, from the engine's side.

An agent is "prompt in, events out on a send channel": it is handed the
request and the send half of a memory channel, sends :data:`AgentOutput`
values and returns when its answer is complete. It owns nothing else: no
tasks beyond its own call, no state that outlives the call. The run closes
the channel. Cancellation arrives as :class:`trio.Cancelled` at the agent's
next checkpoint and must be allowed to propagate.
"""

from __future__ import annotations

from typing import Protocol

import attrs
import trio

from .errors import AgentError as AgentError
from .events import AgentOutput


@attrs.frozen(kw_only=True)
class ChatTurn:
    role: str
    content: str


@attrs.frozen(kw_only=True)
class AgentRequest:
    prompt: str
    messages: tuple[ChatTurn, ...] = ()
    model: str | None = None


class Agent(Protocol):
    @property
    def name(self) -> str: ...

    async def run(
        self, request: AgentRequest, send_channel: trio.MemorySendChannel[AgentOutput]
    ) -> None: ...


def agent_name(agent: Agent) -> str:
    """The name records give ``agent``: its ``name``, or for an agent that
    has none (the protocol asks for one; the engine does not need it to
    run), its class name."""
    name = getattr(agent, "name", None)
    return name if isinstance(name, str) else type(agent).__name__
