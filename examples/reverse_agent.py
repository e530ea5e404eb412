"""A custom agent: answers with the prompt's words in reverse order.

Run it with:  python -m server --agent examples.reverse_agent:make_agent
"""

import trio

from server.core.agent import AgentRequest
from server.core.events import AgentOutput, TextDelta
from server.settings import Settings


class ReverseAgent:
    name = "reverse"

    def __init__(self, delay: float) -> None:
        self.delay = delay

    async def run(
        self, request: AgentRequest, send_channel: trio.MemorySendChannel[AgentOutput]
    ) -> None:
        for word in reversed(request.prompt.split()):
            await trio.sleep(self.delay)  # a checkpoint: a cancelled run stops here
            await send_channel.send(TextDelta(word + " "))


def make_agent(settings: Settings) -> ReverseAgent:
    return ReverseAgent(delay=settings.token_delay)
