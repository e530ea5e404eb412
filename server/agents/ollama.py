"""The ``ollama`` agent: streams ``POST {base}/api/chat`` (NDJSON).

Each line carries ``message.content``; the last has ``done: true`` with
``done_reason`` and the token counts that become ``usage``. A line with an
``error`` field is an upstream error mid-stream.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any, cast

import attrs
import httpx2
import trio

from ..core.agent import AgentRequest
from ..core.events import AgentOutput, StopReason, TextDelta, Usage, UsageReport
from .upstream import (
    UpstreamTimeouts,
    chat_messages,
    check_status,
    make_client,
    parse_json,
    upstream_error,
    upstream_failures,
)


@attrs.define(kw_only=True)
class OllamaAgent:
    base_url: str = "http://127.0.0.1:11434"
    model: str = "llama3.2"
    timeouts: UpstreamTimeouts = attrs.field(factory=UpstreamTimeouts)
    name: str = "ollama"
    _client: httpx2.AsyncClient = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._client = make_client(self.timeouts)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def run(
        self, request: AgentRequest, send_channel: trio.MemorySendChannel[AgentOutput]
    ) -> None:
        body = {"model": self.model, "messages": chat_messages(request), "stream": True}
        url = self.base_url.rstrip("/") + "/api/chat"
        async with upstream_failures(), self._client.stream("POST", url, json=body) as response:
            check_status(response)
            # aclosing: we return from inside the loop, and an async
            # generator left unfinished would be closed only by the GC.
            async with aclosing(cast(AsyncGenerator[str], response.aiter_lines())) as lines:
                async for line in lines:
                    if not line.strip():
                        continue
                    data = parse_json(line)
                    if "error" in data:
                        raise upstream_error("The model server reported an error.")
                    content = _content(data)
                    if content:
                        await send_channel.send(TextDelta(content))
                    if data.get("done") is True:
                        await _send_final(data, send_channel)
                        return
        raise upstream_error("The model server closed the stream before finishing.")


def _content(data: dict[str, Any]) -> str:
    message = data.get("message")
    content = message.get("content") if isinstance(message, dict) else None
    return content if isinstance(content, str) else ""


async def _send_final(
    data: dict[str, Any], send_channel: trio.MemorySendChannel[AgentOutput]
) -> None:
    prompt_tokens, completion_tokens = data.get("prompt_eval_count"), data.get("eval_count")
    if isinstance(prompt_tokens, int) and isinstance(completion_tokens, int):
        usage = Usage(
            prompt_tokens=max(0, prompt_tokens), completion_tokens=max(0, completion_tokens)
        )
        await send_channel.send(UsageReport(usage=usage))
    reason = data.get("done_reason")
    if isinstance(reason, str) and reason:
        await send_channel.send(StopReason(reason))
