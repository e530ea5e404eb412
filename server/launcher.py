"""Serve the app with Hypercorn's trio worker; drain runs on SIGINT, SIGTERM
or SIGHUP (:mod:`server.shutdown`), report start-up errors as one line
(:mod:`server.startup`).

Why a launcher: Hypercorn cuts open connections ``graceful_timeout`` after
its shutdown trigger fires, and only then runs the ASGI lifespan shutdown.
Draining therefore happens *inside* the shutdown trigger, while connections
are still open: stop admitting runs (503), let live runs finish for up to
``drain_timeout``, cancel the rest with reason ``shutdown`` (their clients
get ``run.interrupted``), and only then let Hypercorn close. A second
signal during the drain skips the rest of the drain timeout.

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
import socket
from functools import partial

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.utils import wrap_app

from .agents import AgentConfigError
from .core.agent import Agent
from .core.manager import SessionManager
from .handoff import Handoff, shutdown_requested
from .logs import log_event
from .settings import Settings
from .shutdown import shutdown_signals
from .startup import StartupGuard, agent_error, bind_error
from .web.app import create_app
from .web.state import app_state
from .worker import serve as worker_serve

logger = logging.getLogger(__name__)

# Time for responses to write their terminal frames after the drain.
FLUSH_TIMEOUT = 5.0
# Time beyond the cleanup budget that the drain waits for interrupted runs.
CLEANUP_SLACK = 1.0


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
    that see it). A worker's ``fd://`` binds (sockets its supervisor bound
    and listens on) get the same options again, which changes nothing."""
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
    handoff: Handoff | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until a shutdown signal (see :mod:`server.shutdown`), then drain.

    ``handoff``: this process is a worker of ``--workers N``
    (:mod:`server.handoff`): it serves the supervisor's sockets, logs
    ``worker_listening`` (the supervisor logs ``listening``), tells the
    supervisor once it listens and shuts down if the supervisor goes.

    Raises :class:`~server.startup.StartupError` for a start-up error the
    operator can fix; nothing is logged as ``listening`` then."""
    # Installed before Hypercorn starts listening, so a signal that arrives
    # as soon as the server is up waits here instead of killing the process.
    with shutdown_signals() as signals:
        try:
            app = create_app(settings, agent=agent)
        except AgentConfigError as exc:
            raise agent_error(exc) from exc
        state = app_state(app)

        async def drain_on_signal() -> None:
            await shutdown_requested(signals, handoff)
            if state.manager is not None:
                log_event(logger, "draining", timeout_s=settings.drain_timeout)
                await drain(state.manager, settings, hurry=signals.hurried)
            log_event(logger, "drained")

        config = hypercorn_config(settings)
        if handoff is not None:
            config.bind = handoff.binds
        try:
            sockets = listening_sockets(config, settings)
        except OSError as exc:
            raise bind_error(exc, settings) from exc
        guard = StartupGuard(app, app.logger)
        try:
            with guard.cancel_scope:
                async with trio.open_nursery() as nursery:
                    # hypercorn.trio.serve, with our sockets.
                    binds: list[str] = await nursery.start(
                        partial(
                            worker_serve,
                            wrap_app(guard, config.wsgi_max_body_size, "asgi"),
                            config,
                            sockets=sockets,
                            shutdown_trigger=drain_on_signal,
                        )
                    )
                    for bind in binds:
                        log_event(logger, "worker_listening" if handoff else "listening", url=bind)
                    if handoff is not None:
                        handoff.report_ready()
                    task_status.started(binds)
        finally:
            for sock in [*sockets.secure_sockets, *sockets.insecure_sockets]:
                sock.close()
        guard.raise_failure()


async def drain(manager: SessionManager, settings: Settings, *, hurry: trio.Event) -> None:
    """``manager.drain``: stop admitting runs, give live ones the drain
    timeout, interrupt the rest (reason ``shutdown``) and await their
    cleanup. Once ``hurry`` is set, the rest of the drain timeout is skipped.

    Bounded: each run's cleanup is bounded by the cleanup budget; should
    runs still be live a cleanup budget (and a little) after the drain
    timeout, a warning says so and Hypercorn closes anyway (the lifespan
    shutdown then interrupts what is left)."""

    async def interrupt_when_hurried() -> None:
        await hurry.wait()
        log_event(logger, "drain_skipped", live_runs=len(manager.live_runs.runs))
        await manager.drain(grace_period=0)

    with trio.move_on_after(
        settings.drain_timeout + settings.cleanup_budget + CLEANUP_SLACK
    ) as waited:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(interrupt_when_hurried)
            await manager.drain(grace_period=settings.drain_timeout)
            nursery.cancel_scope.cancel()
    if waited.cancelled_caught:
        live = len(manager.live_runs.runs)
        log_event(logger, "drain_incomplete", logging.WARNING, live_runs=live)
