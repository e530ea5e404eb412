"""The built-in ``scripted`` agent: a deterministic answer, paced like a model.

Needs no model: the reply is derived from the prompt (same prompt, same
words), one word per token, ``token_delay`` seconds apart. Pure trio, so a
cancelled run stops it at the next token.
"""

from __future__ import annotations

import hashlib
import random

import attrs
import trio

from ..core.agent import AgentRequest
from ..core.events import AgentOutput, TextDelta, Usage, UsageReport

_VOCABULARY = " ".join(
    (
        "stream session token nursery scope cancel answer prompt channel trio",
        "owner cleanup reply model server client event frame order signal run",
        "structured concurrency bounded shielded deterministic gentle quiet river",
        "harbour lantern meadow orbit pebble quartz timber violet willow",
    )
).split()


def scripted_words(prompt: str, count: int) -> list[str]:
    """The reply to ``prompt``: its first words echoed, then words chosen by
    a generator seeded from the prompt's hash."""
    seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big")
    chooser = random.Random(seed)
    echoed = ["You", "said:", *prompt.split()[:8]]
    words = echoed + [chooser.choice(_VOCABULARY) for _ in range(max(0, count - len(echoed)))]
    return words[:count]


@attrs.frozen(kw_only=True)
class ScriptedAgent:
    token_delay: float = attrs.field(default=0.02, validator=attrs.validators.ge(0))
    reply_words: int = attrs.field(default=120, validator=attrs.validators.ge(1))
    name: str = "scripted"

    async def run(
        self, request: AgentRequest, send_channel: trio.MemorySendChannel[AgentOutput]
    ) -> None:
        words = scripted_words(request.prompt, self.reply_words)
        for index, word in enumerate(words):
            await trio.sleep(self.token_delay)
            await send_channel.send(TextDelta(word if index == 0 else f" {word}"))
        usage = Usage(prompt_tokens=len(request.prompt.split()), completion_tokens=len(words))
        await send_channel.send(UsageReport(usage=usage))
