"""``--workers N`` on real processes (issue 12, "Modes"): one supervisor,
N node processes serving the port it bound once (server.supervisor).

Which worker served a request is read from its access-log line (each
worker's lines carry ``worker=<i>``), found by a User-Agent of its own. To
send a request to one worker for certain, the other is frozen with SIGSTOP
for that moment: on the one accept queue they share, a frozen worker
accepts nothing and the other one takes the connection (with SO_REUSEPORT
the kernel would have queued some connections to the frozen one).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx2
import pytest
import trio

from tests.cluster.redis_process import redis_server_path, running_redis
from tests.faults.support import stored_runs

from .harness import REPO_ROOT, ServerProcess, poll_until, running_server
from .wire import BackgroundChat, ChatStream

pytestmark = pytest.mark.integration

# 2,000 words at 50 ms: far longer than any drain these tests wait for.
ENDLESS_REPLY = ("--token-delay", "0.05", "--reply-words", "2000")
EXIT_TIMEOUT = 30.0
_STARTED = re.compile(r" server\.supervisor worker_started worker=(\d+) pid=(\d+)")


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A real redis-server's URL (the workers of ``--workers`` share it)."""
    path = redis_server_path()
    if path is None:
        reason = "no redis-server executable on this machine"
        if os.environ.get("STREAM_SERVER_REQUIRE_REDIS") == "1":
            pytest.fail(f"{reason} (STREAM_SERVER_REQUIRE_REDIS=1 requires it)")
        pytest.skip(f"{reason}; install Debian's redis-server (apt-get install redis-server)")
    with running_redis(path) as redis:
        yield redis.url


def worker_pids(server: ServerProcess) -> dict[int, int]:
    """The pid of each worker, as last started (a restart replaces it)."""
    pids: dict[int, int] = {}
    for line in server.lines:
        if (match := _STARTED.search(line)) is not None:
            pids[int(match[1])] = int(match[2])
    return pids


