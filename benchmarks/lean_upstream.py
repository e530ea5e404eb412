"""A lean OpenAI-compatible streaming upstream for the throughput scenario.

The test fake (``tests.fakes.upstream``) runs on Hypercorn and costs tens of
microseconds of CPU per token; at 1,000 sessions x 50 tokens/s that alone
would take both cores of the machine and the throughput row would measure
the fake, not the server under test. This one speaks just enough HTTP/1.1
(keep-alive, Content-Length bodies, chunked responses) over raw trio sockets
to stream ``POST /v1/chat/completions`` replies, with the same token text
and the same ``@tokens`` / ``@delay`` directives (faults are not supported).

    python -m benchmarks.lean_upstream [--port 0] [--delay 0.02]

prints ``listening url=http://127.0.0.1:PORT`` on stderr and serves until
SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from functools import partial
from typing import Any

import trio

from tests.fakes import parse_directives, token_text

MAX_HEAD = 64 * 1024
MAX_BODY = 1024 * 1024
HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
    b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
)
REFUSED = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"


class Closed(Exception):
    """The peer went away or sent something this server does not speak."""


class Reader:
    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    async def _fill(self) -> None:
        data = await self._stream.receive_some(65536)
        if not data:
            raise Closed
        self._buffer += data

    async def head(self) -> bytes:
        while (end := self._buffer.find(b"\r\n\r\n")) < 0:
            if len(self._buffer) > MAX_HEAD:
                raise Closed
            await self._fill()
        head = bytes(self._buffer[:end])
        del self._buffer[: end + 4]
        return head

    async def exactly(self, count: int) -> bytes:
        while len(self._buffer) < count:
            await self._fill()
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        return data


def chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def sse(value: Any) -> bytes:
    return b"data: " + json.dumps(value, separators=(",", ":")).encode() + b"\n\n"


def choice(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-lean",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "fake-model",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }


def last_user_text(request: Any) -> str:
    for message in reversed(request.get("messages") or []):
        if message.get("role") == "user" and isinstance(message.get("content"), str):
            return str(message["content"])
    return ""


async def refuse(stream: trio.SocketStream, status: int, reason: bytes, message: str) -> None:
    body = json.dumps({"error": {"message": message}}).encode()
    await stream.send_all(REFUSED % (status, reason, len(body), body))


async def answer(stream: trio.SocketStream, tokens: int, delay: float) -> None:
    await stream.send_all(HEAD + chunk(sse(choice({"role": "assistant", "content": ""}))))
    for index in range(tokens):
        await trio.sleep(delay)
        await stream.send_all(chunk(sse(choice({"content": token_text(index)}))))
    closing = sse(choice({}, "stop")) + b"data: [DONE]\n\n"
    await stream.send_all(chunk(closing) + b"0\r\n\r\n")


async def serve_connection(default_delay: float, stream: trio.SocketStream) -> None:
    reader = Reader(stream)
    try:
        while True:
            head = (await reader.head()).decode("latin-1").split("\r\n")
            method, target, _ = head[0].split(" ", 2)
            headers = {
                name.strip().lower(): value.strip()
                for name, _, value in (line.partition(":") for line in head[1:])
            }
            length = int(headers.get("content-length", "0"))
            if length > MAX_BODY or "chunked" in headers.get("transfer-encoding", ""):
                raise Closed
            body = await reader.exactly(length)
            if (method, target.split("?")[0]) != ("POST", "/v1/chat/completions"):
                await refuse(stream, 404, b"Not Found", f"no route {method} {target}")
                continue
            try:
                directives = parse_directives(last_user_text(json.loads(body)))
            except ValueError as exc:  # bad JSON or a bad directive
                await refuse(stream, 400, b"Bad Request", str(exc))
                continue
            delay = default_delay if directives.delay is None else directives.delay
            await answer(stream, directives.tokens, delay)
    except (Closed, trio.BrokenResourceError, trio.ClosedResourceError, ValueError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def serve(args: argparse.Namespace) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                partial(
                    trio.serve_tcp,
                    partial(serve_connection, args.delay),
                    args.port,
                    host="127.0.0.1",
                    backlog=4096,
                )
            )
            port = listeners[0].socket.getsockname()[1]
            print(f"listening url=http://127.0.0.1:{port}", file=sys.stderr, flush=True)
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lean_upstream")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--delay", type=float, default=0.02, help="seconds before each token")
    trio.run(serve, parser.parse_args())


if __name__ == "__main__":
    main()
