"""Issue 11, finding 6: the run store's disk fills up under a live server.

A real ENOSPC: the data directory is on a small tmpfs mounted for the test
(root only; CI runs as root), filled by a file the test writes until the
kernel refuses, and freed by deleting it. Runs stream on while the disk is
full; once it is freed, every one of them lands in the store with its real
status without another run having to end, a clean stop leaves nothing
``running``, and the next start works, even on a disk that is still full.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
import trio

from server.store.observer import RETRY_MAX_INTERVAL
from tests.integration.harness import ServerProcess
from tests.integration.wire import auth

from .support import assert_nothing_running, fault_server, native_events, stored_runs

pytestmark = pytest.mark.integration

AGENT = ("--agent", "tests.faults.agents:make_agent", "--token-delay", "0.01")
DISK_BYTES = 4 * 1024 * 1024
# Runs that start and end while the disk is full.
RUNS_WHILE_FULL = 5
# The store lands refused writes within RETRY_MAX_INTERVAL of taking writes again.
LAND_TIMEOUT = 2 * RETRY_MAX_INTERVAL + 5


class SmallDisk:
    """A tmpfs of :data:`DISK_BYTES`: :meth:`fill` it, :meth:`free` it."""

    def __init__(self, mount_point: Path) -> None:
        self.mount_point = mount_point
        self.data_dir = mount_point / "data"
        self._filler = mount_point / "filler"

    def fill(self) -> None:
        """Write until the kernel says ENOSPC."""
        chunk = b"\0" * 4096
        with open(self._filler, "ab", buffering=0) as filler:
            while True:
                try:
                    filler.write(chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    return

    def free(self) -> None:
        self._filler.unlink()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("a full disk needs a tmpfs mount: Linux and root only")
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield SmallDisk(mount_point)
    finally:
        # Lazy: a server the test failed to stop may still hold a file.
        subprocess.run(["umount", "--lazy", str(mount_point)], check=True)


def statuses(data_dir: Path) -> dict[str, str]:
    """Run id → status, read from the file while the server may be running."""
    with sqlite3.connect(f"file:{data_dir / 'runs.sqlite3'}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT run_id, status FROM runs").fetchall()
    db.close()
    return dict(rows)


async def wait_recorded(server: ServerProcess, data_dir: Path, want: dict[str, str]) -> None:
    """Poll the store until every run in ``want`` has that status."""
    with server.deadline(LAND_TIMEOUT, f"the store to record {want}"):
        while True:
            found = await trio.to_thread.run_sync(statuses, data_dir)
            if all(found.get(run_id) == status for run_id, status in want.items()):
                return
            await trio.sleep(0.1)


async def stored_over_http(server: ServerProcess, run_ids: list[str]) -> dict[str, str]:
    async with httpx2.AsyncClient(base_url=server.url, timeout=30.0) as client:
        found = {}
        for run_id in run_ids:
            response = await client.get(f"/v1/runs/{run_id}", headers=auth())
            assert response.status_code == 200, response.text
            found[run_id] = response.json()["status"]
    return found


async def test_full_disk_runs_land_in_the_store_once_space_is_freed(
    small_disk: SmallDisk,
) -> None:
    data_dir = small_disk.data_dir
    ends: dict[str, list[dict[str, Any]]] = {}
    with fault_server(data_dir, *AGENT) as server:
        async with httpx2.AsyncClient(base_url=server.url, timeout=30.0) as client:

            async def chat(name: str, prompt: str) -> None:
                status, events = await native_events(client, prompt, session_id=name)
                assert status == 200, events
                ends[name] = events

            async with trio.open_nursery() as nursery:
                # Recorded as started before the disk fills; ends while it is full.
                nursery.start_soon(chat, "before", "tokens=150")
                await server.wait_for("stream_start", session="before")
                await trio.sleep(0.3)  # its start is written (a store call is quick)
                small_disk.fill()
                for index in range(RUNS_WHILE_FULL):
                    nursery.start_soon(chat, f"full-{index}", "tokens=20")
        assert "database or disk is full" in server.log_text()
        for events in ends.values():
            # Streamed to the end; the client is told the record may be stale.
            assert events[-1]["type"] == "run.completed", events
            assert [event["seq"] for event in events] == list(range(len(events)))
            assert events[-1]["error_details"]["code"] == "store_write_failed", events
        run_ids = {name: events[0]["run_id"] for name, events in ends.items()}

        small_disk.free()
        # No other run ends: the store's own retries land them all.
        await wait_recorded(server, data_dir, dict.fromkeys(run_ids.values(), "completed"))
        assert server.stop() == 0

    runs = stored_runs(data_dir)
    assert_nothing_running(runs)
    with fault_server(data_dir) as restarted:
        found = await stored_over_http(restarted, list(run_ids.values()))
    assert found == dict.fromkeys(run_ids.values(), "completed")


async def test_a_start_on_a_full_disk_serves_and_recovers_the_crashed_runs_later(
    small_disk: SmallDisk,
) -> None:
    data_dir = small_disk.data_dir
    with fault_server(data_dir, *AGENT) as server:
        async with httpx2.AsyncClient(base_url=server.url, timeout=30.0) as client:
            async with client.stream(
                "POST",
                "/v1/chat/completions",
                json={"prompt": "tokens=100000", "stream": True},
                headers={**auth(), "Accept": "application/x-ndjson", "X-Session-Id": "crash"},
            ) as response:
                run_id = response.headers["x-run-id"]
                await server.wait_for("stream_start", trace=run_id)
                await trio.sleep(0.3)  # its start is written
                server.proc.kill()
                server.proc.wait()
    assert stored_runs(data_dir)[run_id]["status"] == "running"

    small_disk.fill()
    with fault_server(data_dir, *AGENT) as restarted:
        # Reads work: the crashed run is there, not yet marked.
        assert await stored_over_http(restarted, [run_id]) == {run_id: "running"}
        # New runs stream.
        async with httpx2.AsyncClient(base_url=restarted.url, timeout=30.0) as client:
            status, events = await native_events(client, "tokens=5", session_id="on-full")
        assert status == 200 and events[-1]["type"] == "run.completed", events
        new_run = events[0]["run_id"]

        small_disk.free()
        await wait_recorded(restarted, data_dir, {run_id: "interrupted", new_run: "completed"})
        assert restarted.stop() == 0
    runs = stored_runs(data_dir)
    assert_nothing_running(runs)
    assert runs[run_id]["cancel_reason"] == "crash_recovery"