def gone(pid: int) -> bool:
    """No such process, or a zombie that only waits for whoever reaps it."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state == "Z"


@contextmanager
def frozen(pid: int) -> Iterator[None]:
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


async def served_by(server: ServerProcess) -> int:
    """Send ``GET /healthz`` on a fresh connection; the worker that served it."""
    probe = f"probe-{uuid.uuid4().hex}"
    async with httpx2.AsyncClient(base_url=server.url, timeout=30.0) as client:
        response = await client.get("/healthz", headers={"User-Agent": probe})
    assert response.status_code == 200
    line = await server.wait_for_line(re.escape(probe))
    match = re.search(r" worker=(\d+) hypercorn\.access ", line)
    assert match is not None, line
    return int(match[1])


async def served_by_each(server: ServerProcess) -> None:
    """Each worker, the others frozen, takes a request on the port."""
    pids = worker_pids(server)
    for index in pids:
        others = [pid for other, pid in pids.items() if other != index]
        with frozen(others[0]):
            assert await served_by(server) == index, server.log_text()


def test_more_than_one_worker_needs_a_redis_url() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_SERVER_")}
    for args, extra_env in [
        (["--workers", "2"], {}),
        ([], {"STREAM_SERVER_WORKERS": "3"}),
    ]:
        result = subprocess.run(
            [sys.executable, "-m", "server", "--port", "0", *args],
            cwd=REPO_ROOT,
            env={**env, **extra_env},
            capture_output=True,
            text=True,
            timeout=EXIT_TIMEOUT,
            check=False,
        )
        workers = args[1] if args else "3"
        assert result.returncode == 2, result.stderr
        assert result.stderr.splitlines() == [
            f"trio-stream-server: error: --workers {workers} needs --redis-url: "
            "workers share sessions through Redis"
        ]


async def test_two_workers_serve_one_port_each_with_its_own_data_dir(redis_url: str) -> None:
    with running_server("--workers", "2", "--redis-url", redis_url) as server:
        assert server.data_dir is not None
        assert sorted(worker_pids(server)) == [0, 1]
        listening = [line for line in server.lines if "listening url=" in line]
        # One `listening` line, from the supervisor, after both workers listen.
        assert len([line for line in listening if " server.launcher listening " in line]) == 1
        assert listening[-1].endswith(f"listening url={server.url} workers=2"), listening
        await served_by_each(server)
        for index in (0, 1):
            assert (Path(server.data_dir) / f"worker-{index}" / "runs.sqlite3").is_file()
        assert not (Path(server.data_dir) / "runs.sqlite3").exists()


async def test_sigterm_mid_stream_drains_every_worker(redis_url: str) -> None:
    args = (*ENDLESS_REPLY, "--drain-timeout", "0.5", "--redis-url", redis_url)
    with running_server("--workers", "2", *args) as server:
        pids = worker_pids(server)
        async with (
            httpx2.AsyncClient(base_url=server.url, timeout=30.0) as first,
            httpx2.AsyncClient(base_url=server.url, timeout=30.0) as second,
        ):
            chats = {
                0: BackgroundChat(first, "a long answer from worker 0"),
                1: BackgroundChat(second, "a long answer from worker 1"),
            }
            async with trio.open_nursery() as nursery:
                for index, chat in chats.items():
                    with frozen(pids[1 - index]):
                        await nursery.start(chat.run)
                server.send_signal(signal.SIGTERM)
        streams: dict[int, ChatStream] = {index: chat.stream for index, chat in chats.items()}
        assert await server.wait_exit() == 0, server.log_text()
        assert server.data_dir is not None
        for index, stream in streams.items():
            assert stream.finish_reason == "interrupted", stream.final
            assert stream.final["cancel_reason"] == "shutdown"
            assert stream.done and stream.events_after_done == 0
            row = stored_runs(Path(server.data_dir) / f"worker-{index}")[stream.run_id]
            assert (row["status"], row["cancel_reason"]) == ("interrupted", "shutdown"), row
            drained = [
                line for line in server.lines if f"worker={index} server.launcher drained" in line
            ]
            assert len(drained) == 1, server.log_text()
        assert "Traceback" not in server.log_text()


async def test_a_killed_worker_is_restarted_and_the_port_keeps_serving(redis_url: str) -> None:
    with running_server("--workers", "2", "--redis-url", redis_url) as server:
        killed = worker_pids(server)[0]
        os.kill(killed, signal.SIGKILL)
        await server.wait_for_line(rf"worker_exited worker=0 pid={killed} status=-9")
        # Worker 1 serves while worker 0 restarts.
        assert await served_by(server) == 1
        await server.wait_for_line(r" server\.supervisor worker_restarting worker=0 ")
        with server.deadline(EXIT_TIMEOUT, "worker 0 to listen again"):
            await poll_until(
                lambda: (
                    sum(
                        " worker=0 server.launcher worker_listening " in line
                        for line in server.lines
                    )
                    == 2
                    or None
                )
            )
        assert worker_pids(server)[0] != killed
        await served_by_each(server)
        assert server.stop() == 0, server.log_text()


async def test_the_workers_exit_when_the_supervisor_is_killed(redis_url: str) -> None:
    with running_server("--workers", "2", "--redis-url", redis_url) as server:
        pids = worker_pids(server)
        server.send_signal(signal.SIGKILL)
        assert await server.wait_exit() == -signal.SIGKILL
        try:
            with server.deadline(EXIT_TIMEOUT, "the workers to exit"):
                await poll_until(lambda: all(gone(pid) for pid in pids.values()) or None)
        finally:
            # Orphans of a failed test: the harness would wait for their
            # stderr's end of file.
            for pid in pids.values():
                if not gone(pid):
                    os.kill(pid, signal.SIGKILL)
        for index in pids:
            await server.wait_for_line(rf" worker={index} server\.launcher supervisor_gone")
