"""A misbehaving agent for the fault tests, loaded the way an operator loads
one: ``--agent tests.faults.agents:make_agent``.

The prompt says how it misbehaves (words ``key=value``):

* ``tokens=N``: answer N words (default 20), ``--token-delay`` apart;
* ``raise_after=N``: raise a plain exception after N words (the server must
  report ``agent_error`` and never the exception text, :data:`SECRET`);
* ``cleanup=S``: when cancelled, take S seconds to clean up (shielded, as an
  agent closing an upstream connection would), so a run stays in its
  cleaning phase long enough to disconnect from, supersede or SIGTERM.
"""

from __future__ import annotations

import trio

from server.core.agent import AgentRequest
from server.core.events import AgentOutput, TextDelta
from server.settings import Settings

# Text of the exception the agent raises; it must never reach a client.
SECRET = "secret-internal-detail"


class AgentCrashed(Exception):
    pass


def _options(prompt: str) -> dict[str, str]:
    return dict(word.split("=", 1) for word in prompt.split() if "=" in word)


class FaultyAgent:
    name = "faulty"

    def __init__(self, delay: float) -> None:
        self.delay = delay

    async def run(
        self, request: AgentRequest, send_channel: trio.MemorySendChannel[AgentOutput]
    ) -> None:
        options = _options(request.prompt)
        tokens = int(options.get("tokens", "20"))
        raise_after = int(options["raise_after"]) if "raise_after" in options else None
        cleanup = float(options.get("cleanup", "0"))
        try:
            for index in range(tokens):
                if index == raise_after:
                    raise AgentCrashed(SECRET)
                await trio.sleep(self.delay)
                await send_channel.send(TextDelta(f"w{index} "))
        finally:
            if cleanup:
                # Bounded by its own deadline, well inside the cleanup budget.
                with trio.move_on_after(cleanup, shield=True):
                    await trio.sleep(cleanup)


def make_agent(settings: Settings) -> FaultyAgent:
    return FaultyAgent(delay=settings.token_delay)
