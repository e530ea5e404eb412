"""Hypercorn's trio worker, with each accepted connection traced.

:func:`serve` is ``hypercorn.trio.run.worker_serve`` (Hypercorn 0.18) with
two changes: every plain TCP connection reaches Hypercorn wrapped
in a :class:`~server.web.connections.TracedStream`, so the app can tell a
reader the kernel cut off for taking no data from a client that hung up
(Hypercorn catches the socket error that says which: see
:mod:`server.web.connections`); and a connection its client closed is let
go at once (:class:`_TCPServer`). Hypercorn builds its listeners inside
``worker_serve`` and offers no hook for the accepted stream, hence the copy;
it keeps Hypercorn's order (lifespan startup, listeners, ``task_status``,
shutdown trigger, graceful close, lifespan shutdown). TLS listeners and
QUIC are left out: the launcher binds plain TCP only.
``tests/unit/test_connections.py::test_the_worker_copy_is_of_the_installed_hypercorn``
fails when Hypercorn's ``worker_serve`` changes (compare again, or drop the
copy once Hypercorn passes the accepted stream or the socket error on).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from random import randint

import trio
from hypercorn.config import Config, Sockets
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.statsd import StatsdLogger
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import AppWrapper, ConnectionState, LifespanState
from hypercorn.utils import ShutdownError, raise_shutdown, repr_socket_addr

from .web.connections import TracedStream


class _TCPServer(TCPServer):
    """Hypercorn's connection, let go as soon as its client closed it.

    Hypercorn 0.18's ``TCPServer._read_data`` returns on the client's EOF
    without stopping the connection's idle timer. Served by this launcher
    (a kept-alive POST, then the client closes), the connection then kept
    its socket and two tasks until ``keep_alive_timeout``, so a client that
    opens and closes connections quickly held far more sockets than it had
    open. (Hypercorn's own worker in one process with a test client did not
    show it, so there is no upstream test; ``tests/integration/
    test_connections.py::test_connections_the_client_closed_are_let_go_before_the_keep_alive_timeout``
    fails without this.)
    """

    async def _read_data(self) -> None:
        await super()._read_data()
        # The client is gone: nothing is left for the idle timer to close.
        await self.idle_task.stop()


async def serve(
    app: AppWrapper,
    config: Config,
    *,
    sockets: Sockets,
    shutdown_trigger: Callable[..., Awaitable[None]],
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    if sockets.secure_sockets or sockets.quic_sockets:
        raise ValueError("the traced worker serves plain TCP only")
    config.set_statsd_logger_class(StatsdLogger)

    lifespan_state: LifespanState = {}
    lifespan = Lifespan(app, config, lifespan_state)
    max_requests = None
    if config.max_requests is not None:
        max_requests = config.max_requests + randint(0, config.max_requests_jitter)
    context = WorkerContext(max_requests)

    connection_state = ConnectionState(lifespan_state.copy())

    async def serve_connection(stream: trio.SocketStream) -> None:
        traced = TracedStream(stream)
        try:
            # Hypercorn annotates the stream as an SSLStream; any stream does.
            await _TCPServer(app, config, context, connection_state, traced)  # type: ignore[arg-type]
        finally:
            traced.forget()  # the request that could ask has ended

    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()

        async with trio.open_nursery() as server_nursery:
            listeners = []
            binds = []
            for sock in sockets.insecure_sockets:
                listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
                bind = repr_socket_addr(sock.family, sock.getsockname())
                binds.append(f"http://{bind}")
                await config.log.info(f"Running on http://{bind} (CTRL + C to quit)")

            task_status.started(binds)
            try:
                async with trio.open_nursery(strict_exception_groups=True) as nursery:
                    nursery.start_soon(raise_shutdown, shutdown_trigger)
                    nursery.start_soon(raise_shutdown, context.terminate.wait)
                    nursery.start_soon(
                        partial(
                            trio.serve_listeners,
                            serve_connection,
                            listeners,
                            handler_nursery=server_nursery,
                        ),
                    )
                    await trio.sleep_forever()
            except BaseExceptionGroup as error:
                _, other_errors = error.split((ShutdownError, KeyboardInterrupt))
                if other_errors is not None:
                    raise other_errors from None
            finally:
                # Sets an event: bounded, and shielded so that it happens.
                with trio.move_on_after(1, shield=True):
                    await context.terminated.set()
                server_nursery.cancel_scope.deadline = trio.current_time() + config.graceful_timeout

        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()
