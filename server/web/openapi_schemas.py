"""Components of the OpenAPI document (:mod:`server.web.openapi`): the
request and response bodies, and the helpers its route descriptions share.

Written by hand, like the rest of the document; tests/unit/test_openapi.py
holds these schemas to the request parser and to what the server sends.
"""

from __future__ import annotations

from typing import Any

JSON = "application/json"
SSE = "text/event-stream"
NDJSON = "application/x-ndjson"

EVENT_TYPES = (
    "run.started",
    "run.delta",
    "run.message",
    "run.completed",
    "run.cancelled",
    "run.interrupted",
    "run.failed",
)
CANCEL_REASONS = (
    "superseded",
    "client_stop",
    "client_disconnect",
    "shutdown",
    "deadline",
    "owner_lost",
)
SESSION_ID = {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"}
NO_AUTH: list[dict[str, list[str]]] = []


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def json_content(schema: dict[str, Any]) -> dict[str, Any]:
    return {JSON: {"schema": schema}}


SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "additionalProperties": False,
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "additionalProperties": False,
                "properties": {
                    "code": {"type": "string", "minLength": 1},
                    "message": {"type": "string", "minLength": 1},
                },
            }
        },
    },
    "TextPart": {
        "type": "object",
        "required": ["type"],
        "properties": {
            "type": {"type": "string", "description": "Only `text` parts are read."},
            "text": {"type": "string"},
        },
    },
    "ChatMessage": {
        "type": "object",
        "required": ["role"],
        "properties": {
            "role": {"type": "string"},
            "content": {
                "anyOf": [
                    {"type": "string"},
                    {"type": "array", "items": ref("TextPart")},
                    {"type": "null"},
                ]
            },
        },
    },
    "StreamOptions": {
        "type": "object",
        "properties": {"include_usage": {"type": "boolean"}},
    },
    "ChatRequest": {
        "type": "object",
        "description": (
            "OpenAI Chat Completions compatible. The prompt is `prompt`, else the last"
            " `user` message; a request with neither (or a blank one) is a 422"
            " `missing_prompt`. Unknown fields are ignored."
        ),
        "properties": {
            "messages": nullable({"type": "array", "items": ref("ChatMessage")}),
            "prompt": nullable({"type": "string"}),
            "model": nullable({"type": "string"}),
            "stream": {"type": "boolean", "default": False},
            "stream_options": nullable(ref("StreamOptions")),
            "stream_format": {"enum": ["openai", "events", None]},
            "on_disconnect": {"enum": ["cancel", "continue"], "default": "cancel"},
            "on_conflict": {
                "enum": ["interrupt", "reject", "enqueue", "rollback"],
                "default": "interrupt",
            },
        },
    },
    "Usage": {
        "type": "object",
        "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
        "properties": {
            "prompt_tokens": {"type": "integer", "minimum": 0},
            "completion_tokens": {"type": "integer", "minimum": 0},
            "total_tokens": {"type": "integer", "minimum": 0},
        },
    },
    "ChatCompletion": {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "chat.completion"},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["index", "message", "finish_reason"],
                    "properties": {
                        "index": {"type": "integer"},
                        "message": {
                            "type": "object",
                            "required": ["role", "content"],
                            "properties": {
                                "role": {"const": "assistant"},
                                "content": {"type": "string"},
                            },
                        },
                        "finish_reason": {"type": "string"},
                    },
                },
            },
            "usage": ref("Usage"),
            "cancel_reason": {"type": "string"},
        },
    },
    "RunError": {
        "type": "object",
        "required": ["code", "message"],
        "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
    },
    "NativeEvent": {
        "type": "object",
        "description": (
            "A native typed event. `seq` is 0, 1, 2, ... without gaps; exactly one"
            " terminal event (`run.completed`, `run.cancelled`, `run.interrupted`,"
            " `run.failed`) ends a run."
        ),
        "required": ["type", "run_id", "session_id", "seq"],
        "properties": {
            "type": {"enum": list(EVENT_TYPES)},
            "run_id": {"type": "string"},
            "session_id": {"type": "string"},
            "seq": {"type": "integer", "minimum": 0},
            "text": {"type": "string"},
            "usage": nullable(ref("Usage")),
            "finish_reason": {"type": "string"},
            "reason": {"enum": list(CANCEL_REASONS)},
            "error": ref("RunError"),
            "error_details": ref("RunError"),
        },
    },
    "NativeSseEvent": {
        "type": "object",
        "description": "A native event over SSE: `id: <run_id>:<seq>`, `event: <type>`.",
        "required": ["id", "event", "data"],
        "properties": {
            "id": {"type": "string", "pattern": "^.+:[0-9]+$"},
            "event": {"enum": list(EVENT_TYPES)},
            "data": {
                "type": "string",
                "contentMediaType": JSON,
                "contentSchema": ref("NativeEvent"),
            },
        },
    },
    "ChatCompletionChunk": {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "chat.completion.chunk"},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["index", "delta", "finish_reason"],
                    "properties": {
                        "index": {"type": "integer"},
                        "delta": {
                            "type": "object",
                            "properties": {
                                "role": {"const": "assistant"},
                                "content": {"type": "string"},
                            },
                        },
                        "finish_reason": nullable({"type": "string"}),
                    },
                },
            },
            "usage": ref("Usage"),
            "cancel_reason": {"enum": list(CANCEL_REASONS)},
            "error": ref("RunError"),
        },
    },
    "ChunkSseEvent": {
        "type": "object",
        "description": "An OpenAI chunk over SSE; the last event's data is `[DONE]`.",
        "required": ["data"],
        "if": {"properties": {"data": {"const": "[DONE]"}}},
        "else": {
            "properties": {
                "data": {
                    "type": "string",
                    "contentMediaType": JSON,
                    "contentSchema": ref("ChatCompletionChunk"),
                }
            }
        },
    },
    "Run": {
        "type": "object",
        "required": ["id", "object", "session_id", "status", "text", "created_at"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "run"},
            "session_id": {"type": "string"},
            "status": {"enum": ["running", "completed", "cancelled", "interrupted", "failed"]},
            "cancel_reason": nullable({"type": "string"}),
            "finish_reason": nullable({"type": "string"}),
            "text": {"type": "string"},
            "usage": nullable(ref("Usage")),
            "error": nullable(ref("RunError")),
            "events": nullable({"type": "integer", "minimum": 0}),
            "created_at": {"type": "number"},
            "finished_at": nullable({"type": "number"}),
        },
    },
    "Session": {
        "type": "object",
        "required": ["id", "object", "current_run", "recent_runs"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "session"},
            "current_run": {
                "type": "object",
                "required": ["id", "status"],
                "properties": {"id": {"type": "string"}, "status": {"type": "string"}},
            },
            "recent_runs": {"type": "array", "items": ref("Run")},
        },
    },
    "Status": {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"type": "string"}},
    },
    "TaskTree": {
        "type": "object",
        "required": ["tasks", "threads", "live_runs", "sessions", "task_tree"],
        "properties": {
            "tasks": {"type": "integer"},
            "threads": {"type": "integer"},
            "live_runs": {"type": "integer"},
            "sessions": {"type": "array", "items": {"type": "object"}},
            "task_tree": {"type": "object"},
        },
    },
}
