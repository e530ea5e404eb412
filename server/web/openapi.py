"""The OpenAPI 3.1 document of the public API, served at ``GET /openapi.json``
without authentication.

The document is written out by hand, next to nothing it could be derived
from, so that it is a statement to check the code against:
tests/unit/test_openapi.py holds it to the app's routes and to the request
parser, and tests/fuzz/test_http_fuzz.py sends schemathesis-generated
requests built from it to a real server.

The components (schemas) are in :mod:`server.web.openapi_schemas`; this
module holds the routes and assembles the document.
"""

from __future__ import annotations

import copy
from typing import Any

from quart import Response, jsonify
from quart_trio import QuartTrio

from .. import __version__
from .openapi_schemas import (
    EVENT_TYPES,
    JSON,
    NDJSON,
    NO_AUTH,
    SCHEMAS,
    SESSION_ID,
    SSE,
    json_content,
    ref,
)


def _error(description: str, *, retry_after: bool = False) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description, "content": json_content(ref("Error"))}
    if retry_after:
        response["headers"] = {
            "Retry-After": {
                "description": "Seconds to wait before retrying.",
                "schema": {"type": "string", "pattern": "^[0-9]+$"},
            }
        }
    return response


_UNAUTHORIZED = _error("`unauthorized`: missing or unknown API key.")
_SERVER_BUG = _error("`internal_error`: a server bug (logged with its traceback).")
_STARTING = _error("`starting`: the engine is not running yet.", retry_after=True)

_RUN_HEADERS = {
    "X-Run-Id": {"description": "The run answering this request.", "schema": {"type": "string"}},
    "X-Session-Id": {
        "description": "The run's session (generated when the request named none).",
        "schema": {"type": "string"},
    },
}

# One native event per line (no OpenAPI 3.1 keyword says "per line").
_NDJSON_EVENTS = {"schema": {"type": "string"}, "x-item-schema": ref("NativeEvent")}

_RUN_ID = {
    "name": "run_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "minLength": 1},
}

_CHAT_COMPLETIONS = {
    "post": {
        "operationId": "createChatCompletion",
        "summary": "Start a run for a prompt and answer it (one JSON or a stream).",
        "description": (
            "The response format is negotiated: `Accept: application/x-ndjson` gives native"
            " events, one JSON per line; `X-Stream-Format: events` (or `stream_format:"
            ' "events"`) gives native events as SSE; `stream: true` gives OpenAI'
            " `chat.completion.chunk` objects over SSE ending in `data: [DONE]`; otherwise"
            " one `chat.completion` when the run ends. (OpenAPI ignores `Accept` as a"
            " parameter, so it is described here and by the response media types.)"
        ),
        "parameters": [
            {
                "name": "X-Session-Id",
                "in": "header",
                "required": False,
                "description": "The session; without it the request is a session of its own.",
                "schema": SESSION_ID,
            },
            {
                "name": "X-Stream-Format",
                "in": "header",
                "required": False,
                "description": "`events`: native events over SSE; other values are ignored.",
                "schema": {"type": "string"},
            },
        ],
        "requestBody": {"required": True, "content": json_content(ref("ChatRequest"))},
        "responses": {
            "200": {
                "description": "The answer: one `chat.completion`, or a stream.",
                "headers": _RUN_HEADERS,
                "content": {
                    JSON: {"schema": ref("ChatCompletion")},
                    # OpenAPI 3.1: an event stream's schema describes one event.
                    SSE: {
                        "schema": {
                            # SSE parsers name an event without `event:` "message".
                            "if": {
                                "required": ["event"],
                                "properties": {"event": {"enum": list(EVENT_TYPES)}},
                            },
                            "then": ref("NativeSseEvent"),
                            "else": ref("ChunkSseEvent"),
                        }
                    },
                    NDJSON: _NDJSON_EVENTS,
                },
            },
            "400": _error("`invalid_json` (body is not JSON) or `invalid_session_id`."),
            "401": _UNAUTHORIZED,
            "408": _error("`request_timeout`: the request body did not arrive in time."),
            "409": _error("`run_in_progress`: `on_conflict: reject` while the session is busy."),
            "413": _error(
                "`payload_too_large` (body over `--max-body-bytes`), `prompt_too_large`,"
                " `too_many_messages` or `too_many_values`."
            ),
            "422": _error(
                "`invalid_request` (wrong shape; the first five problems named) or"
                " `missing_prompt`."
            ),
            "429": _error(
                "`queue_full`: `on_conflict: enqueue` with the line full.", retry_after=True
            ),
            "500": _error("`internal_error`: the run failed on a server bug, or a server bug."),
            "502": _error("The agent's error code: a non-streaming request whose run failed."),
            "503": _error(
                "`draining`, `starting`, `session_unavailable` or `coordinator_unavailable`"
                " (cluster mode: Redis unreachable); retry later.",
                retry_after=True,
            ),
        },
    }
}


