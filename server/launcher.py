"""Serve the app with Hypercorn's trio worker and drain runs on SIGINT/SIGTERM.

Why a launcher: Hypercorn cuts open connections ``graceful_timeout`` after
its shutdown trigger fires, and only then runs the ASGI lifespan shutdown.
Draining therefore happens *inside* the shutdown trigger, while connections
are still open: stop admitting runs (503), let live runs finish for up to
``drain_timeout``, cancel the rest with reason ``shutdown`` (their clients
get ``run.interrupted``), and only then let Hypercorn close.

Limits at the socket: request heads (line and headers) are bounded by
``--max-header-bytes`` (Hypercorn answers a bigger one with 431 and closes
that connection). Writes to a client that stops reading are bounded by
``--send-timeout``: the listening sockets carry ``TCP_USER_TIMEOUT``, which
accepted connections inherit, so the kernel breaks a connection whose
written data has not been taken for that long (a zero receive window
included). Hypercorn's writes are shielded from cancellation, so nothing
above the socket could end such a write. Hypercorn is served by
:func:`server.worker.serve`, which traces each connection so that the
app can tell such a cut-off (a slow reader: its run goes on) from a client
that hung up (see :class:`server.web.streaming.RunStream`).
"""

from __future__ import annotations

import logging
import signal
import socket
from functools import partial

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.utils import wrap_app

from .core.agent import Agent
from .logs import log_event
from .settings import Settings
from .web.app import create_app
from .web.state import app_state
from .worker import serve as worker_serve

logger = logging.getLogger(__name__)

# Time for responses to write their terminal frames after the drain.
FLUSH_TIMEOUT = 5.0


def hypercorn_config(settings: Settings) -> HypercornConfig:
    config = HypercornConfig()
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    config.bind = [f"{host}:{settings.port}"]
    config.graceful_timeout = FLUSH_TIMEOUT
    # Hypercorn's default of 100 overflows when many clients connect at
    # once; the kernel then drops their SYNs and they retry seconds later.
    # 2048 is uvicorn's default.
    config.backlog = 2048
    # Logger objects, not file names: Hypercorn then adds no handler of its
    # own and its access and error lines go through our root handler, in
    # our format (server.logs.configure_logging).
    config.accesslog = logging.getLogger("hypercorn.access")
    config.errorlog = logging.getLogger("hypercorn.error")
    config.keep_alive_timeout = settings.keep_alive_timeout
    config.h11_max_incomplete_size = settings.max_header_bytes
    config.h2_max_header_list_size = settings.max_header_bytes
    return config


def listening_sockets(config: HypercornConfig, settings: Settings) -> Sockets:
    """Hypercorn's sockets for ``config``, listening, with the send timeout:
    the kernel breaks a connection whose client took no data for
    ``--send-timeout``, the same span after which the app drops a reader
    whose write is still pending (one notion of a slow reader, two places
    that see it)."""
    sockets = config.create_sockets()
    # Linux only; elsewhere a reader that reads nothing is bounded only by the
    # kernel's own retransmission limits.
    user_timeout = getattr(socket, "TCP_USER_TIMEOUT", None)
    for sock in [*sockets.secure_sockets, *sockets.insecure_sockets]:
        tcp = sock.family in (socket.AF_INET, socket.AF_INET6)
        if settings.send_timeout and tcp and user_timeout is not None:
            timeout_ms = max(1, round(settings.send_timeout * 1000))
            sock.setsockopt(socket.IPPROTO_TCP, user_timeout, timeout_ms)
        sock.listen(config.backlog)
    return sockets


async def serve(
    settings: Settings,
    *,
    agent: Agent | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    app = create_app(settings, agent=agent)
    state = app_state(app)

    # Installed before Hypercorn starts listening, so a signal that arrives
    # as soon as the server is up waits here instead of killing the process.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:

        async def drain_on_signal() -> None:
            async for signum in signals:
                log_event(logger, "shutdown_requested", signal=signal.Signals(signum).name)
                break
            if state.manager is not None:
                log_event(logger, "draining", timeout_s=settings.drain_timeout)
                await state.manager.drain(grace_period=settings.drain_timeout)
            log_event(logger, "drained")

        config = hypercorn_config(settings)
        sockets = listening_sockets(config, settings)
        try:
            async with trio.open_nursery() as nursery:
                # hypercorn.trio.serve, with our sockets.
                binds: list[str] = await nursery.start(
                    partial(
                        worker_serve,
                        wrap_app(app, config.wsgi_max_body_size, "asgi"),
                        config,
                        sockets=sockets,
                        shutdown_trigger=drain_on_signal,
                    )
                )
                for bind in binds:
                    log_event(logger, "listening", url=bind)
                task_status.started(binds)
        finally:
            for sock in [*sockets.secure_sockets, *sockets.insecure_sockets]:
                sock.close()
