"""The old HTTP edge: Starlette routes, the response generator, the debug
endpoint. Reproduced as it was (see the package docstring)."""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .model import DONE, BlockingModelClient, run_agent
from .registry import StreamHandle, StreamRegistry, lifecycle_event

SESSION_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def sse(value: Any) -> str:
    return f"data: {json.dumps(value)}\n\n"


def chunk(
    trace: str,
    *,
    created: int,
    model: str,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{trace}",
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        **extra,
    }


def create_app(
    *, upstream_url: str, model: str, api_keys: list[str], upstream_key: str | None
) -> Starlette:
    registry = StreamRegistry()
    client = BlockingModelClient(upstream_url, api_key=upstream_key, read_timeout=None)

    async def event_stream(
        request: Request, handle: StreamHandle, model_name: str
    ) -> AsyncIterator[str]:
        created = int(time.time())
        events = 1  # run.started, in our vocabulary
        status = "completed"
        try:
            yield sse(
                chunk(
                    handle.trace,
                    created=created,
                    model=model_name,
                    delta={"role": "assistant", "content": ""},
                )
            )
            while True:
                if handle.cancel_event.is_set():
                    status = "cancelled"
                    events += 1
                    yield sse(
                        chunk(
                            handle.trace,
                            created=created,
                            model=model_name,
                            delta={},
                            finish_reason="cancelled",
                            cancel_reason=handle.cancel_reason or "superseded",
                        )
                    )
                    yield "data: [DONE]\n\n"
                    return
                if await request.is_disconnected():
                    status = "cancelled"
                    handle.mark_cancelled("client_disconnect")
                    return
                # Blocks until the agent hands over something: a stalled
                # upstream means this loop never comes round to the checks.
                item = await handle.queue.get()
                events += 1
                if item is DONE:
                    yield sse(
                        chunk(
                            handle.trace,
                            created=created,
                            model=model_name,
                            delta={},
                            finish_reason="stop",
                        )
                    )
                    yield "data: [DONE]\n\n"
                    return
                if isinstance(item, Exception):
                    status = "failed"
                    yield sse(
                        chunk(
                            handle.trace,
                            created=created,
                            model=model_name,
                            delta={},
                            finish_reason="error",
                            error={"code": "upstream_error", "message": str(item)},
                        )
                    )
                    yield "data: [DONE]\n\n"
                    return
                yield sse(
                    chunk(handle.trace, created=created, model=model_name, delta={"content": item})
                )
        except asyncio.CancelledError:
            status = "cancelled"
            handle.mark_cancelled("client_disconnect")
            raise
        finally:
            task = handle.task
            if task is not None and not task.done():
                task.cancel()
                # Swallows a cancellation of this generator too: kept as it was.
                try:  # noqa: SIM105 -- written as the old code was
                    await asyncio.wait_for(task, timeout=0.5)
                except (TimeoutError, asyncio.CancelledError):  # noqa: ASYNC103 -- old design
                    pass
            registry.pop(handle.session_id)
            lifecycle_event(
                "stream_end",
                trace=handle.trace,
                status=status,
                events=events,
                duration_ms=round((time.monotonic() - handle.started_at) * 1000),
            )

    async def chat_completions(request: Request) -> Response:
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not any(
            hmac.compare_digest(presented.strip().encode(), key.encode()) for key in api_keys
        ):
            return error(401, "unauthorized", "Send 'Authorization: Bearer <api key>'.")
        session_id = request.headers.get("X-Session-Id")
        if session_id is None:
            session_id = uuid.uuid4().hex
        elif not SESSION_ID_PATTERN.fullmatch(session_id):
            return error(400, "invalid_session_id", "X-Session-Id is not valid.")
        try:
            body = json.loads(await request.body())
            messages = body["messages"]
            if not isinstance(messages, list) or not messages:
                raise ValueError("messages")
        except (ValueError, KeyError, TypeError):
            return error(400, "invalid_request", "A JSON body with 'messages' is required.")
        if not body.get("stream", False):
            return error(400, "unsupported", "This baseline answers only stream=true.")
        model_name = body.get("model") or model

        handle = StreamHandle(session_id=session_id, lock=registry.lock_for(session_id))
        await registry.register(handle)
        handle.task = asyncio.create_task(run_agent(handle, client, messages, model_name))
        return StreamingResponse(
            event_stream(request, handle, model_name),
            media_type="text/event-stream",
            headers={
                "Cache-Control": "no-cache",
                "X-Run-Id": handle.trace,
                "X-Session-Id": session_id,
            },
        )

    # Async on purpose: a sync endpoint would run in a worker thread and be
    # measured from there.
    async def debug_tasks(request: Request) -> Response:  # noqa: ASYNC124 -- see above
        return JSONResponse(
            {
                "asyncio_tasks": len(asyncio.all_tasks()),
                "threads": threading.active_count(),
                "rss_bytes": rss_bytes(),
                "streams": len(registry),
                "model_calls_in_flight": client.in_flight,
            }
        )

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/debug/tasks", debug_tasks, methods=["GET"]),
        ],
    )
    app.state.model_client = client
    return app
