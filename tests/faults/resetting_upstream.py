"""An upstream that resets the TCP connection mid-reply: a real RST, not the
orderly FIN that the fake upstream's ``@close_after`` gives.

It answers every request with ``200``, a chunked body in the dialect of the
path (OpenAI SSE for ``/v1/chat/completions``, Ollama NDJSON for
``/api/chat``) carrying ``tokens`` tokens. If the request mentions
:data:`RESET` it then closes the socket with ``SO_LINGER`` set to zero
seconds, which makes the kernel send RST and drop whatever is unsent;
otherwise it ends the reply properly. Loopback only; one task per connection in the caller's
nursery, ended when :meth:`ResettingUpstream.serve` is cancelled.
"""

from __future__ import annotations

import socket
import struct

import attrs
import trio

from tests.fakes._wire import OllamaWire, OpenAIWire, Usage, token_text

MAX_REQUEST_BYTES = 1 << 20
RESET = "@reset"


@attrs.define
class ResettingUpstream:
    tokens: int = 3
    resets: int = 0
    url: str = ""

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        async with trio.open_nursery() as nursery:
            # Already listening: connections made from now on are served.
            nursery.start_soon(trio.serve_listeners, self._handle, listeners)
            task_status.started()

    async def _handle(self, stream: trio.SocketStream) -> None:
        head, body = await _read_request(stream)
        path = head.split(b" ", 2)[1]
        if path.endswith(b"/chat/completions"):
            wire: OpenAIWire | OllamaWire = OpenAIWire(model="reset", completion_id="chatcmpl-r")
            media = wire.media_type
        else:
            wire = OllamaWire(model="reset")
            media = wire.media_type
        await stream.send_all(
            (
                f"HTTP/1.1 200 OK\r\nContent-Type: {media}\r\nTransfer-Encoding: chunked\r\n\r\n"
            ).encode()
        )
        for piece in [wire.opening(), *(wire.token(token_text(i)) for i in range(self.tokens))]:
            if piece:
                await stream.send_all(b"%x\r\n%s\r\n" % (len(piece), piece))
            await trio.sleep(0.01)
        if RESET.encode() not in body:
            closing = wire.closing(Usage(prompt=1, completion=self.tokens))
            await stream.send_all(b"%x\r\n%s\r\n0\r\n\r\n" % (len(closing), closing))
            await stream.aclose()
            return
        # Linger on, zero seconds: close() sends RST instead of FIN.
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.resets += 1
        stream.socket.close()


async def _read_request(stream: trio.SocketStream) -> tuple[bytes, bytes]:
    """Headers and a ``Content-Length`` body (what httpx2 sends)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some()
        if not chunk or len(data) > MAX_REQUEST_BYTES:
            raise ConnectionError("incomplete request")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = await stream.receive_some()
        if not chunk:
            raise ConnectionError("incomplete body")
        body += chunk
    return head, body
