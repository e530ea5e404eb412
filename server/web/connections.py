"""Why a connection broke, for the request that was using it.

A streaming reader whose connection breaks is either a client that went
away (it closed or reset the connection: its run is cancelled with
``client_disconnect`` unless it asked to continue) or a reader dropped for
slowness (the kernel gave up on it: it took no data for ``--send-timeout``,
``TCP_USER_TIMEOUT``, and its run goes on). Only the socket error tells the
two apart: the server's writes into the kernel's buffers complete as long
as there is room, so a reader that takes nothing is often not one the
server was waiting on when the kernel cut it off. Hypercorn catches that
error (``hypercorn/trio/tcp_server.py``, ``TCPServer._read_data`` and
``protocol_send``) and tells the app only ``http.disconnect``.

So the launcher hands Hypercorn each accepted connection wrapped in a
:class:`TracedStream`, which notes in :data:`CONNECTIONS` a connection that
broke with ``ETIMEDOUT``, under its ``(client, server)`` addresses as the
ASGI scope names them; the note goes when Hypercorn is done with the
connection (its requests' tasks have ended). Without the launcher (plain ``hypercorn``)
nothing is noted and nothing sets ``TCP_USER_TIMEOUT`` either.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager

import attrs
import trio
from hypercorn.utils import parse_socket_addr

# (client, server) as Hypercorn puts them in the ASGI scope.
Address = tuple[str, int | None] | None
Addresses = tuple[Address, Address]


@attrs.define
class ConnectionLedger:
    """The open connections the kernel broke for not taking data."""

    _timed_out: set[Addresses] = attrs.field(factory=set)

    def note_timed_out(self, addresses: Addresses) -> None:
        self._timed_out.add(addresses)

    def forget(self, addresses: Addresses) -> None:
        self._timed_out.discard(addresses)

    def timed_out(self, addresses: Addresses) -> bool:
        """Whether the connection with these addresses broke with
        ``ETIMEDOUT`` (still open: the request using it has not finished)."""
        return addresses in self._timed_out


# One per process: connections are told apart by their addresses.
CONNECTIONS = ConnectionLedger()


class TracedStream(trio.abc.HalfCloseableStream):
    """A :class:`trio.SocketStream` that notes in ``ledger`` when the kernel
    broke it with ``ETIMEDOUT``; otherwise it is the stream it wraps
    (Hypercorn also reads its ``socket``)."""

    def __init__(self, stream: trio.SocketStream, ledger: ConnectionLedger = CONNECTIONS) -> None:
        self._stream = stream
        self._ledger = ledger
        self.socket = stream.socket
        try:
            family = stream.socket.family
            self.addresses: Addresses | None = (
                parse_socket_addr(family, stream.socket.getpeername()),
                parse_socket_addr(family, stream.socket.getsockname()),
            )
        except OSError:  # gone already: Hypercorn will not serve it either
            self.addresses = None

    @contextmanager
    def _noting_timeouts(self) -> Iterator[None]:
        try:
            yield
        except trio.BrokenResourceError as exc:
            cause = exc.__cause__
            if (
                isinstance(cause, OSError)
                and cause.errno == errno.ETIMEDOUT
                and self.addresses is not None
            ):
                self._ledger.note_timed_out(self.addresses)
            raise

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        with self._noting_timeouts():
            await self._stream.send_all(data)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        with self._noting_timeouts():
            return await self._stream.receive_some(max_bytes)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()

    def forget(self) -> None:
        """Drop the note, once no request on this connection can ask."""
        if self.addresses is not None:
            self._ledger.forget(self.addresses)
