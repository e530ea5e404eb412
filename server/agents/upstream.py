"""What the HTTP-upstream agents share: one httpx2 client, timeouts, and the
translation of every upstream failure into a client-safe :class:`AgentError`.

Cancellation: a run's cancellation reaches the agent inside
``client.stream(...)``; leaving that block closes the response, and httpx2
closes a connection whose body was not read to the end (it cannot go back to
the pool), so the upstream sees the disconnect at once.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import httpx2

from ..core.agent import AgentError, AgentRequest

# Idle upstream connections kept for reuse.
KEEPALIVE_CONNECTIONS = 256

UNAVAILABLE = AgentError("upstream_unavailable", "The model server could not be reached.")


def upstream_timeout() -> AgentError:
    return AgentError("upstream_timeout", "The model server stopped responding.")


def upstream_error(message: str) -> AgentError:
    return AgentError("upstream_error", message)


@attrs.frozen(kw_only=True)
class UpstreamTimeouts:
    connect: float = attrs.field(default=5.0, validator=attrs.validators.gt(0))
    # Longest silence between two bytes of the answer: a stalled upstream
    # fails the run with upstream_timeout after this long.
    read: float = attrs.field(default=60.0, validator=attrs.validators.gt(0))

    def as_timeout(self) -> httpx2.Timeout:
        return httpx2.Timeout(
            connect=self.connect, read=self.read, write=self.read, pool=self.connect
        )


def make_client(
    timeouts: UpstreamTimeouts, headers: dict[str, str] | None = None
) -> httpx2.AsyncClient:
    # The client holds a connection pool and no tasks: it can be shared by
    # every run and closed once with the app. Every streaming run holds one
    # connection for its whole answer, so the pool must not be smaller than
    # the number of concurrent runs (httpx2's default of 100 made the 101st
    # run wait and then fail with a pool timeout); the engine's run limits
    # bound it instead.
    limits = httpx2.Limits(max_connections=None, max_keepalive_connections=KEEPALIVE_CONNECTIONS)
    return httpx2.AsyncClient(
        timeout=timeouts.as_timeout(), headers=headers or {}, limits=limits, trust_env=False
    )


@asynccontextmanager
async def upstream_failures() -> AsyncIterator[None]:
    """Translate transport failures into :class:`AgentError` codes."""
    try:
        yield
    except httpx2.ConnectError:
        raise AgentError(UNAVAILABLE.code, UNAVAILABLE.message) from None
    except httpx2.TimeoutException as exc:
        if isinstance(exc, httpx2.ConnectTimeout):
            raise AgentError(UNAVAILABLE.code, UNAVAILABLE.message) from None
        raise upstream_timeout() from None
    except (httpx2.RemoteProtocolError, httpx2.ReadError):
        raise upstream_error("The model server closed the stream before finishing.") from None
    except httpx2.HTTPError:
        raise upstream_error("The request to the model server failed.") from None


def check_status(response: httpx2.Response) -> None:
    if response.status_code >= 400:
        raise upstream_error(f"The model server answered with status {response.status_code}.")


def parse_json(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise upstream_error("The model server sent a malformed response.") from None
    if not isinstance(value, dict):
        raise upstream_error("The model server sent a malformed response.")
    return value


def chat_messages(request: AgentRequest) -> list[dict[str, str]]:
    """The conversation to send upstream: the request's turns, or its prompt."""
    if request.messages:
        return [{"role": turn.role, "content": turn.content} for turn in request.messages]
    return [{"role": "user", "content": request.prompt}]
