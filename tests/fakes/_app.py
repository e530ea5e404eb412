"""The fake upstream as a raw ASGI 3 app.

Routes::

    POST /api/chat              Ollama chat (NDJSON stream, or one JSON)
    POST /v1/chat/completions   OpenAI chat (SSE stream, or one JSON)
    GET  /v1/models             OpenAI model list
    GET  /_fake/stats           the registry as JSON
    POST /_fake/reset           forget ended requests, reset high-water marks

Only the OpenAI routes check ``Authorization: Bearer <key>``, and only when
the fake has a key.

Records: a reply ends its record *before* handing hypercorn its last bytes
(or before breaking the connection), so a client that has seen the end of a
reply always finds the record ended with the right outcome.

Disconnects: while a chat request is answered, a second task waits on ASGI
``receive()``; hypercorn delivers ``http.disconnect`` as soon as it reads EOF
from the client, and the watcher then cancels the reply. The last send is
shielded (briefly): hypercorn announces ``http.disconnect`` after every
completed response too, and cancelling its bookkeeping halfway is no help.

``@close_after``: the reply returns without its final ``more_body=False``
message. Hypercorn then closes the connection mid-body (FIN, no terminating
zero-length chunk), which an HTTP client reports as an incomplete chunked
read: ``httpx.RemoteProtocolError``. No exception is raised in the app, so
nothing is logged.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import attrs
import trio

from ._directives import DirectiveError, Directives, parse_directives
from ._registry import Outcome, Registry, RequestRecord
from ._wire import (
    CRASH_MESSAGE,
    FAKE_MODEL,
    Api,
    OllamaWire,
    OpenAIWire,
    Usage,
    Wire,
    count_words,
    message_text,
    openai_error,
    reply_text,
    token_text,
)

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# How long the last send of a reply may take once shielded; on loopback it
# takes microseconds, the bound only keeps a wedged server from hanging us.
FINAL_SEND_BUDGET = 5.0
MALFORMED_BODY = b"{this body is not json"


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _read_body(receive: Receive) -> bytes | None:
    """The request body, or None if the client went away before sending it all."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _send_start(
    send: Send, status: int, media_type: str, *extra: tuple[bytes, bytes]
) -> None:
    headers = [(b"content-type", media_type.encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})


async def _send_json(send: Send, status: int, value: Any) -> None:
    await _send_start(send, status, "application/json")
    await send({"type": "http.response.body", "body": json.dumps(value).encode()})


async def _unless_disconnected(receive: Receive, reply: Callable[[], Awaitable[None]]) -> bool:
    """Run ``reply()``, cancelling it if the client goes away first; whether it did."""
    client_left = True

    async def run() -> None:
        nonlocal client_left
        await reply()
        client_left = False
        nursery.cancel_scope.cancel()

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        nursery.start_soon(watch)
    return client_left


def _last_user_prompt(request: Any) -> str | None:
    messages = request.get("messages") if isinstance(request, dict) else None
    if not isinstance(messages, list):
        return None
    users = [message for message in messages if isinstance(message, dict)]
    users = [message for message in users if message.get("role") == "user"]
    return message_text(users[-1]) if users else None


