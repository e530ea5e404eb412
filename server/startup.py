"""Start-up errors the operator can fix, as one line naming the flag to change.

A port in use, a data directory that another server holds or that cannot be
written, an agent that cannot be built: each ends ``python -m server`` with
exit status 2 (as a bad flag does) and one line on stderr, never a
traceback, and never after a ``listening`` line. Anything else that fails
at start-up is a bug: its traceback is logged and the exit status is 1.
"""

from __future__ import annotations

import errno
import logging
import sys

import trio
from hypercorn.typing import ASGIFramework, ASGIReceiveCallable, ASGISendCallable, Scope

from .agents import AgentConfigError
from .cluster.setup import ClusterUnreachable
from .settings import Settings
from .store import StoreOpenError

# The exit status of a start-up error the operator can fix (argparse's for a
# bad flag).
EXIT_STARTUP_ERROR = 2


class StartupError(Exception):
    """The server cannot start for a reason its operator can fix; the
    message is the one line to print."""


def bind_error(exc: OSError, settings: Settings) -> StartupError:
    address = f"{settings.host}:{settings.port}"
    if exc.errno == errno.EADDRINUSE:
        reason = "the address is already in use; choose another --port (or stop what listens there)"
    elif exc.errno == errno.EACCES:
        reason = "permission denied; choose a --port above 1023"
    elif exc.errno == errno.EADDRNOTAVAIL:
        reason = "not an address of this machine; change --host"
    else:
        detail = exc.strerror or str(exc)
        reason = f"{detail}; check --host and --port"
    return StartupError(f"cannot listen on {address}: {reason}")


def agent_error(exc: AgentConfigError) -> StartupError:
    return StartupError(f"agent: {exc}; check --agent and its flags")


def store_error(exc: StoreOpenError) -> StartupError:
    return StartupError(
        f"run store: {exc.reason}; set --data-dir to a writable directory "
        "that no other server uses ('' keeps records in memory only)"
    )


def app_error(exc: BaseException) -> StartupError | None:
    """The :class:`StartupError` for an error of the app's start-up, or
    ``None`` if it is not one the operator can fix (a bug)."""
    if isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        return app_error(exc.exceptions[0])
    if isinstance(exc, StoreOpenError):
        return store_error(exc)
    if isinstance(exc, AgentConfigError):
        return agent_error(exc)
    if isinstance(exc, ClusterUnreachable):
        return StartupError(f"cluster: {exc}")
    return None


class _QuietStartupErrors(logging.Filter):
    """Drops the traceback Quart logs for a failed ``before_serving`` hook
    (``Quart.startup`` logs the error, then re-raises it): the launcher
    raises that error itself, as one line if the operator can fix it and
    with its traceback (printed once) if not."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.exc_info


class StartupGuard:
    """The app, for Hypercorn, with its lifespan start-up watched. Run
    Hypercorn inside :attr:`cancel_scope`, then call :meth:`raise_failure`.

    Upstream cause (Hypercorn 0.18, ``hypercorn/trio/lifespan.py``): the trio
    worker's ``Lifespan`` sets its start-up event in a ``finally`` also when
    the app sends ``lifespan.startup.failed``, so ``worker_serve`` goes on to
    log "Running on ..." and report its binds (our ``listening`` line) before
    the failure cancels it. The guard keeps that message from Hypercorn and
    cancels the worker instead, which then stops in ``wait_for_startup``.
    ``tests/integration/test_startup_errors.py::
    test_hypercorn_still_serves_after_a_failed_lifespan_startup`` fails once
    Hypercorn is fixed; then forwarding the failure is enough.
    """

    def __init__(self, app: ASGIFramework, app_logger: logging.Logger) -> None:
        self.app = app
        self.cancel_scope = trio.CancelScope()
        self.failure: BaseException | None = None
        self._app_logger = app_logger

    def raise_failure(self) -> None:
        """Raise the start-up error, if there was one: a
        :class:`StartupError` if the operator can fix it, else the error."""
        if self.failure is None:
            return
        error = app_error(self.failure)
        if error is None:
            raise self.failure
        raise error from self.failure

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        quiet = _QuietStartupErrors()

        async def watched_send(message: dict[str, object]) -> None:
            if message["type"] in ("lifespan.startup.complete", "lifespan.startup.failed"):
                self._app_logger.removeFilter(quiet)
            if message["type"] == "lifespan.startup.failed":
                # quart-trio sends this from the ``except`` block that caught
                # the start-up error (quart_trio/asgi.py, TrioASGILifespan).
                self.failure = sys.exc_info()[1] or RuntimeError(message.get("message", ""))
                self.cancel_scope.cancel()
                # The worker is cancelled: this raises Cancelled.
                await trio.lowlevel.checkpoint()
            await send(message)  # type: ignore[arg-type]

        self._app_logger.addFilter(quiet)
        try:
            await self.app(scope, receive, watched_send)  # type: ignore[arg-type]
        finally:
            self._app_logger.removeFilter(quiet)
