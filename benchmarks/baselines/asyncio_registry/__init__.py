"""The design trio-stream-server replaces, kept runnable as a baseline.

What it reproduces (faithfully, bugs included; do not fix them here):

* an asyncio server (Starlette on uvicorn + httptools) with a ``StreamRegistry``:
  a dict of live streams keyed by session id;
* ``register()`` supersedes the session's previous stream by setting its
  ``cancel_event``, calling ``task.cancel()``, setting the model client's
  cancellation flag and releasing the session's model lock, then
  ``await asyncio.wait_for(prev_task, timeout=2.0)``; on ``TimeoutError`` it
  logs ``prev_stream_timeout_on_cancel`` and registers the new stream anyway;
* the response generator checks ``cancel_event`` each iteration and polls
  ``request.is_disconnected()``; its ``finally`` cancels the agent task with
  ``wait_for(..., 0.5)`` and pops the registry entry for the session (which,
  after a supersede, is the *new* stream's entry);
* the agent calls the model with a blocking HTTP client inside
  ``asyncio.to_thread``; the thread streams the upstream's SSE and hands tokens
  to an ``asyncio.Queue`` with ``loop.call_soon_threadsafe``. The client only
  looks at its cancellation flag between lines, so nothing can interrupt a
  blocked read: a superseded call against a stalled upstream keeps its thread
  (and its upstream connection) until the upstream sends something.

Why it is kept: issue 5 ("Side by side with the asyncio design") measures
trio-stream-server against it over real HTTP with the same fake upstream
(supersede latency, overlap, leaks, hangs, throughput). It logs the same
lifecycle lines as ours (logger ``server.lifecycle``, same format) so one
harness reads both. It lives under ``benchmarks/`` and is not shipped in the
``server`` package.

Run::

    python -m benchmarks.baselines.asyncio_registry --host 127.0.0.1 --port 0 \
        --upstream-url http://127.0.0.1:PORT/v1 [--model m] [--api-key devkey]
"""
