"""A blocking agent: an OpenAI-compatible upstream read with a *synchronous*
HTTP client, the way a sync SDK would, run through the blocking adapter.

Run it with:
    python -m server --agent examples.blocking_openai:make_agent \\
        --upstream-url http://127.0.0.1:11434/v1 --model llama3.2

Cancellation: the adapter stops handing tokens over at once and calls
:meth:`UpstreamStream.interrupt`, which shuts the socket down under the
blocked read, so the thread returns and the upstream sees the disconnect
even while it is stalled.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Iterator

import httpx2

from server.agents.blocking import BlockingAgent
from server.core.agent import AgentError, AgentRequest
from server.settings import Settings
from server.wire.sse import SseDecoder


class UpstreamStream:
    def __init__(self, client: httpx2.Client, base_url: str, model: str, prompt: str) -> None:
        self.client = client
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.body = {
            "model": model,
            "stream": True,
            "messages": [{"role": "user", "content": prompt}],
        }
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None
        self._interrupted = False

    def __iter__(self) -> Iterator[str]:
        decoder = SseDecoder()
        try:
            with self.client.stream("POST", self.url, json=self.body) as response:
                self._attach(response.extensions["network_stream"].get_extra_info("socket"))
                if response.status_code >= 400:
                    raise AgentError(
                        "upstream_error", f"The model server answered {response.status_code}."
                    )
                for line in response.iter_lines():
                    event = decoder.feed(line)
                    if event is None:
                        continue
                    if event[1] == "[DONE]":
                        return
                    choices = json.loads(event[1]).get("choices") or [{}]
                    text = (choices[0].get("delta") or {}).get("content")
                    if text:
                        yield text
        except httpx2.TimeoutException:
            raise AgentError("upstream_timeout", "The model server stopped responding.") from None
        except httpx2.HTTPError:
            if self._interrupted:
                return
            raise AgentError(
                "upstream_unavailable", "The model server could not be reached."
            ) from None

    def _attach(self, sock: socket.socket) -> None:
        with self._lock:
            self._socket = sock
            if self._interrupted:
                _shut(sock)

    def interrupt(self) -> None:
        """Called from the trio thread when the run is cancelled."""
        with self._lock:
            self._interrupted = True
            if self._socket is not None:
                _shut(self._socket)


def _shut(sock: socket.socket) -> None:
    # Wakes a read blocked on this socket (close() alone would not).
    with contextlib.suppress(OSError):  # already closed: nothing to wake
        sock.shutdown(socket.SHUT_RDWR)


def make_agent(settings: Settings) -> BlockingAgent:
    # One client for every run (its pool is thread-safe): building one costs
    # tens of milliseconds, mostly its TLS context.
    client = httpx2.Client(timeout=httpx2.Timeout(5.0, read=settings.upstream_timeout))

    def generate(request: AgentRequest) -> UpstreamStream:
        model = settings.model or "gpt-4o-mini"
        return UpstreamStream(client, settings.upstream_url, model, request.prompt)

    return BlockingAgent(
        generate=generate,
        name="blocking-openai",
        grace=settings.cleanup_budget,
        close=client.close,
    )
