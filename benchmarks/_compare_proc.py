"""Helpers of :mod:`benchmarks.compare`: server subprocesses and /proc readings."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from functools import partial
from pathlib import Path

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
            # The baselines have no limits; ours are raised above the
            # harness's load (1,000 concurrent streams on one key).
            "--max-runs-per-key",
            "5000",
            "--max-runs",
            "5000",
            "--max-sessions-per-key",
            "20000",
            "--max-sessions",
            "20000",
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
    log_path: Path

    @property
    def log_tail(self) -> list[str]:
        """The last lines the process logged."""
        with self.log_path.open("rb") as file:
            file.seek(max(0, self.log_path.stat().st_size - 8192))
            return file.read().decode(errors="replace").splitlines()[-40:]


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
    loopback, stopped on exit. Its stderr goes to a file, not a pipe: a
    pipe that this busy process drains late would block the server's
    logging calls and, with them, its event loop, and the figures would
    measure the harness."""
    with tempfile.TemporaryDirectory(prefix="compare-") as directory:
        log_path = Path(directory) / f"{name}.log"
        with log_path.open("wb") as log:
            async with trio.open_nursery() as nursery:
                process: trio.Process = await nursery.start(
                    partial(
                        trio.run_process,
                        command,
                        stdout=subprocess.DEVNULL,
                        stderr=log,
                        check=False,
                    )
                )
                try:
                    url = await listening_url(log_path, process)
                    yield ServerProcess(name, url, process.pid, debug_headers, log_path)
                finally:
                    with trio.CancelScope(shield=True):
                        if process.returncode is None:
                            process.terminate()
                        with trio.move_on_after(STOP_TIMEOUT):
                            await process.wait()
                        if process.returncode is None:
                            process.kill()
                            await process.wait()


async def listening_url(log_path: Path, process: trio.Process) -> str:
    """The url of the ``listening url=`` line, once the process logs it."""
    log = trio.Path(log_path)
    with trio.move_on_after(START_TIMEOUT):
        while process.returncode is None:
            for line in (await log.read_text(errors="replace")).splitlines():
                if "listening url=" in line:
                    return line.split("listening url=")[1].split()[0]
            await trio.sleep(0.05)
    tail = (await log.read_text(errors="replace")).splitlines()[-5:]
    raise RuntimeError(f"{process.args!r} did not start: {' | '.join(tail)}")


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as file:
        fields = file.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants (a server with ``--workers`` is a
    supervisor and its worker processes)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as file:
                parent = int(file.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        children.setdefault(parent, []).append(int(entry))
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        pending.extend(children.get(current, ()))
    return tree


def tree_cpu_seconds(pid: int) -> float:
    """:func:`cpu_seconds` of ``pid`` and its live descendants together."""
    total = 0.0
    for member in process_tree(pid):
        with suppress(OSError, ValueError, IndexError):  # exited meanwhile
            total += cpu_seconds(member)
    return total


def tree_rss(pid: int) -> int:
    """VmRSS of ``pid`` and its live descendants together (bytes)."""
    total = 0
    for member in process_tree(pid):
        with suppress(OSError):  # exited meanwhile
            total += proc_status(member).get("VmRSS", 0)
    return total


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
