"""Every error a client sees: ``{"error": {"code", "message"}}`` with the
right status. Engine errors and HTTP exceptions are translated here and
nowhere else; exception text never reaches a client."""

from __future__ import annotations

import logging

from quart import Quart, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from ..core.errors import CoordinatorUnavailable
from ..core.limits import LimitExceeded
from ..core.session import Draining, QueueFull, RunInProgress, SessionClosed

logger = logging.getLogger(__name__)


# For answers given before the request body was read (too large, or refused
# before reading it): the server does not want the rest of the body, and says
# it closes the connection. (StreamingHTTPConnection writes such an answer
# once the request has arrived, so a pipelined request cannot cut it short.)
CLOSE_CONNECTION = {"Connection": "close"}


class ApiError(Exception):
    def __init__(
        self, status: int, code: str, message: str, *, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(code)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> Response:
    response = jsonify({"error": {"code": code, "message": message}})
    response.status_code = status
    response.headers.update(headers or {})
    return response


# werkzeug's HTTP exceptions by status: stable codes and plain messages.
_HTTP_CODES = {
    400: ("bad_request", "The request could not be understood."),
    404: ("not_found", "No such resource."),
    405: ("method_not_allowed", "This method is not allowed on this resource."),
    408: ("request_timeout", "The request body did not arrive in time."),
    413: ("payload_too_large", "The request body is larger than the server accepts."),
    415: ("unsupported_media_type", "The request body must be JSON."),
}


# The engine's refusals, as clients see them.
_ENGINE_ERRORS: dict[type[Exception], tuple[int, str, str, dict[str, str]]] = {
    Draining: (
        503,
        "draining",
        "The server is shutting down and accepts no new runs.",
        {"Retry-After": "5"},
    ),
    RunInProgress: (
        409,
        "run_in_progress",
        "The session is still answering; stop that run first or use another on_conflict.",
        {},
    ),
    QueueFull: (
        429,
        "queue_full",
        "Too many prompts are waiting in this session.",
        {"Retry-After": "1"},
    ),
    CoordinatorUnavailable: (
        503,
        "coordinator_unavailable",
        "The cluster's shared state cannot be reached; retry shortly.",
        {"Retry-After": str(CoordinatorUnavailable.retry_after)},
    ),
    SessionClosed: (
        503,
        "session_unavailable",
        "The session could not be started; retry the request.",
        {"Retry-After": "1"},
    ),
}


def install_error_handlers(app: Quart) -> None:
    # Handlers are coroutines although they do not await: Quart-Trio would
    # run a plain function in a worker thread.
    @app.errorhandler(ApiError)
    async def _api_error(error: ApiError) -> Response:  # noqa: ASYNC124
        return error_response(error.status, error.code, error.message, error.headers)

    def engine_error(
        exception: type[Exception], status: int, code: str, message: str, headers: dict[str, str]
    ) -> None:
        @app.errorhandler(exception)
        async def _handler(error: Exception) -> Response:  # noqa: ASYNC124
            return error_response(status, code, message, headers)

    for exception, (status, code, message, headers) in _ENGINE_ERRORS.items():
        engine_error(exception, status, code, message, headers)

    # The engine's limits (server/core/limits.py) say which limit, in words
    # written for clients, and when to retry.
    @app.errorhandler(LimitExceeded)
    async def _limit(error: LimitExceeded) -> Response:  # noqa: ASYNC124
        return error_response(
            429, error.code, error.message, {"Retry-After": str(error.retry_after)}
        )

    @app.errorhandler(HTTPException)
    async def _http_error(error: HTTPException) -> Response:  # noqa: ASYNC124
        status = error.code or 500
        code, message = _HTTP_CODES.get(status, ("http_error", "The request failed."))
        # Keep the headers the status needs (Allow on a 405), not the body's.
        headers = {
            name: value for name, value in error.get_headers() if name.lower() != "content-type"
        }
        if status == 413:
            headers.update(CLOSE_CONNECTION)
        return error_response(status, code, message, headers)

    @app.after_request
    async def _close_after_refused_body(response: Response) -> Response:  # noqa: ASYNC124
        # An error answered before the request's body was read closes the
        # connection rather than take in a body nobody reads. Quart does not
        # say whether a body was read, so the routes that read one say so
        # (g.body_read); any other error to a request that carried a body
        # closes its connection.
        if response.status_code >= 400 and _carries_body() and not g.get("body_read"):
            response.headers.update(CLOSE_CONNECTION)
        return response

    @app.errorhandler(Exception)
    async def _unexpected(error: Exception) -> Response:  # noqa: ASYNC124
        logger.exception("unhandled error in request", exc_info=error)
        return error_response(500, "internal_error", "The server failed to handle the request.")


def _carries_body() -> bool:
    headers = request.headers
    return "transfer-encoding" in headers or headers.get("content-length", "0") not in ("", "0")
