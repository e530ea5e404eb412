"""Quart-Trio's HTTP connection with one guarantee added: a streaming body
that was never iterated is still closed. (It also hands each
:class:`~server.web.streaming.RunStream` the app's metrics, so every
streaming route's frames are counted in one place.)

Quart closes a response body only if it started sending it. A client that
goes away in the instant between our handler returning and the first body
write cancels the response before that, and the run it was meant to read
would go on with no reader. Closing the :class:`~server.web.streaming.RunStream`
in a ``finally`` here cancels such a run with reason ``client_disconnect``.
"""

from __future__ import annotations

from typing import cast

import trio
from hypercorn.typing import ASGISendCallable
from quart.wrappers import Request, Response
from quart_trio import QuartTrio
from quart_trio.asgi import TrioASGIHTTPConnection

from .state import app_state
from .streaming import RunStream


class StreamingHTTPConnection(TrioASGIHTTPConnection):
    async def handle_request(  # type: ignore[override]
        self, nursery: trio.Nursery, request: Request, send: ASGISendCallable
    ) -> None:
        response = None
        try:
            response = await self.app.handle_request(request)
            stream = getattr(response, "run_stream", None)
            if isinstance(stream, RunStream):
                stream.meter = app_state(cast(QuartTrio, self.app)).metrics
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
            stream = getattr(response, "run_stream", None)
            if isinstance(stream, RunStream):
                stream.close()
