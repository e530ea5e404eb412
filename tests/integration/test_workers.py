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
import socket
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

pytestmark = [pytest.mark.integration, pytest.mark.slow]

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


async def listened(server: ServerProcess, index: int, *, times: int) -> None:
    """Wait until worker ``index`` has listened ``times`` times (restarts included)."""
    needle = f" worker={index} server.launcher worker_listening "
    with server.deadline(EXIT_TIMEOUT, f"worker {index} to listen ({times} times)"):
        await poll_until(lambda: sum(needle in line for line in server.lines) >= times or None)


def line_index(server: ServerProcess, text: str) -> int:
    found = [i for i, line in enumerate(server.lines) if text in line]
    assert found, f"no log line with {text!r}:\n{server.log_text()}"
    return found[0]


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


@pytest.mark.parametrize(
    ("drain_timeout", "again"),
    [("0.5", None), ("60", signal.SIGINT)],
    ids=["drained", "hurried-by-a-second-signal"],
)
async def test_sigterm_mid_stream_drains_every_worker(
    redis_url: str, drain_timeout: str, again: signal.Signals | None
) -> None:
    """SIGTERM to the supervisor drains each worker; a second signal (here
    with a drain far longer than the test) reaches each worker too and
    interrupts its runs at once."""
    args = (*ENDLESS_REPLY, "--drain-timeout", drain_timeout, "--redis-url", redis_url)
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
                if again is not None:
                    for index in chats:
                        await server.wait_for_line(rf" worker={index} server\.launcher draining ")
                    server.send_signal(again)
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
            skipped = f"worker={index} server.launcher drain_skipped"
            assert any(skipped in line for line in server.lines) == (again is not None)
        assert "Traceback" not in server.log_text()


def test_a_port_in_use_is_one_line_from_the_supervisor(redis_url: str, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = start(
            "--workers", "2", "--redis-url", redis_url, "--port", port, "--data-dir", str(tmp_path)
        )
    assert result.returncode == 2, result.stderr
    # The dev key's warning, then the error; no worker was started.
    assert result.stderr.splitlines()[1:] == [
        f"trio-stream-server: error: cannot listen on 127.0.0.1:{port}: the address is already "
        "in use; choose another --port (or stop what listens there)"
    ]


def test_a_worker_start_up_error_ends_the_supervisor_with_status_2(
    redis_url: str, tmp_path: Path
) -> None:
    agent = "tests.integration.test_startup_errors:broken_agent"
    result = start(
        "--workers", "2", "--redis-url", redis_url, "--port", "0", "--data-dir", str(tmp_path),
        "--agent", agent,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error: agent:" in line]
    assert errors and all("the agent needs a model file" in line for line in errors)
    assert "workers_stopped status=2" in result.stderr
    assert "listening url=" not in result.stderr and "Traceback" not in result.stderr
    assert "worker_restarting" not in result.stderr


def start(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m server`` with ``args``, expected to exit by itself."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_SERVER_")}
    return subprocess.run(
        [sys.executable, "-m", "server", "--host", "127.0.0.1", *args],
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=EXIT_TIMEOUT,
        check=False,
    )
