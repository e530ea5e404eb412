"""Quart-Trio's HTTP connection with three guarantees added.

**Hypercorn gets to close or recycle the connection.** Quart-Trio runs a
request as two tasks in one nursery, one reading ASGI messages and one
sending the response, and cancels the nursery as soon as the reader gets
``http.disconnect`` (``quart_trio/asgi.py``,
``TrioASGIHTTPConnection.handle_messages``). Hypercorn delivers that
``http.disconnect`` from *inside* the app's last ``send`` (the one with
``more_body: False``): ``HTTPStream.app_send`` → ``_send_closed`` →
``H11Protocol._maybe_recycle`` closes the stream, and only then closes the
socket (``TCPServer._close``) or restarts the keep-alive timer
(``TrioSingleTask.restart``) — still in our task, now cancelled, so neither
happens (``hypercorn/protocol/h11.py``, ``hypercorn/trio/tcp_server.py``).
The socket then stays open after ``Connection: close``, after HTTP/1.0,
after a 401, and past the keep-alive timeout, until the client hangs up. So
a disconnect that arrives once the whole response was handed to Hypercorn
does not cancel the request: the sending task finishes by itself as soon as
Hypercorn is done. A disconnect before that (the client went away
mid-response) cancels as before. ``tests/integration/
test_upstream_workarounds.py::test_upstream_quart_trio_still_cancels_hypercorns_close``
fails (strict xfail) once upstream no longer needs this.

**A response that closes the connection is sent once its request has
arrived.** An error answered before the request's body was read says
``Connection: close`` (:mod:`server.web.errors`). If the client pipelined
another request behind that body, Hypercorn's reading task, still taking
the body in, meets the next request after h11 has seen our ``close``: h11
raises, and Hypercorn closes the socket at once (``H11Protocol._handle_events``
→ ``TCPServer._close``, which takes no send lock), under the response our
task is writing: the client got no answer, or half of one, and Hypercorn
logged ``BusyResourceError`` from ``send_eof``. So such a response waits
(up to ``REQUEST_ARRIVAL_WAIT``; not for a body declared over the limit)
until Hypercorn has delivered the request's last body message; Hypercorn's
reader then holds the pipelined request without reading it, the response
goes out whole, and the connection closes.
The pipelined request is not answered: the client was told the connection
closes (RFC 9112, 9.3.2: a client retries unanswered pipelined requests).

**A streaming body that was never iterated is still closed.** Quart closes a
response body only if it started sending it. A client that goes away in the
instant between our handler returning and the first body write cancels the
response before that, and the run it was meant to read would go on with no
reader. Closing the :class:`~server.web.streaming.RunStream` in a
``finally`` here cancels such a run with reason ``client_disconnect``. (The
connection also hands each ``RunStream`` the app's metrics, so every
streaming route's frames are counted in one place, and a way to ask whether
the kernel broke its connection for taking no data:
:mod:`server.web.connections`.)
"""

from __future__ import annotations

from functools import partial
from typing import cast

import trio
from hypercorn.typing import (
    ASGIReceiveCallable,
    ASGISendCallable,
    ASGISendEvent,
    HTTPResponseStartEvent,
    HTTPScope,
)
from quart import Quart
from quart.wrappers import Request, Response
from quart_trio import QuartTrio
from quart_trio.asgi import TrioASGIHTTPConnection

from .connections import CONNECTIONS
from .state import app_state
from .streaming import StreamResponse

# How long a response that closes the connection waits for the rest of the
# request it answers (see StreamingHTTPConnection); a body that takes longer
# is cut by the close instead.
REQUEST_ARRIVAL_WAIT = 1.0


class StreamingHTTPConnection(TrioASGIHTTPConnection):
    def __init__(self, app: Quart, scope: HTTPScope) -> None:
        super().__init__(app, scope)
        # Set when Hypercorn has delivered the request's last body message.
        self._request_received = trio.Event()
        # Set when the response's last message is handed to Hypercorn.
        self._response_complete = False

    async def __call__(self, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        async def send_in_order(message: ASGISendEvent) -> None:
            if message["type"] == "http.response.start" and _closes(message):
                if self._body_within_limit():
                    with trio.move_on_after(REQUEST_ARRIVAL_WAIT):
                        await self._request_received.wait()
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                self._response_complete = True
            await send(message)

        await super().__call__(receive, send_in_order)

    def _body_within_limit(self) -> bool:
        # A body over the limit is refused unread (413) without waiting for
        # it: Hypercorn's reader takes long to reach what follows it.
        limit = self.app.config["MAX_CONTENT_LENGTH"]
        for name, value in self.scope["headers"]:
            if name.lower() == b"content-length" and value.isdigit():
                return limit is None or int(value) <= limit
        return True

    async def handle_messages(  # type: ignore[override]
        self, nursery: trio.Nursery, request: Request, receive: ASGIReceiveCallable
    ) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.request":
                request.body.append(message.get("body", b""))
                if not message.get("more_body", False):
                    request.body.set_complete()
                    self._request_received.set()
            elif message["type"] == "http.disconnect":
                break
        if not self._response_complete:
            nursery.cancel_scope.cancel()

    async def handle_request(  # type: ignore[override]
        self, nursery: trio.Nursery, request: Request, send: ASGISendCallable
    ) -> None:
        response = None
        try:
            response = await self.app.handle_request(request)
            if isinstance(response, StreamResponse):
                stream = response.run_stream
                stream.meter = app_state(cast(QuartTrio, self.app)).metrics
                addresses = (self.scope.get("client"), self.scope.get("server"))
                stream.connection_timed_out = partial(CONNECTIONS.timed_out, addresses)
            timeout = self.app.config["RESPONSE_TIMEOUT"]
            if isinstance(response, Response) and response.timeout is not Ellipsis:
                timeout = cast(float | None, response.timeout)
            if timeout is None:
                await self._send_response(send, response)
            else:
                with trio.move_on_after(timeout):
                    await self._send_response(send, response)
            nursery.cancel_scope.cancel()
        finally:
            if isinstance(response, StreamResponse):
                response.run_stream.close()


def _closes(message: ASGISendEvent) -> bool:
    """Whether a response start says ``Connection: close``."""
    headers = cast(HTTPResponseStartEvent, message).get("headers", ())
    return any(
        name.lower() == b"connection" and b"close" in value.lower() for name, value in headers
    )
