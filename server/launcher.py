"""Serve the app with Hypercorn's trio worker and drain runs on SIGINT/SIGTERM.

Why a launcher: Hypercorn cuts open connections ``graceful_timeout`` after
its shutdown trigger fires, and only then runs the ASGI lifespan shutdown.
Draining therefore happens *inside* the shutdown trigger, while connections
are still open: stop admitting runs (503), let live runs finish for up to
``drain_timeout``, cancel the rest with reason ``shutdown`` (their clients
get ``run.interrupted``), and only then let Hypercorn close.
"""

from __future__ import annotations

import logging
import signal
from functools import partial

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from .core.agent import Agent
from .logs import log_event
from .settings import Settings
from .web.app import create_app
from .web.state import app_state

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
    return config


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

        async with trio.open_nursery() as nursery:
            binds: list[str] = await nursery.start(
                partial(
                    hypercorn_serve,
                    app,
                    hypercorn_config(settings),
                    shutdown_trigger=drain_on_signal,
                )
            )
            for bind in binds:
                log_event(logger, "listening", url=bind)
            task_status.started(binds)
