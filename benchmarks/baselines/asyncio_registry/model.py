"""The old agent: a blocking HTTP client streaming the upstream's OpenAI SSE
inside ``asyncio.to_thread``, tokens handed to the event loop through
``loop.call_soon_threadsafe``. Reproduced as it was (see the package
docstring): cancellation cannot interrupt a blocked read."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from typing import Any

import httpx2

from .registry import StreamHandle

# Queue items besides token strings.
DONE = object()


class UpstreamError(Exception):
    pass


class BlockingModelClient:
    """A synchronous OpenAI-compatible streaming client (httpx2's sync Client)."""

    def __init__(self, base_url: str, *, api_key: str | None, read_timeout: float | None) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        # No pool cap: the default thread pool is the old design's limit, not this.
        self._http = httpx2.Client(
            timeout=httpx2.Timeout(10.0, read=read_timeout),
            limits=httpx2.Limits(max_connections=None, max_keepalive_connections=None),
        )
        self._counter_lock = threading.Lock()
        self.in_flight = 0

    def close(self) -> None:
        self._http.close()

    def stream_chat(
        self,
        messages: list[Any],
        model: str,
        cancel_flag: threading.Event,
        push: Callable[[str], None],
    ) -> None:
        """Blocking: stream one reply, ``push`` each content delta. Runs in a
        worker thread; looks at ``cancel_flag`` only between SSE lines."""
        with self._counter_lock:
            self.in_flight += 1
        try:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            body = {"model": model, "messages": messages, "stream": True}
            with self._http.stream(
                "POST", f"{self.base_url}/chat/completions", json=body, headers=headers
            ) as response:
                if response.status_code != 200:
                    response.read()
                    raise UpstreamError(f"upstream status {response.status_code}")
                for line in response.iter_lines():
                    if cancel_flag.is_set():
                        return
                    if not line.startswith("data:"):
                        continue
                    data = line[len("data:") :].strip()
                    if data == "[DONE]":
                        return
                    choices = json.loads(data).get("choices") or [{}]
                    content = (choices[0].get("delta") or {}).get("content")
                    if content:
                        push(content)
        finally:
            with self._counter_lock:
                self.in_flight -= 1


async def run_agent(
    handle: StreamHandle, client: BlockingModelClient, messages: list[Any], model: str
) -> None:
    """The agent task: takes the session's model lock, runs the blocking call
    in a thread, and ends the queue with ``DONE`` or the exception."""
    loop = asyncio.get_running_loop()

    def push(token: str) -> None:
        loop.call_soon_threadsafe(handle.queue.put_nowait, token)

    await handle.lock.acquire()
    try:
        call = asyncio.ensure_future(
            asyncio.to_thread(client.stream_chat, messages, model, handle.model_cancel, push)
        )
        try:
            # Shielded so the client can close its connection cleanly.
            await asyncio.shield(call)
        except asyncio.CancelledError:
            handle.model_cancel.set()
            # Wait for the client to see the flag and let go of the upstream
            # connection. It sees it only after its next line: a stalled read
            # keeps this task here until the registry's wait_for times out.
            await call
            raise
        handle.queue.put_nowait(DONE)
    except Exception as error:  # reported to the response generator
        handle.queue.put_nowait(error)
    finally:
        # May release the lock a successor now holds: kept as it was.
        if handle.lock.locked():
            handle.lock.release()
