"""The run store fails under live runs, then recovers.

Two real faults, both on the SQLite file the server has open:

* locked: another connection (this test process) holds ``BEGIN EXCLUSIVE``
  on the database for a few seconds, as a backup tool or a stray ``sqlite3``
  shell would. The server's writes wait ``busy_timeout`` and fail with
  "database is locked".
* write failure: the server process's ``RLIMIT_FSIZE`` is lowered to 0 with
  ``prlimit(2)`` from outside, so the kernel refuses every write to a
  regular file (``EFBIG``, as a full disk refuses with ``ENOSPC``); SQLite
  reports an I/O error. Raising the limit again clears the fault. (A
  read-only file would not do: the server's descriptor was opened
  read-write and stays so; a tiny filesystem needs mount rights we do not
  assume; dropping a table is corruption, not a fault.)

Either way: runs keep streaming to their clients (their terminal event says
``store_write_failed`` in ``error_details``), the failure is logged, the
server keeps serving, and once the fault clears no row is left ``running``:
every run ends with its real terminal status in the store.
"""

from __future__ import annotations

import resource
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx2
import pytest
import trio

from tests.integration.harness import ServerProcess

from .support import (
    assert_nothing_running,
    assert_serves,
    fault_server,
    idle_baseline,
    native_events,
    settle,
    stored_runs,
)

pytestmark = pytest.mark.integration

AGENT = ("--agent", "tests.faults.agents:make_agent", "--token-delay", "0.02")
DB_FILE = "runs.sqlite3"

Fault = Callable[[ServerProcess, Path], AbstractAsyncContextManager[None]]


@asynccontextmanager
async def exclusive_lock(server: ServerProcess, data_dir: Path) -> AsyncIterator[None]:
    db = sqlite3.connect(
        data_dir / DB_FILE, timeout=10.0, isolation_level=None, check_same_thread=False
    )
    try:
        await trio.to_thread.run_sync(db.execute, "BEGIN EXCLUSIVE")
        yield
        db.execute("ROLLBACK")
    finally:
        db.close()


@asynccontextmanager
async def writes_refused(server: ServerProcess, data_dir: Path) -> AsyncIterator[None]:
    pid = server.proc.pid
    before = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (0, before[1]))
    try:
        yield
    finally:
        resource.prlimit(pid, resource.RLIMIT_FSIZE, before)


FAULTS: dict[str, Fault] = {"locked": exclusive_lock}
if sys.platform == "linux":
    FAULTS["write_refused"] = writes_refused


@pytest.mark.parametrize("fault_name", FAULTS)
async def test_store_fault_keeps_runs_streaming_and_nothing_stays_running(
    fault_name: str, tmp_path: Path
) -> None:
    fault = FAULTS[fault_name]
    with fault_server(tmp_path, *AGENT) as server:
        baseline = await idle_baseline(server)
        results: dict[str, list[dict[str, Any]]] = {}
        async with httpx2.AsyncClient(base_url=server.url, timeout=30.0) as client:

            async def chat(name: str, prompt: str, done: trio.Event) -> None:
                status, events = await native_events(client, prompt, session_id=name)
                assert status == 200, events
                results[name] = events
                done.set()

            async def start(nursery: trio.Nursery, name: str, prompt: str) -> trio.Event:
                done = trio.Event()
                nursery.start_soon(chat, name, prompt, done)
                await server.wait_for("stream_start", session=name)
                return done

            async with trio.open_nursery() as nursery:
                # Recorded as started before the fault, ends inside it.
                before = await start(nursery, "before", "tokens=60")
                await trio.sleep(0.3)  # its start is written (a store call is quick)
                async with fault(server, tmp_path):
                    # Starts and ends inside the fault.
                    inside = await start(nursery, "inside", "tokens=10")
                    # Stopped by its client inside the fault.
                    stopped = await start(nursery, "stopped", "tokens=500")
                    trace = server.find("stream_start", session="stopped")[0].fields["trace"]
                    response = await client.post(
                        f"/v1/runs/{trace}/cancel", headers={"Authorization": "Bearer devkey"}
                    )
                    assert response.status_code == 200, response.text
                    with server.deadline(15.0, "the runs inside the fault to end"):
                        for done in (before, inside, stopped):
                            await done.wait()

        expected = {
            "before": "run.completed",
            "inside": "run.completed",
            "stopped": "run.cancelled",
        }
        assert {name: events[-1]["type"] for name, events in results.items()} == expected
        for events in results.values():
            assert [event["seq"] for event in events] == list(range(len(events)))
            # Ended during the fault: the record may be stale, and the client is told.
            details = events[-1].get("error_details")
            assert details is not None and details["code"] == "store_write_failed", events
        assert "run_store_failed" in server.log_text()

        # The fault has cleared: the server serves and is idle again.
        await assert_serves(server)
        await settle(server, baseline)
        assert server.stop() == 0
    assert "run_store_recovered" in server.log_text()

    runs = stored_runs(tmp_path)
    assert_nothing_running(runs)
    by_session = {run["session_id"]: run for run in runs.values()}
    statuses = {name: by_session[name]["status"] for name in expected}
    assert statuses == {"before": "completed", "inside": "completed", "stopped": "cancelled"}
    assert by_session["stopped"]["cancel_reason"] == "client_stop"
