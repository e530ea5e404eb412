"""The HTTP edge: Quart-Trio routes that parse, authorise, negotiate and
encode. The engine does the rest; no nursery is opened here.

Streaming responses are exempt from Quart's ``RESPONSE_TIMEOUT`` (which
would silently cut a long answer at 60 s): a stream ends when its run does.
"""

from __future__ import annotations

import time
from pathlib import Path

import trio
from quart import Response, g, jsonify, request
from quart_trio import QuartTrio

from ..agents import build_agent
from ..cluster.setup import open_cluster
from ..core.agent import Agent
from ..core.coordinator import Coordinator, InProcessCoordinator
from ..core.events import RunFailed
from ..core.lifecycle_log import set_process_node
from ..core.manager import SessionManager
from ..core.run import NullObserver, Run, RunObserver
from ..core.session import OnConflict
from ..settings import Settings
from ..store import Retention, SqliteRunStore, StoreObserver
from ..wire import FrameEncoder, NativeNdjsonEncoder, NativeSseEncoder, OpenAIChunkEncoder
from ..wire.openai import completion
from .asgi import StreamingHTTPConnection
from .auth import KeyRing
from .cluster_metrics import install_cluster_metrics
from .errors import error_response, install_error_handlers
from .metrics import MeteredObserver, install_metrics_route
from .openapi import install_openapi_route
from .ops import install_ops_routes
from .page import install_page
from .requests import ChatRequest, check_head_size, parse_session_id, read_chat_request
from .runs import install_run_routes
from .state import AppState
from .streaming import RunStream, StreamResponse, wait_for_end

NDJSON = "application/x-ndjson"


def create_app(settings: Settings, *, agent: Agent | None = None) -> QuartTrio:
    # An explicit root path: Flask cannot derive one for a package found
    # through an editable install's import hook; it also roots the static
    # route (/static/<file>) that serves the chat page's assets (page.py).
    app = QuartTrio(__name__, root_path=str(Path(__file__).parent))
    app.asgi_http_class = StreamingHTTPConnection
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    # Quart-Trio bounds the after_serving hooks by this; ours interrupt live
    # runs (each bounded by the cleanup budget) and close the agent.
    app.config["BACKGROUND_TASK_SHUTDOWN_TIMEOUT"] = 2 * settings.cleanup_budget + 5
    state = AppState(
        settings=settings,
        agent=agent or build_agent(settings),
        keyring=KeyRing(settings.accepted_keys),
    )
    app.extensions["stream_server"] = state
    install_error_handlers(app)

    @app.before_request
    async def limit_head_size() -> None:  # noqa: ASYNC124
        check_head_size(
            request.scope.get("raw_path", b"") + request.scope.get("query_string", b""),
            request.headers.items(),
            settings.max_header_bytes,
        )

    install_run_routes(app, state)
    install_ops_routes(app, state)
    install_metrics_route(app, state)
    install_page(app)
    install_openapi_route(app)

    @app.before_serving
    async def start_engine() -> None:
        # An agent with a companion to host (the asyncio adapter's loop) has
        # it started here and ended by its aclose, after the runs.
        serve_agent = getattr(state.agent, "serve", None)
        if serve_agent is not None:
            await app.nursery.start(serve_agent)
        observer: RunObserver = NullObserver()
        if settings.data_dir:
            # Opening marks rows a crash left running as interrupted.
            state.store = await SqliteRunStore.open(Path(settings.data_dir))
            store_observer = StoreObserver(state.store, store_prompts=settings.store_prompts)
            # Retries the writes the store refused (a full disk); ends when the store closes.
            await app.nursery.start(store_observer.serve)
            observer = store_observer
            state.retention = Retention(store=state.store)
            await app.nursery.start(state.retention.serve)
        coordinator: Coordinator = InProcessCoordinator()
        if settings.redis_url:
            # A node of a cluster: Redis unreachable now is a start-up error.
            state.cluster, state.cluster_backend = await open_cluster(settings, app.nursery)
            install_cluster_metrics(state.metrics.registry, state.cluster.metrics)
            coordinator = state.cluster
        manager = SessionManager(
            agent=state.agent,
            observer=MeteredObserver(observer, state.metrics),
            config=settings.engine_config(),
            coordinator=coordinator,
        )
        state.manager = await app.nursery.start(manager.serve)

    @app.after_serving
    async def stop_engine() -> None:
        # Runs first (their cleanup records their terminal status), then the
        # agent, then the store.
        if state.manager is not None:
            await state.manager.aclose()
        if state.cluster_backend is not None:
            state.cluster_backend.stop()
            set_process_node(None)
        aclose = getattr(state.agent, "aclose", None)
        if aclose is not None:
            with trio.move_on_after(settings.cleanup_budget):
                await aclose()
        if state.retention is not None:
            state.retention.stop()
        if state.store is not None:
            await state.store.aclose()

    @app.post("/v1/chat/completions")
    async def chat_completions() -> Response:
        principal = state.keyring.authenticate(request.headers.get("Authorization"))
        session_id = parse_session_id(request.headers.get("X-Session-Id"))
        body = await request.get_data(cache=False, as_text=False, parse_form_data=False)
        g.body_read = True  # an error from here on may keep the connection
        chat = await read_chat_request(
            body, max_messages=settings.max_messages, limiter=state.parse_limiter
        )
        agent_request = chat.agent_request(
            max_chars=settings.max_prompt_chars, max_messages=settings.max_messages
        )
        run = await state.running_manager().submit(
            principal, session_id, agent_request, on_conflict=OnConflict(chat.on_conflict)
        )
        model = chat.model or state.agent.name
        encoder = negotiate(chat, model=model)
        headers = {"X-Run-Id": run.run_id, "X-Session-Id": run.session_id}
        cancel_on_disconnect = chat.on_disconnect == "cancel"
        if encoder is None:
            return await complete_once(
                run, model=model, headers=headers, cancel_on_disconnect=cancel_on_disconnect
            )
        stream = RunStream(
            run,
            encoder,
            heartbeat_interval=settings.heartbeat_interval,
            send_timeout=settings.send_timeout,
            cancel_on_close=cancel_on_disconnect,
        )
        return StreamResponse(stream, headers)

    return app


