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
the same codes and wording as the httpx2 agents (:mod:`.upstream`), mostly
by the same code: ``openai`` wraps httpx2's exception (it is the
``__cause__``), which :func:`.upstream.upstream_failures` translates, and an
error status goes through :func:`.upstream.check_status`. So: unreachable
(refused, connect timeout) ``upstream_unavailable``; silent for longer than
the read timeout ``upstream_timeout``; an error status, an in-stream error,
a body that does not decode, a malformed chunk or a stream cut short
``upstream_error``. Chunks are checked field by field by the ``openai``
agent's own parser (:func:`.openai_compat.chunk_outputs`): ``openai`` builds
chunk objects without validating them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

import attrs
import httpx2
import openai
from openai import AsyncOpenAI, AsyncStream
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam

from ..core.agent import AgentError, AgentRequest
from ..core.events import AgentOutput, StopReason
from .openai_compat import chunk_outputs
from .upstream import (
    UNAVAILABLE,
    UpstreamTimeouts,
    chat_messages,
    check_status,
    make_client,
    upstream_error,
    upstream_failures,
    upstream_timeout,
)

# Worded as the httpx2 agents word them where they raise them (.upstream,
# .openai_compat do not name them); the tests hold both agents to the same words.
CLOSED_EARLY = "The model server closed the stream before finishing."
MALFORMED = "The model server sent a malformed response."
REPORTED = "The model server reported an error."


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
        async with openai_failures():
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
                async with openai_failures():
                    try:
                        item = await anext(chunks)
                    except StopAsyncIteration:
                        break
                    except ValueError:
                        # openai decodes the body (UTF-8, then JSON) without
                        # catching UnicodeDecodeError or JSONDecodeError.
                        raise upstream_error(MALFORMED) from None
                for output in chunk_outputs(chunk_payload(item)):
                    finished = finished or isinstance(output, StopReason)
                    yield output
        finally:
            await _close_stream(chunks)
        if not finished:
            raise upstream_error(CLOSED_EARLY)


async def _close_stream(chunks: AsyncStream[ChatCompletionChunk]) -> None:
    """Close the stream's chunk generator, then the response.

    ``AsyncStream.close()`` (like ``async with``) only closes the response,
    and openai has no public way to close the generator that parses it: we
    reach for its private ``_iterator``, and do without if it is gone. Left
    open, that generator would be finalized by a task that asyncio starts
    whenever the garbage collector gets to it, possibly outside the run or
    after the loop closed. (Its inner generators still are, after a close at
    a ``yield``; the adapter waits for those, started within the run.)"""
    iterator = getattr(chunks, "_iterator", None)
    if isinstance(iterator, AsyncGenerator):
        await iterator.aclose()
    await chunks.close()


def chunk_payload(item: object) -> dict[str, Any]:
    """A streamed chunk as the JSON object it came as, for
    :func:`.openai_compat.chunk_outputs` to check field by field.

    openai builds a chunk without validating it: ``data: []`` streams a list,
    ``"content": 5`` an int where the type says ``str``. Anything but a chunk
    object is malformed; a chunk's fields, whatever their types, are dumped
    back as they were sent (``exclude_unset``, no serializer warnings)."""
    if not isinstance(item, ChatCompletionChunk):
        raise upstream_error(MALFORMED)
    try:
        return item.model_dump(warnings=False, exclude_unset=True)
    except (TypeError, ValueError):  # keys pydantic reads itself, such as "_fields_set"
        raise upstream_error(MALFORMED) from None


@asynccontextmanager
async def openai_failures() -> AsyncIterator[None]:
    """Translate what the ``openai`` client raises into :class:`AgentError`,
    as the httpx2 agents would for the same failure.

    openai wraps httpx2's exception (the ``__cause__`` of its
    ``APIConnectionError`` and ``APITimeoutError``) and on some paths lets it
    through unwrapped: either way :func:`.upstream.upstream_failures` maps
    it (connect failure or connect timeout ``upstream_unavailable``, other
    timeout ``upstream_timeout``, connection cut short or any other httpx2
    failure, such as a body that does not decompress, ``upstream_error``).
    Use it around calls into openai only, never around a ``yield``."""
    try:
        async with upstream_failures():
            try:
                yield
            except openai.APIError as exc:
                if isinstance(exc.__cause__, httpx2.HTTPError):
                    raise exc.__cause__ from None
                if isinstance(exc, openai.APIStatusError):
                    check_status(exc.response)
                raise
    except openai.APIError as exc:
        raise agent_error(exc) from None


def agent_error(exc: openai.APIError) -> AgentError:
    """The client-safe :class:`AgentError` for an ``openai`` API failure that
    has no httpx2 failure or error status behind it (those go through
    :func:`openai_failures`)."""
    if isinstance(exc, openai.APITimeoutError):
        return upstream_timeout()
    if isinstance(exc, openai.APIConnectionError):
        # TLS failures that openai catches itself (ssl.SSLError, anyio.EndOfStream).
        return AgentError(UNAVAILABLE.code, UNAVAILABLE.message)
    if isinstance(exc, openai.APIResponseValidationError):
        return upstream_error(MALFORMED)
    # An ``error`` payload in the stream.
    return upstream_error(REPORTED)
