"""Helpers of :mod:`benchmarks.compare`: server subprocesses and /proc readings."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import deque
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial

import attrs
import trio

ADMIN_KEY = "compare-admin"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# name -> (argv after ``python``, headers for GET /debug/tasks)
SERVERS: dict[str, tuple[list[str], dict[str, str]]] = {
    "trio-stream-server": (
        [
            "-m",
            "server",
            "--port",
            "0",
            "--agent",
            "openai",
            "--upstream-url",
            "{upstream}/v1",
            "--admin-key",
            ADMIN_KEY,
            "--data-dir",
            "",
        ],
        {"Authorization": f"Bearer {ADMIN_KEY}"},
    ),
    "asyncio_registry": (
        [
            "-m",
            "benchmarks.baselines.asyncio_registry",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--upstream-url",
            "{upstream}/v1",
        ],
        {},
    ),
    "asyncio_taskgroup": (
        [
            "-m",
            "benchmarks.baselines.asyncio_taskgroup",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--upstream-url",
            "{upstream}/v1",
        ],
        {},
    ),
}


@attrs.define
class ServerProcess:
    name: str
    url: str
    pid: int
    debug_headers: dict[str, str]
    log_tail: deque[str]


def running_server(name: str, upstream: str) -> AbstractAsyncContextManager[ServerProcess]:
    """One of :data:`SERVERS` against ``upstream``."""
    argv, debug_headers = SERVERS[name]
    command = [sys.executable, *(arg.format(upstream=upstream) for arg in argv)]
    return running_process(name, command, debug_headers)


@asynccontextmanager
async def running_process(
    name: str, command: list[str], debug_headers: dict[str, str]
) -> AsyncIterator[ServerProcess]:
    """A server process that logs ``listening url=...`` once it serves on
    loopback; its stderr is drained and kept (the last lines), and it is
    stopped on exit."""
    tail: deque[str] = deque(maxlen=40)
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(
            partial(
                trio.run_process,
                command,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                check=False,
            )
        )
        url_seen = trio.Event()
        url: list[str] = []

        async def drain_stderr() -> None:
            # Read everything the server logs (a full pipe would block it).
            assert process.stderr is not None
            buffer = b""
            async for chunk in process.stderr:
                buffer += chunk
                while b"\n" in buffer:
                    raw, buffer = buffer.split(b"\n", 1)
                    line = raw.decode(errors="replace")
                    tail.append(line)
                    if "listening url=" in line and not url:
                        url.append(line.split("listening url=")[1].split()[0])
                        url_seen.set()

        nursery.start_soon(drain_stderr)
        try:
            with trio.move_on_after(START_TIMEOUT):
                await url_seen.wait()
            if not url:
                raise RuntimeError(f"{name} did not start: {' | '.join(list(tail)[-5:])}")
            yield ServerProcess(name, url[0], process.pid, debug_headers, tail)
        finally:
            with trio.CancelScope(shield=True):
                if process.returncode is None:
                    process.terminate()
                with trio.move_on_after(STOP_TIMEOUT):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as file:
        fields = file.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (bytes) and Threads from /proc/<pid>/status."""
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as file:
        for line in file:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
            elif key == "Threads":
                values[key] = int(rest.strip())
    return values


def raise_fd_limit() -> None:
    """Many concurrent streams need many sockets in this process (client + fake)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = hard if hard != resource.RLIM_INFINITY else 65536
        if soft < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ImportError, ValueError, OSError):
        pass