def negotiate(chat: ChatRequest, *, model: str) -> FrameEncoder | None:
    """The encoder for this request; ``None`` for one ``chat.completion``.

    * ``Accept: application/x-ndjson``: native events, one JSON per line;
    * ``X-Stream-Format: events`` (or ``"stream_format": "events"``): native
      events as SSE, each with ``id: <run_id>:<seq>``;
    * otherwise OpenAI: chunks over SSE with ``stream: true``, else one JSON.
    """
    accept = request.headers.get("Accept", "")
    wants_events = (
        request.headers.get("X-Stream-Format", "").strip().lower() == "events"
        or chat.stream_format == "events"
    )
    if NDJSON in accept:
        return NativeNdjsonEncoder()
    if wants_events:
        return NativeSseEncoder()
    if chat.stream:
        include_usage = chat.stream_options is not None and chat.stream_options.include_usage
        return OpenAIChunkEncoder(
            created=int(time.time()), model=model, include_usage=include_usage
        )
    return None


async def complete_once(
    run: Run, *, model: str, headers: dict[str, str], cancel_on_disconnect: bool
) -> Response:
    terminal = await wait_for_end(run, cancel_on_disconnect=cancel_on_disconnect)
    if isinstance(terminal, RunFailed):
        # The agent's or upstream's failure is a bad gateway; our own is a 500.
        status = 500 if terminal.error.code == "internal_error" else 502
        return error_response(status, terminal.error.code, terminal.error.message, headers)
    body = completion(
        run.run_id, created=int(time.time()), model=model, text=run.text, terminal=terminal
    )
    response = jsonify(body)
    response.headers.update(headers)
    return response