def _run_lookup_errors() -> dict[str, Any]:
    return {
        "401": _UNAUTHORIZED,
        "404": _error("`run_not_found`: unknown, or another key's."),
        "410": _error("`run_gone`: past retention."),
        "500": _SERVER_BUG,
        "503": _error("`starting`, or the run store failed to answer.", retry_after=True),
    }


_RUN_RECORD = {"description": "The run's record.", "content": json_content(ref("Run"))}

_PATHS: dict[str, Any] = {
    "/v1/chat/completions": _CHAT_COMPLETIONS,
    "/v1/runs/{run_id}": {
        "get": {
            "operationId": "getRun",
            "summary": "A run's record (owner only).",
            "parameters": [_RUN_ID],
            "responses": {"200": _RUN_RECORD, **_run_lookup_errors()},
        }
    },
    "/v1/runs/{run_id}/events": {
        "get": {
            "operationId": "getRunEvents",
            "summary": "Reattach: the run's native events after a seq, then live to its end.",
            "description": "NDJSON with `Accept: application/x-ndjson`, else SSE.",
            "parameters": [
                _RUN_ID,
                {
                    "name": "Last-Event-ID",
                    "in": "header",
                    "required": False,
                    "description": "`<run_id>:<seq>`: the last event the client has.",
                    "schema": {"type": "string"},
                },
                {
                    "name": "after",
                    "in": "query",
                    "required": False,
                    "description": "The last seq the client has (`-1` for none).",
                    "schema": {"type": "string", "pattern": "^(-1|[0-9]{1,9})$"},
                },
            ],
            "responses": {
                "200": {
                    "description": "The run's native events.",
                    "headers": _RUN_HEADERS,
                    "content": {
                        SSE: {"schema": ref("NativeSseEvent")},
                        NDJSON: _NDJSON_EVENTS,
                    },
                },
                "400": _error("`invalid_last_event_id` or `invalid_after`."),
                **_run_lookup_errors(),
            },
        }
    },
    "/v1/runs/{run_id}/cancel": {
        "post": {
            "operationId": "cancelRun",
            "summary": "Stop a run (reason `client_stop`); idempotent.",
            "parameters": [_RUN_ID],
            "responses": {"200": _RUN_RECORD, **_run_lookup_errors()},
        }
    },
    "/v1/sessions/{session_id}": {
        "get": {
            "operationId": "getSession",
            "summary": "A session's current run and recent runs (newest first, up to 10).",
            "parameters": [
                {"name": "session_id", "in": "path", "required": True, "schema": SESSION_ID}
            ],
            "responses": {
                "200": {"description": "The session.", "content": json_content(ref("Session"))},
                "400": _error("`invalid_session_id`."),
                "401": _UNAUTHORIZED,
                "404": _error("`session_not_found`: unknown, or another key's."),
                "500": _SERVER_BUG,
                "503": _STARTING,
            },
        }
    },
    "/healthz": {
        "get": {
            "operationId": "healthz",
            "summary": "The process is alive.",
            "security": NO_AUTH,
            "responses": {
                "200": {"description": "Alive.", "content": json_content(ref("Status"))},
                "500": _SERVER_BUG,
            },
        }
    },
    "/readyz": {
        "get": {
            "operationId": "readyz",
            "summary": "Accepting runs.",
            "security": NO_AUTH,
            "responses": {
                "200": {"description": "Ready.", "content": json_content(ref("Status"))},
                "500": _SERVER_BUG,
                "503": _error("`starting` or `draining`.", retry_after=True),
            },
        }
    },
    "/debug/tasks": {
        "get": {
            "operationId": "debugTasks",
            "summary": "The trio task tree and each session's current run.",
            "description": "Only with `--admin-key`; without one it does not exist (404).",
            "security": [{"adminKey": []}],
            "responses": {
                "200": {"description": "The task tree.", "content": json_content(ref("TaskTree"))},
                "401": _error("`unauthorized`: not the admin key."),
                "404": _error("`not_found`: no admin key is configured."),
                "500": _SERVER_BUG,
                "503": _STARTING,
            },
        }
    },
    "/metrics": {
        "get": {
            "operationId": "metrics",
            "summary": "Prometheus metrics (text exposition format); see docs/operations.md.",
            "security": NO_AUTH,
            "responses": {
                "200": {
                    "description": "The metrics.",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                },
                "500": _SERVER_BUG,
            },
        }
    },
    "/": {
        "get": {
            "operationId": "chatPage",
            "summary": "The chat page (HTML); it asks for the API key itself.",
            "security": NO_AUTH,
            "responses": {
                "200": {
                    "description": "The page.",
                    "content": {"text/html": {"schema": {"type": "string"}}},
                },
                "500": _SERVER_BUG,
            },
        }
    },
    "/static/{filename}": {
        "get": {
            "operationId": "chatPageAsset",
            "summary": "The chat page's script and style.",
            "security": NO_AUTH,
            "parameters": [
                {"name": "filename", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
            "responses": {
                "200": {
                    "description": "The file.",
                    "content": {
                        "text/javascript": {"schema": {"type": "string"}},
                        "text/css": {"schema": {"type": "string"}},
                        "text/html": {"schema": {"type": "string"}},
                    },
                },
                "404": _error("`not_found`: no such file."),
                "500": _SERVER_BUG,
            },
        }
    },
    "/openapi.json": {
        "get": {
            "operationId": "openapi",
            "summary": "This document.",
            "security": NO_AUTH,
            "responses": {
                "200": {"description": "The OpenAPI document.", "content": json_content({})},
                "500": _SERVER_BUG,
            },
        }
    },
}


def openapi_document() -> dict[str, Any]:
    """A fresh copy of the document (callers may change theirs)."""
    return copy.deepcopy(
        {
            "openapi": "3.1.0",
            "info": {
                "title": "trio-stream-server",
                "version": __version__,
                "description": (
                    "Streaming LLM agent chat sessions; see docs/api.md. Every error is"
                    ' `{"error": {"code", "message"}}`; a wrong method is a 405'
                    " `method_not_allowed`, an unknown path a 404 `not_found`."
                ),
            },
            "security": [{"apiKey": []}],
            "paths": _PATHS,
            "components": {
                "schemas": SCHEMAS,
                "securitySchemes": {
                    "apiKey": {
                        "type": "http",
                        "scheme": "bearer",
                        "description": "`--api-key` (dev: `devkey`).",
                    },
                    "adminKey": {
                        "type": "http",
                        "scheme": "bearer",
                        "description": "`--admin-key`.",
                    },
                },
            },
        }
    )


def install_openapi_route(app: QuartTrio) -> None:
    document = openapi_document()

    @app.get("/openapi.json")
    async def openapi() -> Response:  # noqa: ASYNC124
        return jsonify(document)