@attrs.define(kw_only=True)
class _Reply:
    """One chat reply, scripted by its directives."""

    send: Send
    wire: Wire
    directives: Directives
    record: RequestRecord
    registry: Registry
    delay: float
    prompt_words: int

    async def _start(self, status: int, media_type: str, *extra: tuple[bytes, bytes]) -> None:
        await _send_start(self.send, status, media_type, *extra)
        self.registry.headers_sent(self.record, status)

    async def _body(self, data: bytes) -> None:
        if data:
            await self.send({"type": "http.response.body", "body": data, "more_body": True})

    async def _finish(self, data: bytes) -> None:
        self.registry.end(self.record, "finished")
        with trio.move_on_after(FINAL_SEND_BUDGET, shield=True):
            await self.send({"type": "http.response.body", "body": data, "more_body": False})

    def _break_connection(self) -> None:
        # Returning without more_body=False makes hypercorn close mid-body.
        self.registry.end(self.record, "closed")

    async def respond_json(self, status: int, value: Any) -> None:
        await self._start(status, "application/json")
        return await self._finish(json.dumps(value).encode())

    def _usage(self) -> Usage:
        return Usage(prompt=self.prompt_words, completion=self.record.tokens_sent)

    async def run(self) -> None:
        directives = self.directives
        if directives.stall_headers:
            await trio.sleep_forever()
        if directives.status is not None:
            status = directives.status
            message = f"fake upstream: @status={status}"
            return await self.respond_json(status, self.wire.error_body(status, message))
        if self.record.stream:
            return await self._stream()
        return await self._whole()

    async def _stream(self) -> None:
        await self._start(200, self.wire.media_type, (b"cache-control", b"no-cache"))
        if self.directives.stall_first:
            await trio.sleep_forever()
        await self._body(self.wire.opening())
        for index in range(self.directives.tokens_before_fault):
            await trio.sleep(self.delay)
            await self._body(self.wire.token(token_text(index)))
            self.registry.token_sent(self.record)
        match self.directives.fault:
            case "stall_after":
                await trio.sleep_forever()
            case "close_after":
                return self._break_connection()
            case "error_after":
                return await self._finish(self.wire.stream_error(CRASH_MESSAGE))
            case "malformed_after":
                return await self._finish(self.wire.malformed())
        return await self._finish(self.wire.closing(self._usage()))

    async def _whole(self) -> None:
        """A non-streaming reply: "generate" (``delay`` per token), then answer.
        Faults without a stream: ``@stall_first`` sends headers only;
        ``@stall_after`` hangs before the headers; ``@error_after`` answers
        500; ``@malformed_after`` answers 200 with a body that is not JSON;
        ``@close_after`` sends half of a ``content-length`` body, then closes."""
        fault = self.directives.fault
        if fault == "stall_first":
            await self._start(200, "application/json")
            await trio.sleep_forever()
        count = self.directives.tokens_before_fault
        await trio.sleep(self.delay * count)
        if fault == "stall_after":
            await trio.sleep_forever()
        if fault == "error_after":
            error = self.wire.error_body(500, CRASH_MESSAGE)
            return await self.respond_json(500, error)
        self.registry.token_sent(self.record, count)
        if fault == "malformed_after":
            await self._start(200, "application/json")
            return await self._finish(MALFORMED_BODY)
        payload = json.dumps(self.wire.completion(reply_text(count), self._usage())).encode()
        if fault == "close_after":
            await self._start(200, "application/json", (b"content-length", b"%d" % len(payload)))
            await self._body(payload[: len(payload) // 2])
            return self._break_connection()
        await self._start(200, "application/json")
        return await self._finish(payload)


@attrs.define(kw_only=True)
class FakeApp:
    """The ASGI app. :meth:`close` cancels every request in flight (stalls
    included), so the server can shut down at once."""

    registry: Registry
    api_key: str | None = None
    default_delay: float = 0.01
    _in_flight: set[trio.CancelScope] = attrs.field(factory=set, init=False)
    _closing: bool = attrs.field(default=False, init=False)

    def close(self) -> None:
        self._closing = True
        for cancel_scope in self._in_flight:
            cancel_scope.cancel()

    @contextmanager
    def _cancelled_on_close(self) -> Iterator[None]:
        with trio.CancelScope() as cancel_scope:
            if self._closing:
                cancel_scope.cancel()
            self._in_flight.add(cancel_scope)
            try:
                yield
            finally:
                self._in_flight.discard(cancel_scope)

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
        elif scope["type"] == "http":
            with self._cancelled_on_close():
                await self._http(scope, receive, send)

    async def _http(self, scope: Message, receive: Receive, send: Send) -> None:
        body = await _read_body(receive)
        if body is None:
            return
        headers = {name.lower(): value.decode("latin-1") for name, value in scope["headers"]}
        route = (scope["method"], scope["path"])
        if route == ("GET", "/_fake/stats"):
            await _send_json(send, 200, self.registry.summary())
        elif route == ("POST", "/_fake/reset"):
            self.registry.reset()
            await _send_json(send, 200, {"ok": True})
        elif route[1] in ("/v1/models", "/v1/chat/completions") and not self._authorized(headers):
            await _send_json(send, 401, openai_error(401, "Incorrect API key provided."))
        elif route == ("GET", "/v1/models"):
            model = {"id": FAKE_MODEL, "object": "model", "created": 0, "owned_by": "fake"}
            await _send_json(send, 200, {"object": "list", "data": [model]})
        elif route == ("POST", "/v1/chat/completions"):
            await self._chat("openai", scope["path"], headers, body, receive, send)
        elif route == ("POST", "/api/chat"):
            await self._chat("ollama", scope["path"], headers, body, receive, send)
        else:
            await _send_json(send, 404, {"error": f"no route {route[0]} {route[1]}"})

    def _authorized(self, headers: dict[bytes, str]) -> bool:
        return self.api_key is None or headers.get(b"authorization") == f"Bearer {self.api_key}"

    async def _chat(
        self,
        api: Api,
        path: str,
        headers: dict[bytes, str],
        body: bytes,
        receive: Receive,
        send: Send,
    ) -> None:
        try:
            request = json.loads(body)
        except ValueError:
            request = None
        if not isinstance(request, dict):
            request = {}
        prompt = _last_user_prompt(request)
        directives, problem = Directives(), None
        if prompt is None:
            problem = "the request needs a messages list with a user message"
        else:
            try:
                directives = parse_directives(prompt)
            except DirectiveError as error:
                problem = str(error)
        model = str(request.get("model") or FAKE_MODEL)
        record = self.registry.open(
            api=api,
            path=path,
            model=model,
            stream=request.get("stream", api == "ollama") is True,
            session=directives.session or headers.get(b"x-session-id"),
            prompt=prompt or "",
        )
        wire: Wire
        if api == "ollama":
            wire = OllamaWire(model=model)
        else:
            options = request.get("stream_options")
            include_usage = isinstance(options, dict) and options.get("include_usage") is True
            wire = OpenAIWire(
                model=model, completion_id=f"chatcmpl-fake{record.id}", include_usage=include_usage
            )
        reply = _Reply(
            send=send,
            wire=wire,
            directives=directives,
            record=record,
            registry=self.registry,
            delay=self.default_delay if directives.delay is None else directives.delay,
            prompt_words=count_words(request.get("messages") or []),
        )
        outcome: Outcome = "shutdown"  # if cancelled by FakeApp.close() or hypercorn
        try:
            if problem is not None:
                await reply.respond_json(400, wire.error_body(400, problem))
            elif await _unless_disconnected(receive, reply.run):
                outcome = "disconnected"
        except Exception:
            outcome = "crashed"
            raise
        finally:
            if not record.ended:  # a reply that went out has ended its record already
                self.registry.end(record, outcome)
