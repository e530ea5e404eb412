"""Reading the server's responses the way a client does: SSE events, OpenAI
chunks, NDJSON lines. Plain parsing over ``httpx2`` responses; no assertions
about behaviour here, only about framing."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import httpx2
import trio

DEV_KEY = "devkey"
CHAT_PATH = "/v1/chat/completions"
DONE = "[DONE]"
# The role chunk and two words: enough to know a run is producing.
PROGRESS_CHUNKS = 3


def auth(key: str = DEV_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat_body(prompt: str, **extra: Any) -> dict[str, Any]:
    return {"model": "scripted", "messages": [{"role": "user", "content": prompt}], **extra}


@dataclass(frozen=True)
class SseEvent:
    data: str
    id: str | None = None
    event: str | None = None


async def iter_sse(response: httpx2.Response) -> AsyncIterator[SseEvent]:
    """Events of a ``text/event-stream`` body; comments (``: ping``) skipped."""
    data: list[str] = []
    fields: dict[str, str] = {}
    async for line in response.aiter_lines():
        if not line:
            if data:
                yield SseEvent("\n".join(data), fields.get("id"), fields.get("event"))
            data, fields = [], {}
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        else:
            fields[name] = value
    if data:
        yield SseEvent("\n".join(data), fields.get("id"), fields.get("event"))


@dataclass
class ChatStream:
    """An OpenAI chunk stream as the client saw it."""

    status: int
    run_id: str
    session_id: str
    chunks: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False
    events_after_done: int = 0

    @property
    def text(self) -> str:
        return "".join(
            choice["delta"].get("content") or ""
            for chunk in self.chunks
            for choice in chunk["choices"]
        )

    @property
    def final(self) -> dict[str, Any]:
        """The one chunk that carries a ``finish_reason``; it must be the last
        chunk with choices."""
        with_choices = [chunk for chunk in self.chunks if chunk["choices"]]
        finishing = [chunk for chunk in with_choices if chunk["choices"][0]["finish_reason"]]
        assert finishing == with_choices[-1:], f"finish_reason not on the last chunk only: {self}"
        return finishing[0]

    @property
    def finish_reason(self) -> str:
        reason: str = self.final["choices"][0]["finish_reason"]
        return reason

    @property
    def ids(self) -> set[str]:
        return {chunk["id"] for chunk in self.chunks}


async def read_chat_stream(
    response: httpx2.Response, *, on_progress: Callable[[], object] | None = None
) -> ChatStream:
    """Read an OpenAI chunk stream to its end. ``on_progress`` is called once,
    when ``PROGRESS_CHUNKS`` chunks arrived: the run is producing."""
    stream = ChatStream(
        status=response.status_code,
        run_id=response.headers.get("X-Run-Id", ""),
        session_id=response.headers.get("X-Session-Id", ""),
    )
    async with aclosing(iter_sse(response)) as events:
        async for event in events:
            if stream.done:
                stream.events_after_done += 1
            elif event.data == DONE:
                stream.done = True
            else:
                stream.chunks.append(json.loads(event.data))
                if on_progress is not None and len(stream.chunks) == PROGRESS_CHUNKS:
                    on_progress()
    return stream


async def read_then_hang_up(
    url: str, body: Mapping[str, Any], headers: Mapping[str, str], *, events: int
) -> dict[str, str]:
    """POST over a bare socket, read until ``events`` SSE events arrived, then
    close the socket: a client that goes away mid-stream. The response headers
    (lower-case names).

    A bare socket because httpx2 reads bodies through nested async generators
    that cannot all be closed when a reader stops early (trio then warns)."""
    target = httpx2.URL(url)
    assert target.port is not None
    payload = json.dumps(body).encode()
    head = [
        f"POST {CHAT_PATH} HTTP/1.1",
        f"Host: {target.host}:{target.port}",
        "Content-Type: application/json",
        f"Content-Length: {len(payload)}",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    received = b""
    async with await trio.open_tcp_stream(target.host, target.port) as stream:
        await stream.send_all(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
        while received.count(b"data: ") < events:
            data = await stream.receive_some()
            assert data, f"server closed the connection early: {received!r}"
            received += data
    status_line, *header_lines = received.partition(b"\r\n\r\n")[0].decode().split("\r\n")
    assert status_line.split()[1] == "200", received
    return {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(":") for line in header_lines)
    }


async def stream_chat(
    client: httpx2.AsyncClient,
    prompt: str,
    *,
    session_id: str | None = None,
    key: str = DEV_KEY,
    on_progress: Callable[[], object] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> ChatStream:
    """POST a streaming chat completion and read it to the end."""
    headers = auth(key)
    if session_id is not None:
        headers["X-Session-Id"] = session_id
    body = chat_body(prompt, stream=True, **(extra or {}))
    async with client.stream("POST", CHAT_PATH, json=body, headers=headers) as response:
        assert response.status_code == 200, (await response.aread()).decode()
        assert response.headers["content-type"].startswith("text/event-stream")
        return await read_chat_stream(response, on_progress=on_progress)


@dataclass
class BackgroundChat:
    """A chat stream read by a task of its own: ``await nursery.start(chat.run)``
    returns once the run is producing; after the nursery, ``chat.stream`` is
    what the client read."""

    client: httpx2.AsyncClient
    prompt: str
    session_id: str | None = None
    key: str = DEV_KEY
    _stream: ChatStream | None = None

    @property
    def stream(self) -> ChatStream:
        assert self._stream is not None, "the stream was not read to its end"
        return self._stream

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._stream = await stream_chat(
            self.client,
            self.prompt,
            session_id=self.session_id,
            key=self.key,
            on_progress=lambda: task_status.started(),
        )
