"""The asyncio TaskGroup baseline: the best asyncio server we can write in good faith.

What it is: the same HTTP subset as trio-stream-server (``POST
/v1/chat/completions`` streaming OpenAI ``chat.completion.chunk`` SSE,
``Authorization: Bearer``, ``X-Session-Id``), served by uvicorn (httptools),
proxying an OpenAI-compatible upstream with ``httpx2.AsyncClient`` on asyncio.

Why it exists: the comparison in issue 5 measures our trio server against
the old asyncio *registry* design. That design fails for reasons of its own
(a proceed-anyway ``wait_for(prev, 2.0)``, a blocking client in
``to_thread`` that cancellation cannot reach), not necessarily because it is
asyncio. This baseline keeps the comparison honest by separating "asyncio"
from "that design": it follows our structure as closely as asyncio allows —

* one ``asyncio.TaskGroup`` per session, owned by a per-session task, which
  in turn lives in the app's TaskGroup (held open by the ASGI lifespan);
* a new prompt cancels the current run (its upstream task, in the run's own
  TaskGroup) and *awaits* the run's cleanup before starting the next run in
  the session's TaskGroup; there is no
  timeout after which it proceeds anyway (the wait is bounded by the run's
  own cleanup budget, enforced with ``asyncio.timeout``);
* the upstream call is async, so cancelling a run closes its upstream
  connection;
* run output flows through an ``asyncio.Queue``; the response sender only
  reads it; a client disconnect (ASGI ``http.disconnect``) cancels the run;
* every task has an owner; no fire-and-forget.

It logs the same lifecycle lines as ours (logger ``server.lifecycle``, same
format, so one log parser reads all servers) and serves ``GET /debug/tasks``
for the harness. It is a benchmark fixture, not shipped in the ``server``
package. Run it with::

    python -m benchmarks.baselines.asyncio_taskgroup --host 127.0.0.1 --port 0 \\
        --upstream-url http://127.0.0.1:PORT/v1 [--model m]
"""
