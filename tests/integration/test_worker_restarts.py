"""``--workers N``: a worker that dies is restarted, one that keeps dying
makes the supervisor give up, and workers never outlive their supervisor
(split from test_workers.py so the two files run in parallel)."""

from __future__ import annotations

import os
import re
import signal

import pytest

from .harness import poll_until, running_server
from .test_workers import (
    EXIT_TIMEOUT,
    gone,
    line_index,
    listened,
    redis_url,
    served_by,
    served_by_each,
    worker_pids,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

__all__ = ["redis_url"]  # the fixture, shared with test_workers.py


async def test_a_killed_worker_is_restarted_and_the_port_keeps_serving(redis_url: str) -> None:
    with running_server("--workers", "2", "--redis-url", redis_url) as server:
        killed = worker_pids(server)[0]
        os.kill(killed, signal.SIGKILL)
        await server.wait_for_line(rf"worker_exited worker=0 pid={killed} status=-9")
        # The port keeps serving while worker 0 restarts: worker 1 takes the
        # request, unless the new worker 0 already listens.
        relistened = " worker=0 server.launcher worker_listening "
        if await served_by(server) != 1:
            assert sum(relistened in line for line in server.lines) == 2, server.log_text()
        await server.wait_for_line(r" server\.supervisor worker_restarting worker=0 ")
        await listened(server, 0, times=2)
        assert worker_pids(server)[0] != killed
        await served_by_each(server)
        assert server.stop() == 0, server.log_text()


async def test_a_worker_that_keeps_dying_makes_the_supervisor_give_up(redis_url: str) -> None:
    """One exit more than ``--max-worker-restarts`` within a minute: the
    supervisor stops the other worker (it drains, as on SIGTERM) and exits 1.
    Two restarts keep the backoff short (0.25 s, 0.5 s); the default of five
    is :class:`RestartPolicy`'s, tested in tests/unit/test_supervisor.py."""
    restarts = 2
    with running_server(
        "--workers", "2", "--redis-url", redis_url, "--max-worker-restarts", str(restarts)
    ) as server:
        for attempt in range(1, restarts + 2):
            await listened(server, 0, times=attempt)
            os.kill(worker_pids(server)[0], signal.SIGKILL)
        assert await server.wait_exit() == 1, server.log_text()
        giving_up = line_index(server, "workers_giving_up worker=0")
        assert giving_up < line_index(server, "worker=1 server.launcher shutdown_requested")
        after = server.log_text(since=giving_up)
        assert re.search(r"worker_exited worker=1 pid=\d+ status=0", after), after
        assert "workers_stopped status=1" in after


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
