"""A TCP forwarder on loopback that a test can cut: the browser talks to the
server through it, so "the page's connection dies mid-run" is a real broken
connection, not a mocked fetch.

Resource handling: one accept thread, and two pump threads per forwarded
connection (one each way). :meth:`SeverableProxy.sever` shuts every
forwarded socket down, which wakes both pumps; the second pump to finish
closes the pair. :meth:`close` stops accepting, severs, and joins every
thread, so nothing outlives the proxy.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress

JOIN_TIMEOUT = 10.0
CHUNK = 65536


class _Pair:
    """A browser-side socket and its server-side twin."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self._lock = threading.Lock()
        self._pumps_left = 2

    def shutdown(self) -> None:
        for sock in (self.client, self.upstream):
            with suppress(OSError):  # already shut, or reset by the peer
                sock.shutdown(socket.SHUT_RDWR)

    def pump_done(self) -> None:
        with self._lock:
            self._pumps_left -= 1
            last = self._pumps_left == 0
        if last:
            self.client.close()
            self.upstream.close()


class SeverableProxy:
    def __init__(self, upstream_port: int) -> None:
        self._upstream = ("127.0.0.1", upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self._pairs: set[_Pair] = set()
        self._threads: list[threading.Thread] = []
        self._refusing = False
        self.severed = 0  # connections cut by sever()
        self._acceptor = threading.Thread(target=self._accept, name="proxy-accept")
        self._acceptor.start()

    def sever(self) -> None:
        """Cut every open connection, and refuse new ones until :meth:`restore`."""
        with self._lock:
            self._refusing = True
            pairs = list(self._pairs)
            self.severed += len(pairs)
        for pair in pairs:
            pair.shutdown()

    def restore(self) -> None:
        with self._lock:
            self._refusing = False

    def close(self) -> None:
        # shutdown wakes the blocked accept() on Linux; close alone does not.
        with suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._acceptor.join(JOIN_TIMEOUT)
        self._listener.close()
        self.sever()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(JOIN_TIMEOUT)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # the listener was shut down
            with self._lock:
                refusing = self._refusing
            if refusing:
                client.close()  # the browser sees the connection fail
                continue
            try:
                upstream = socket.create_connection(self._upstream, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            pair = _Pair(client, upstream)
            pumps = [
                threading.Thread(target=self._pump, args=(pair, client, upstream), daemon=True),
                threading.Thread(target=self._pump, args=(pair, upstream, client), daemon=True),
            ]
            with self._lock:
                self._pairs.add(pair)
                self._threads.extend(pumps)
            for pump in pumps:
                pump.start()

    def _pump(self, pair: _Pair, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(CHUNK):
                sink.sendall(data)
        except OSError:
            pass  # severed, or reset by either end
        finally:
            # One direction ending ends the connection: both ways shut.
            pair.shutdown()
            with self._lock:
                self._pairs.discard(pair)
            pair.pump_done()


@contextmanager
def severable_proxy(upstream_port: int) -> Iterator[SeverableProxy]:
    proxy = SeverableProxy(upstream_port)
    try:
        yield proxy
    finally:
        proxy.close()
