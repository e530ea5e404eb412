"""A real ``redis-server`` (Debian's package) as a subprocess on a free
loopback port, for the cluster tests.

Resource handling: a :class:`RedisProcess` owns one ``Popen`` at a time and a
temporary directory (its working dir and log). Persistence is off
(``--save '' --appendonly no``): a restart starts empty, as a Redis that lost
its memory does. ``stop`` sends SIGTERM and waits (kills only if it will not
go); ``restart`` starts a new process on the same port; ``pause``/``resume``
freeze it with SIGSTOP/SIGCONT (connections are accepted by the kernel but
nothing answers: the "Redis hangs" case). Use :func:`running_redis` so the
process is always stopped and waited for.

Waiting: every start polls a raw ``PING`` under a deadline and fails with
the server's log in the message.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REDIS_SERVER = "/usr/bin/redis-server"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
POLL_INTERVAL = 0.01


def redis_server_path() -> str | None:
    """The redis-server executable, or None when it is not installed."""
    path = shutil.which("redis-server") or REDIS_SERVER
    return path if os.access(path, os.X_OK) else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisProcess:
    """``redis-server`` on ``127.0.0.1:port`` with persistence off."""

    def __init__(self, executable: str, workdir: Path) -> None:
        self.executable = executable
        self.workdir = workdir
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None
        self._paused = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self._process is not None, "not running"
        return self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def log_path(self) -> Path:
        return self.workdir / "redis.log"

    def log_text(self, last: int = 50) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(lines[-last:])

    def start(self) -> None:
        assert not self.running, "redis-server is already running"
        args = [
            self.executable,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
            "--daemonize", "no",
            "--logfile", str(self.log_path),
        ]  # fmt: skip
        self._process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"redis-server exited at start:\n{self.log_text()}")
            if self._answers_ping():
                return
            time.sleep(POLL_INTERVAL)
        self.stop()
        raise RuntimeError(f"redis-server did not answer PING in {START_TIMEOUT}s")

    def _answers_ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM and wait (SIGKILL if it will not go): Redis is gone."""
        process, self._process = self._process, None
        if process is None:
            return
        if self._paused:
            process.send_signal(signal.SIGCONT)
            self._paused = False
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=STOP_TIMEOUT)

    def restart(self) -> None:
        """Stop and start again on the same port, empty (no persistence)."""
        self.stop()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: connections are accepted by the kernel, nothing answers."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        assert self._process is not None
        self._process.send_signal(signal.SIGCONT)
        self._paused = False


@contextmanager
def running_redis(executable: str) -> Iterator[RedisProcess]:
    with tempfile.TemporaryDirectory(prefix="tss-redis-") as workdir:
        redis = RedisProcess(executable, Path(workdir))
        redis.start()
        try:
            yield redis
        finally:
            redis.stop()
