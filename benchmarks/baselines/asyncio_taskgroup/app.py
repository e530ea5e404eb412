"""The ASGI app of the asyncio TaskGroup baseline (see the package docstring).

Ownership, top down:

* the ASGI lifespan task holds the app's ``asyncio.TaskGroup`` (and the
  upstream ``httpx2.AsyncClient``) open for the life of the server;
* each session is a task in that group; it holds the session's own
  ``TaskGroup`` open until it has been idle for ``idle_timeout``;
* each run is a task in its session's group; request handlers only submit a
  prompt, then read the run's ``asyncio.Queue`` and write frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx2

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# The same logger name and line shape as ``server.core.lifecycle_log``, so
# the harness parses every server's log with one regex.
lifecycle_logger = logging.getLogger("server.lifecycle")
logger = logging.getLogger("benchmarks.asyncio_taskgroup")

SESSION_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
DONE_FRAME = b"data: [DONE]\n\n"
UPSTREAM_FAILED = {"code": "upstream_error", "message": "the model upstream failed"}


def lifecycle_event(name: str, **fields: object) -> None:
    lifecycle_logger.info("%s %s", name, " ".join(f"{k}={v}" for k, v in fields.items()))


@dataclass(frozen=True, kw_only=True)
class Config:
    upstream_url: str
    model: str | None = None
    api_keys: frozenset[str] = frozenset({"devkey"})
    upstream_api_key: str | None = None
    cleanup_budget: float = 5.0
    idle_timeout: float = 300.0
    upstream_timeout: float = 60.0
    connect_timeout: float = 5.0
    max_body_bytes: int = 1 << 20


class UpstreamError(Exception):
    """The upstream answered something other than a complete OpenAI stream."""


class Draining(Exception):
    """The server is shutting down and admits no new runs."""


class SessionClosed(Exception):
    """The session ended while a submission waited for it."""


# --- a run -----------------------------------------------------------------


class Run:
    """One answer: a task in its session's TaskGroup that streams the upstream
    and puts encoded SSE frames on ``output`` (``None`` marks the end)."""

    def __init__(
        self,
        *,
        session_id: str,
        messages: list[Any],
        model: str,
        config: Config,
        client: httpx2.AsyncClient,
        on_ended: Callable[[], None],
    ) -> None:
        self.run_id = secrets.token_hex(8)
        self.session_id = session_id
        self.messages = messages
        self.model = model
        self.config = config
        self.client = client
        self.on_ended = on_ended
        self.created = int(time.time())
        self.output: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.ended = asyncio.Event()
        self.cancel_reason: str | None = None
        self.task: asyncio.Task[None] | None = None
        self.events = 0
        self._producer: asyncio.Task[None] | None = None

    @property
    def alive(self) -> bool:
        return not self.ended.is_set()

    def cancel(self, reason: str) -> bool:
        """Stop producing, with a reason; false if it is too late to."""
        if self.cancel_reason is not None or self.ended.is_set():
            return False
        if self._producer is not None and self._producer.done():
            return False  # its output is complete: it completes
        self.cancel_reason = reason
        if self._producer is not None:
            lifecycle_event("stream_cancelled", trace=self.run_id, reason=reason)
            self._producer.cancel()
        # else: main() has not begun; it sees the reason first thing and ends.
        return True

    def _emit(self, delta: dict[str, Any], finish: dict[str, Any] | None = None) -> None:
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": None}
        extra: dict[str, Any] = {}
        if finish is not None:
            choice["finish_reason"] = finish["finish_reason"]
            extra = {k: v for k, v in finish.items() if k != "finish_reason"}
        chunk = {
            "id": f"chatcmpl-{self.run_id}",
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            **extra,
        }
        self.output.put_nowait(
            b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"
        )
        self.events += 1

    async def main(self) -> None:
        """The run's task. The upstream is streamed by a producer task in the
        run's own TaskGroup: cancel() cancels that task (the group absorbs
        it), and a cancellation of the run's task itself (its session's
        TaskGroup closing) ends the run ``interrupted`` and propagates."""
        loop = asyncio.get_running_loop()
        started_at = loop.time()
        lifecycle_event("stream_start", trace=self.run_id, session=self.session_id)
        self._emit({"role": "assistant", "content": ""})
        outcome: str | None = None
        failure = UPSTREAM_FAILED
        try:
            if self.cancel_reason is not None:
                # Superseded before it began: it ends without calling upstream.
                lifecycle_event("stream_cancelled", trace=self.run_id, reason=self.cancel_reason)
                outcome = "cancelled"
            else:
                # No checkpoint from the start of main() to here, so cancel()
                # always finds either no producer (handled above) or this one.
                async with asyncio.TaskGroup() as group:
                    producer = group.create_task(self._produce(), name=f"upstream-{self.run_id}")
                    self._producer = producer
                outcome = "cancelled" if producer.cancelled() else "completed"
        except* (UpstreamError, httpx2.HTTPError) as errors:
            logger.warning("run %s: upstream failed: %r", self.run_id, errors.exceptions)
            outcome = "failed"
        except* Exception:
            logger.exception("run %s: failed", self.run_id)
            failure = {"code": "internal_error", "message": "internal error"}
            outcome = "failed"
        finally:
            if outcome is None and self.cancel_reason is None:
                # Cancelled by its owner (the session's TaskGroup is closing).
                self.cancel_reason = "shutdown"
                lifecycle_event("stream_cancelled", trace=self.run_id, reason="shutdown")
            finish: dict[str, Any]
            if outcome == "completed":
                status, finish = "completed", {"finish_reason": "stop"}
            elif outcome == "failed":
                status, finish = "failed", {"finish_reason": "error", "error": failure}
            else:
                interrupted = self.cancel_reason == "shutdown"
                status = "interrupted" if interrupted else "cancelled"
                finish = {
                    "finish_reason": status,
                    "cancel_reason": self.cancel_reason,
                }
            # Exactly one terminal chunk, then [DONE], then the end marker.
            self._emit({}, finish)
            self.output.put_nowait(DONE_FRAME)
            self.output.put_nowait(None)
            self.ended.set()
            lifecycle_event(
                "stream_end",
                trace=self.run_id,
                status=status,
                events=self.events,
                duration_ms=round((loop.time() - started_at) * 1000),
            )
            self.on_ended()

    async def _produce(self) -> None:
        headers = {"X-Session-Id": self.session_id}
        if self.config.upstream_api_key:
            headers["Authorization"] = f"Bearer {self.config.upstream_api_key}"
        request = self.client.build_request(
            "POST",
            self.config.upstream_url.rstrip("/") + "/chat/completions",
            json={"model": self.model, "messages": self.messages, "stream": True},
            headers=headers,
        )
        response = await self.client.send(request, stream=True)
        try:
            if response.status_code != 200:
                raise UpstreamError(f"upstream answered HTTP {response.status_code}")
            await self._relay(response)
        finally:
            # Closing an unfinished response closes its connection: on cancel,
            # the upstream sees the disconnect. Bounded, and never replaces the
            # exception in flight.
            try:
                async with asyncio.timeout(self.config.cleanup_budget):
                    await response.aclose()
            except TimeoutError:
                logger.warning(
                    "cleanup_budget_exceeded trace=%s budget_s=%s",
                    self.run_id,
                    self.config.cleanup_budget,
                )

    async def _relay(self, response: httpx2.Response) -> None:
        buffer = b""
        async with contextlib.aclosing(response.aiter_raw()) as pieces:
            async for piece in pieces:
                buffer += piece
                *events, buffer = buffer.split(b"\n\n")
                for event in events:
                    if self._relay_event(event):
                        return
        raise UpstreamError("upstream closed the stream before [DONE]")

    def _relay_event(self, event: bytes) -> bool:
        """Emit the text of one upstream SSE event; whether it was ``[DONE]``."""
        for line in event.splitlines():
            if line.startswith(b"event:") and line[6:].strip() == b"error":
                raise UpstreamError("upstream sent an error event")
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                return True
            try:
                chunk = json.loads(data)
            except ValueError:
                raise UpstreamError("upstream sent malformed JSON") from None
            for choice in chunk.get("choices") or ():
                text = (choice.get("delta") or {}).get("content")
                if text:
                    self._emit({"content": text})
        return False


# --- a session -------------------------------------------------------------


class Session:
    """Owns its runs: a task holding the session's TaskGroup open."""

    def __init__(self, session_id: str, manager: Manager, *, idle_timeout: float) -> None:
        self.session_id = session_id
        self.manager = manager
        self.idle_timeout = idle_timeout
        self.current: Run | None = None
        self.users = 0
        self.closed = False
        self.task: asyncio.Task[None] | None = None
        self._group: asyncio.TaskGroup | None = None
        self._ready = asyncio.Event()
        # FIFO: the order submissions reach the lock is the order they are
        # served, so the last prompt admitted is the one left running.
        self._turn = asyncio.Lock()
        self._changed = asyncio.Event()
        self._idle_since = asyncio.get_running_loop().time()

    @property
    def idle(self) -> bool:
        return self.users == 0 and (self.current is None or not self.current.alive)

    async def serve(self) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                self._ready.set()
                await self._wait_idle_expired()
        except Exception:
            logger.exception("session %s failed and was dropped", self.session_id)
        finally:
            self.close()

    async def _wait_idle_expired(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            changed = self._changed
            if self.idle:
                remaining = self._idle_since + self.idle_timeout - loop.time()
                if remaining <= 0:
                    # Same step as the idle check: a submitter either was
                    # admitted before (so not idle) or finds no session.
                    self.close()
                    return
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await changed.wait()
            else:
                await changed.wait()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._ready.set()
            self.manager.dropped(self)

    def touch(self) -> None:
        self._idle_since = asyncio.get_running_loop().time()
        self._changed.set()
        self._changed = asyncio.Event()

    def admit(self) -> None:
        """Count a submission as a user (synchronously, at admission)."""
        if self.closed:
            raise SessionClosed
        self.users += 1
        self.touch()

    async def submit(self, messages: list[Any], model: str) -> Run:
        """Supersede the current run (cancel it, await its cleanup), then start
        a new one in this session's TaskGroup. Call after :meth:`admit`."""
        loop = asyncio.get_running_loop()
        try:
            await self._ready.wait()
            async with self._turn:
                if self.closed or self._group is None:
                    raise SessionClosed
                if self.manager.draining:
                    raise Draining
                previous = self.current
                if previous is not None and previous.alive:
                    wait_started = loop.time()
                    previous.cancel("superseded")
                    # No timeout here: the run's cleanup is bounded by its
                    # own budget, so this wait is too.
                    await previous.ended.wait()
                    lifecycle_event(
                        "prev_stream_finished_cleanly",
                        session=self.session_id,
                        trace=previous.run_id,
                        waited_ms=round((loop.time() - wait_started) * 1000),
                    )
                    if self.manager.draining:
                        raise Draining
                if self.closed:
                    raise SessionClosed
                run = Run(
                    session_id=self.session_id,
                    messages=messages,
                    model=model,
                    config=self.manager.config,
                    client=self.manager.client,
                    on_ended=self.touch,
                )
                self.current = run
                run.task = self._group.create_task(run.main(), name=f"run-{run.run_id}")
                return run
        finally:
            self.users -= 1
            self.touch()


# --- the process's sessions ------------------------------------------------


class Manager:
    def __init__(self, config: Config, client: httpx2.AsyncClient, group: asyncio.TaskGroup):
        self.config = config
        self.client = client
        self._group = group
        self.sessions: dict[str, Session] = {}
        self.draining = False

    def admit(self, session_id: str | None) -> Session:
        """The session for ``session_id`` (made, with its task, if needed),
        with this submission counted as a user. Synchronous."""
        if session_id is None:
            # A session of its own, dropped as soon as it is idle.
            session_id = f"anon-{secrets.token_hex(8)}"
            idle_timeout = 0.0
        else:
            idle_timeout = self.config.idle_timeout
        session = self.sessions.get(session_id)
        if session is None or session.closed:
            session = Session(session_id, self, idle_timeout=idle_timeout)
            self.sessions[session_id] = session
            session.task = self._group.create_task(session.serve(), name=f"session-{session_id}")
        session.admit()
        return session

    def dropped(self, session: Session) -> None:
        if self.sessions.get(session.session_id) is session:
            del self.sessions[session.session_id]

    async def drain(self) -> None:
        """Admit no new runs; cancel the live ones (reason ``shutdown``) and
        await their cleanup."""
        self.draining = True
        runs = [s.current for s in self.sessions.values() if s.current and s.current.alive]
        for run in runs:
            run.cancel("shutdown")
        for run in runs:
            await run.ended.wait()

    def stop(self) -> None:
        """End every session's task (after :meth:`drain`)."""
        for session in list(self.sessions.values()):
            if session.task is not None:
                session.task.cancel()


# --- HTTP ------------------------------------------------------------------


class HTTPError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


async def send_json(
    send: Send, status: int, value: Any, headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    body = json.dumps(value).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(body)),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class App:
    """The ASGI application."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.manager: Manager | None = None

    async def drain(self) -> None:
        if self.manager is not None:
            await self.manager.drain()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            try:
                await self._http(scope, receive, send)
            except HTTPError as error:
                extra = [(b"retry-after", b"1")] if error.status == 503 else []
                body = {"error": {"code": error.code, "message": error.message}}
                await send_json(send, error.status, body, extra)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        message = await receive()
        assert message["type"] == "lifespan.startup"
        timeout = httpx2.Timeout(self.config.upstream_timeout, connect=self.config.connect_timeout)
        limits = httpx2.Limits(max_connections=None, max_keepalive_connections=1000)
        async with (
            httpx2.AsyncClient(timeout=timeout, limits=limits) as client,
            asyncio.TaskGroup() as group,
        ):
            self.manager = Manager(self.config, client, group)
            await send({"type": "lifespan.startup.complete"})
            message = await receive()
            assert message["type"] == "lifespan.shutdown"
            await self.manager.drain()
            self.manager.stop()
        await send({"type": "lifespan.shutdown.complete"})

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = (scope["method"], scope["path"])
        if route == ("POST", "/v1/chat/completions"):
            await self._chat(scope, receive, send)
        elif route == ("GET", "/debug/tasks"):
            sessions = self.manager.sessions if self.manager else {}
            await send_json(
                send,
                200,
                {
                    "asyncio_tasks": len(asyncio.all_tasks()),
                    "threads": threading.active_count(),
                    "rss_bytes": rss_bytes(),
                    "sessions": len(sessions),
                    "live_runs": sum(1 for s in sessions.values() if s.current and s.current.alive),
                },
            )
        elif scope["path"] in ("/v1/chat/completions", "/debug/tasks"):
            raise HTTPError(405, "method_not_allowed", "method not allowed")
        else:
            raise HTTPError(404, "not_found", "no such route")

    def _authorise(self, headers: dict[bytes, bytes]) -> None:
        scheme, _, key = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or key.strip() not in self.config.api_keys:
            raise HTTPError(401, "unauthorized", "a valid API key is required")

    async def _read_body(self, receive: Receive) -> bytes:
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise HTTPError(400, "client_disconnected", "the client went away")
            body += message.get("body", b"")
            if len(body) > self.config.max_body_bytes:
                raise HTTPError(413, "request_too_large", "the request body is too large")
            if not message.get("more_body", False):
                return bytes(body)

    def _parse(self, body: bytes) -> tuple[list[Any], str]:
        try:
            request = json.loads(body)
        except ValueError:
            raise HTTPError(400, "invalid_json", "the body is not JSON") from None
        if not isinstance(request, dict):
            raise HTTPError(422, "invalid_request", "the body must be a JSON object")
        messages = request.get("messages")
        if messages is None and isinstance(request.get("prompt"), str):
            messages = [{"role": "user", "content": request["prompt"]}]
        if not isinstance(messages, list) or not messages:
            raise HTTPError(422, "invalid_request", "messages must be a non-empty list")
        if request.get("stream") is not True and "prompt" not in request:
            raise HTTPError(422, "invalid_request", "this baseline only streams (stream: true)")
        model = request.get("model") or self.config.model or "default"
        if not isinstance(model, str):
            raise HTTPError(422, "invalid_request", "model must be a string")
        return messages, model

    async def _chat(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope["headers"])
        self._authorise(headers)
        raw_session = headers.get(b"x-session-id")
        session_id = None if raw_session is None else raw_session.decode("latin-1")
        if session_id is not None and not SESSION_ID.fullmatch(session_id):
            raise HTTPError(400, "invalid_session_id", "X-Session-Id: 1-128 of [A-Za-z0-9._:-]")
        messages, model = self._parse(await self._read_body(receive))
        manager = self.manager
        if manager is None or manager.draining:
            raise HTTPError(503, "draining", "the server is shutting down")
        try:
            session = manager.admit(session_id)
            run = await session.submit(messages, self.config.model or model)
        except (Draining, SessionClosed):
            raise HTTPError(503, "draining", "the server is shutting down") from None
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream"),
                    (b"cache-control", b"no-cache"),
                    (b"x-run-id", run.run_id.encode()),
                    (b"x-session-id", run.session_id.encode()),
                ],
            }
        )
        try:
            async with asyncio.TaskGroup() as group:
                watcher = group.create_task(watch_disconnect(receive, run))
                await write_frames(send, run)
                watcher.cancel()
        finally:
            # Nobody reads this run any more (we were cancelled): stop it.
            run.cancel("client_disconnect")


async def watch_disconnect(receive: Receive, run: Run) -> None:
    """Cancel the run when the client goes away."""
    while (await receive())["type"] != "http.disconnect":
        pass
    run.cancel("client_disconnect")


async def write_frames(send: Send, run: Run) -> None:
    """Only reads: everything pending on the run's queue goes out in one write."""
    queue = run.output
    while True:
        frames = [await queue.get()]
        while not queue.empty():
            frames.append(queue.get_nowait())
        last = frames[-1] is None
        body = b"".join(frame for frame in frames if frame is not None)
        await send({"type": "http.response.body", "body": body, "more_body": not last})
        if last:
            return
