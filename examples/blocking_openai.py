"""A blocking agent: an OpenAI-compatible upstream read with a *synchronous*
HTTP client, the way a sync SDK would, run through the blocking adapter.

Run it with:
    python -m server --agent examples.blocking_openai:make_agent \\
        --upstream-url http://127.0.0.1:11434/v1 --model llama3.2

Cancellation: the adapter stops handing tokens over at once and calls
:meth:`UpstreamStream.interrupt`, which shuts the socket down under the
blocked call (the socket is caught as soon as it connects, so this works
even while the upstream holds back its headers); the thread returns and the
upstream sees the disconnect.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import Any

import httpx2
import trio

from server.agents.blocking import BlockingAgent
from server.agents.openai_compat import chunk_outputs
from server.agents.upstream import UNAVAILABLE, chat_messages, parse_json, upstream_error
from server.core.agent import AgentError, AgentRequest
from server.core.events import AgentOutput
from server.settings import Settings
from server.wire.sse import SseDecoder

CLOSED_EARLY = "The model server closed the stream before finishing."


class UpstreamStream:
    def __init__(self, client: httpx2.Client, url: str, body: dict[str, Any]) -> None:
        self.client, self.url, self.body = client, url, body
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None
        self._interrupted = False

    def __iter__(self) -> Iterator[AgentOutput]:
        decoder = SseDecoder()
        try:
            with self.client.stream(
                "POST", self.url, json=self.body, extensions={"trace": self._trace}
            ) as response:
                if response.status_code >= 400:
                    raise upstream_error(
                        f"The model server answered with status {response.status_code}."
                    )
                for line in response.iter_lines():
                    event = decoder.feed(line)
                    if event is None:
                        continue
                    if event[1] == "[DONE]":
                        return
                    payload = parse_json(event[1])
                    if event[0] == "error" or payload.get("error"):
                        raise upstream_error("The model server reported an error.")
                    yield from chunk_outputs(payload)
        except httpx2.ConnectError:
            raise AgentError(UNAVAILABLE.code, UNAVAILABLE.message) from None
        except httpx2.TimeoutException:
            raise AgentError("upstream_timeout", "The model server stopped responding.") from None
        except httpx2.HTTPError:
            if self._interrupted:
                return
            raise upstream_error(CLOSED_EARLY) from None
        if not self._interrupted:
            raise upstream_error(CLOSED_EARLY)

    def _trace(self, event: str, info: dict[str, Any]) -> None:
        # httpcore's trace hook: catch the socket the moment it connects.
        if event == "connection.connect_tcp.complete":
            stream = info.get("return_value")
            sock = stream.get_extra_info("socket") if stream is not None else None
            with self._lock:
                self._socket = sock
                if self._interrupted and sock is not None:
                    _shut(sock)

    def interrupt(self) -> None:
        """Called from the trio thread when the run is cancelled."""
        with self._lock:
            self._interrupted = True
            if self._socket is not None:
                _shut(self._socket)


def _shut(sock: socket.socket) -> None:
    # Wakes a call blocked on this socket (close() alone would not).
    with contextlib.suppress(OSError):  # already closed: nothing to wake
        sock.shutdown(socket.SHUT_RDWR)


def make_agent(settings: Settings) -> BlockingAgent:
    # One client for every run (its pool is thread-safe): building one costs
    # tens of milliseconds, mostly its TLS context.
    headers = {"Authorization": f"Bearer {settings.upstream_key}"} if settings.upstream_key else {}
    client = httpx2.Client(
        timeout=httpx2.Timeout(settings.upstream_timeout, connect=settings.connect_timeout),
        headers=headers,
        trust_env=False,
    )
    url = settings.upstream_url.rstrip("/") + "/chat/completions"

    def generate(request: AgentRequest) -> UpstreamStream:
        body = {
            "model": settings.model or "gpt-4o-mini",
            "messages": chat_messages(request),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        return UpstreamStream(client, url, body)

    return BlockingAgent(
        generate=generate,
        name="blocking-openai",
        grace=settings.cleanup_budget,
        limiter=trio.CapacityLimiter(settings.thread_limit),
        close=client.close,
    )
