"""The ``openai`` agent: proxies to any OpenAI-compatible upstream.

Streams ``POST {base}/chat/completions`` with ``stream: true`` and
``stream_options.include_usage``; maps content deltas, the finish reason and
the usage chunk; an ``error`` payload or an ``event: error`` is an upstream
error mid-stream.
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
from ..wire.sse import SseDecoder
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
class OpenAICompatAgent:
    base_url: str = "http://127.0.0.1:11434/v1"
    api_key: str | None = None
    model: str = "gpt-4o-mini"
    timeouts: UpstreamTimeouts = attrs.field(factory=UpstreamTimeouts)
    name: str = "openai"
    _client: httpx2.AsyncClient = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._client = make_client(self.timeouts, headers)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def run(
        self, request: AgentRequest, send_channel: trio.MemorySendChannel[AgentOutput]
    ) -> None:
        body = {
            "model": self.model,
            "messages": chat_messages(request),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        url = self.base_url.rstrip("/") + "/chat/completions"
        decoder = SseDecoder()
        async with upstream_failures(), self._client.stream("POST", url, json=body) as response:
            check_status(response)
            # aclosing: we return from inside the loop, and an async
            # generator left unfinished would be closed only by the GC.
            async with aclosing(cast(AsyncGenerator[str], response.aiter_lines())) as lines:
                async for line in lines:
                    event = decoder.feed(line)
                    if event is None:
                        continue
                    kind, data = event
                    if data == "[DONE]":
                        return
                    payload = parse_json(data)
                    if kind == "error" or payload.get("error"):
                        raise upstream_error("The model server reported an error.")
                    for output in chunk_outputs(payload):
                        await send_channel.send(output)
        raise upstream_error("The model server closed the stream before finishing.")


def chunk_outputs(chunk: dict[str, Any]) -> list[AgentOutput]:
    """What one ``chat.completion.chunk`` contributes to the run."""
    outputs: list[AgentOutput] = []
    choices = chunk.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        choice = choices[0]
        delta = choice.get("delta")
        content = delta.get("content") if isinstance(delta, dict) else None
        if isinstance(content, str) and content:
            outputs.append(TextDelta(content))
        reason = choice.get("finish_reason")
        if isinstance(reason, str) and reason:
            outputs.append(StopReason(reason))
    usage = chunk.get("usage")
    if isinstance(usage, dict):
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if isinstance(prompt, int) and isinstance(completion, int):
            outputs.append(
                UsageReport(
                    usage=Usage(prompt_tokens=max(0, prompt), completion_tokens=max(0, completion))
                )
            )
    return outputs
