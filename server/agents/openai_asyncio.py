"""The ``openai-asyncio`` agent: an OpenAI-compatible upstream through the
official ``openai`` package's :class:`~openai.AsyncOpenAI` client.

This is an asyncio agent (see :mod:`.asyncio_adapter`): ``stream`` runs on
the app's trio-asyncio loop and is driven by an :class:`AsyncioAgentAdapter`,
which cancels it (``CancelledError`` at its current ``await``) and closes it
(``aclose``) when the run is cancelled. Both end in the ``finally`` below,
which closes the upstream response: the connection is dropped and the
upstream sees the disconnect at once.

Resource handling: the client (and its connection pool) is created on the
loop at the first run and closed on the loop by :meth:`aclose`. It retries
nothing (``max_retries=0``): a failure is reported, not hidden.

Error handling: every upstream failure becomes an :class:`AgentError` with
the same codes and wording as the httpx2 agents (:mod:`.upstream`):
unreachable (refused, connect timeout) ``upstream_unavailable``; silent for
longer than the read timeout ``upstream_timeout``; an error status, an
in-stream error, a malformed chunk or a stream cut short ``upstream_error``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import cast

import attrs
import httpx2
import openai
from openai import AsyncOpenAI, AsyncStream
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam

from ..core.agent import AgentError, AgentRequest
from ..core.events import AgentOutput, StopReason, TextDelta, Usage, UsageReport
from .ollama import chat_messages
from .upstream import UNAVAILABLE, UpstreamTimeouts, make_client, upstream_error, upstream_timeout

CLOSED_EARLY = "The model server closed the stream before finishing."
MALFORMED = "The model server sent a malformed response."


@attrs.define(kw_only=True, eq=False)
class OpenAIAsyncioAgent:
    base_url: str = "http://127.0.0.1:11434/v1"
    api_key: str | None = None
    model: str = "gpt-4o-mini"
    timeouts: UpstreamTimeouts = attrs.field(factory=UpstreamTimeouts)
    name: str = "openai-asyncio"
    _client: AsyncOpenAI | None = attrs.field(default=None, init=False)
    _closed: bool = attrs.field(default=False, init=False)

    @property
    def closed(self) -> bool:
        return self._closed

    def _loop_client(self) -> AsyncOpenAI:
        """The client, created on first use. Call on the asyncio loop only."""
        asyncio.get_running_loop()  # RuntimeError off the loop
        if self._closed:
            raise RuntimeError("the openai-asyncio agent is closed")
        if self._client is None:
            self._client = AsyncOpenAI(
                base_url=self.base_url,
                # The client insists on a key; a keyless upstream ignores it.
                api_key=self.api_key or "unused",
                max_retries=0,
                timeout=self.timeouts.as_timeout(),
                # Ours, not the default: no proxy or certificate settings from the environment.
                http_client=make_client(self.timeouts),
            )
        return self._client

    async def aclose(self) -> None:
        """Close the client. An asyncio coroutine: run it on the loop (the
        adapter's ``aclose`` does). Idempotent."""
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def stream(self, request: AgentRequest) -> AsyncIterator[AgentOutput]:
        client = self._loop_client()
        messages = cast("list[ChatCompletionMessageParam]", chat_messages(request))
        finished = False
        try:
            chunks = await client.chat.completions.create(
                model=self.model,
                messages=messages,
                stream=True,
                stream_options={"include_usage": True},
            )
            try:
                # ``anext`` rather than ``async for chunk in chunks``: the
                # stream's ``__aiter__`` is one more async generator to close.
                while True:
                    try:
                        chunk = await anext(chunks)
                    except StopAsyncIteration:
                        break
                    for output in chunk_outputs(chunk):
                        finished = finished or isinstance(output, StopReason)
                        yield output
            finally:
                await _close_stream(chunks)
        except openai.OpenAIError as exc:
            raise agent_error(exc) from None
        except json.JSONDecodeError:
            raise upstream_error(MALFORMED) from None
        if not finished:
            raise upstream_error(CLOSED_EARLY)


async def _close_stream(chunks: AsyncStream[ChatCompletionChunk]) -> None:
    """Close the stream's own chunk generator (``AsyncStream.close()`` only
    closes the response), then the response. Left open, the generator would
    be finalized by a task asyncio starts, which the adapter must then wait
    for; its inner generators still are, after a close at a ``yield``."""
    iterator = getattr(chunks, "_iterator", None)
    if isinstance(iterator, AsyncGenerator):
        await iterator.aclose()
    await chunks.close()


def agent_error(exc: openai.OpenAIError) -> AgentError:
    """The client-safe :class:`AgentError` for an ``openai`` failure."""
    cause = exc.__cause__
    if isinstance(exc, openai.APITimeoutError):
        if isinstance(cause, httpx2.ConnectTimeout):
            return AgentError(UNAVAILABLE.code, UNAVAILABLE.message)
        return upstream_timeout()
    if isinstance(exc, openai.APIConnectionError):
        if isinstance(cause, httpx2.RemoteProtocolError | httpx2.ReadError):
            return upstream_error(CLOSED_EARLY)
        return AgentError(UNAVAILABLE.code, UNAVAILABLE.message)
    if isinstance(exc, openai.APIStatusError):
        return upstream_error(f"The model server answered with status {exc.status_code}.")
    if isinstance(exc, openai.APIResponseValidationError):
        return upstream_error(MALFORMED)
    if isinstance(exc, openai.APIError):
        # An error payload or ``event: error`` in the stream.
        return upstream_error("The model server reported an error.")
    return upstream_error("The request to the model server failed.")


def chunk_outputs(chunk: ChatCompletionChunk) -> list[AgentOutput]:
    """What one ``chat.completion.chunk`` contributes to the run."""
    outputs: list[AgentOutput] = []
    if chunk.choices:
        choice = chunk.choices[0]
        if choice.delta.content:
            outputs.append(TextDelta(choice.delta.content))
        if choice.finish_reason:
            outputs.append(StopReason(choice.finish_reason))
    if chunk.usage is not None:
        outputs.append(
            UsageReport(
                usage=Usage(
                    prompt_tokens=max(0, chunk.usage.prompt_tokens),
                    completion_tokens=max(0, chunk.usage.completion_tokens),
                )
            )
        )
    return outputs
