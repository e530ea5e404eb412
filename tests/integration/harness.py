"""The real server as a subprocess, and its log as data.

Resource handling: a :class:`ServerProcess` owns a ``Popen``, the pipe of its
stderr and one reader thread that copies stderr lines into a list. ``stop``
sends SIGTERM, waits (and kills only if the process will not go), joins the
reader and closes the pipe, so no ResourceWarning can fire whatever the test
did. Use :func:`running_server` so ``stop`` always runs.

Waiting: synchronous code (fixtures, openai tests) waits on a condition the
reader thread notifies; async tests poll with ``trio.sleep`` under a deadline.
Every wait has a generous timeout and fails with the log in the message.
The reader thread parses each lifecycle line once, as it arrives, and a
poll looks only at what arrived since the last one: a long-lived shared
server's log costs a waiting test nothing per poll (the suite runs several
test files at once on few cores).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx2
import trio

REPO_ROOT = Path(__file__).resolve().parents[2]

# Reply pacing for the shared server: 40 words at 20 ms, a run lasts ~0.8 s,
# long enough to disconnect from or supersede, short enough to finish often.
FAST_REPLY = ("--token-delay", "0.02", "--reply-words", "40")
REPLY_WORDS = 40

START_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0
LOG_TIMEOUT = 10.0
POLL_INTERVAL = 0.02

_LISTENING = re.compile(r"(?:^| server\.launcher )listening url=(?P<url>\S+)")
_LIFECYCLE = re.compile(r" server\.lifecycle (?P<name>\w+)(?P<fields>(?: \w+=\S*)*)\s*$")

T = TypeVar("T")


@dataclass(frozen=True)
class LifecycleEvent:
    """One ``server.lifecycle`` log line: ``name key=value ...``."""

    name: str
    fields: dict[str, str]

    def matches(self, name: str, **fields: str) -> bool:
        return self.name == name and all(self.fields.get(k) == v for k, v in fields.items())

    def __str__(self) -> str:
        return " ".join([self.name, *(f"{k}={v}" for k, v in self.fields.items())])


def parse_lifecycle(line: str) -> LifecycleEvent | None:
    match = _LIFECYCLE.search(line)
    if match is None:
        return None
    pairs = (pair.partition("=") for pair in match["fields"].split())
    return LifecycleEvent(match["name"], {key: value for key, _, value in pairs})


class ServerProcess:
    """``python -m server`` on 127.0.0.1 with ``--port 0``."""

    module = "server"

    def __init__(self, args: tuple[str, ...]) -> None:
        # Each server gets a run store of its own unless the test gives one
        # (the store locks its directory against a second process).
        self._own_data_dir: str | None = None
        if self.module == "server" and "--data-dir" not in args:
            self._own_data_dir = tempfile.mkdtemp(prefix="tss-data-")
            args = (*args, "--data-dir", self._own_data_dir)
        self.data_dir = args[args.index("--data-dir") + 1] if "--data-dir" in args else None
        self.args = args
        self.url = ""
        self._lines: list[str] = []
        self._events: list[LifecycleEvent] = []
        self._changed = threading.Condition()
        self._eof = False
        env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_SERVER_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module, "--host", "127.0.0.1", "--port", "0", *args],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
        )
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()

    @classmethod
    def start(cls, *args: str) -> ServerProcess:
        server = cls(args)
        try:
            line = server.wait_for_line_sync(lambda line: _LISTENING.search(line) is not None)
        except BaseException:
            server.stop()
            raise
        match = _LISTENING.search(line)
        assert match is not None
        server.url = match["url"]
        return server

    # --- the log -------------------------------------------------------------

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            line = line.rstrip("\n")
            event = parse_lifecycle(line)
            with self._changed:
                self._lines.append(line)
                if event is not None:
                    self._events.append(event)
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    @property
    def lines(self) -> list[str]:
        with self._changed:
            return list(self._lines)

    def lines_since(self, index: int) -> list[str]:
        with self._changed:
            return self._lines[index:]

    def log_text(self, since: int = 0, *, last: int | None = None) -> str:
        lines = self.lines_since(since)
        return "\n".join(lines[-last:] if last else lines)

    def lifecycle(self) -> list[LifecycleEvent]:
        """The lifecycle events so far, in the order the server logged them."""
        with self._changed:
            return list(self._events)

    def index_of(self, name: str, **fields: str) -> int | None:
        """Position of the first matching lifecycle event, if logged yet."""
        return self._index_of(name, fields, start=0)

    def _index_of(self, name: str, fields: dict[str, str], start: int) -> int | None:
        with self._changed:
            events = self._events[start:]
        for index, event in enumerate(events, start):
            if event.matches(name, **fields):
                return index
        return None

    def _tail(self) -> str:
        return self.log_text(last=100)

    def find(self, name: str, **fields: str) -> list[LifecycleEvent]:
        return [event for event in self.lifecycle() if event.matches(name, **fields)]

    def wait_for_line_sync(
        self, predicate: Callable[[str], bool], timeout: float = START_TIMEOUT
    ) -> str:
        """The first stderr line matching ``predicate`` (blocking; not for async code)."""

        def found() -> str | None:
            return next((line for line in self._lines if predicate(line)), None)

        with self._changed:
            self._changed.wait_for(lambda: found() is not None or self._eof, timeout)
            line = found()
        if line is None:
            raise AssertionError(
                f"no matching line in the server log (waited up to {timeout}s; "
                f"exit code {self.proc.poll()}):\n{self._tail()}"
            )
        return line

    async def wait_for(self, name: str, **fields: str) -> int:
        """Wait (up to ``LOG_TIMEOUT``) until a matching lifecycle event is
        logged; its index in :meth:`lifecycle`."""
        checked = 0

        def probe() -> int | None:
            nonlocal checked
            with self._changed:
                start, checked = checked, len(self._events)
            return self._index_of(name, fields, start)

        with self.deadline(LOG_TIMEOUT, f"lifecycle event {name} {fields}"):
            return await poll_until(probe)

    async def wait_for_line(self, pattern: str) -> str:
        """Wait (up to ``LOG_TIMEOUT``) for a log line matching ``pattern``."""
        regex = re.compile(pattern)
        checked = 0

        def probe() -> str | None:
            nonlocal checked
            lines = self.lines_since(checked)
            checked += len(lines)
            return next((line for line in lines if regex.search(line)), None)

        with self.deadline(LOG_TIMEOUT, f"a log line matching {pattern!r}"):
            return await poll_until(probe)

    @contextmanager
    def deadline(self, seconds: float, what: str) -> Iterator[None]:
        """``trio.fail_after`` that fails the test with the server log."""
        try:
            with trio.fail_after(seconds):
                yield
        except trio.TooSlowError:
            raise AssertionError(
                f"timed out after {seconds}s waiting for {what}:\n{self._tail()}"
            ) from None

    # --- the process ---------------------------------------------------------

    def send_signal(self, signum: signal.Signals) -> None:
        self.proc.send_signal(signum)

    async def wait_exit(self) -> int:
        """The exit code, once the process has exited by itself (up to ``STOP_TIMEOUT``)."""
        with self.deadline(STOP_TIMEOUT, "the server process to exit"):
            return await poll_until(self.proc.poll)

    def stop(self) -> int:
        """SIGTERM, wait, kill as a last resort; close everything. The exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(STOP_TIMEOUT)
        assert self.proc.stderr is not None
        self.proc.stderr.close()
        if self._own_data_dir is not None:
            shutil.rmtree(self._own_data_dir, ignore_errors=True)
        return self.proc.returncode


class FakeUpstreamProcess(ServerProcess):
    """The fake LLM upstream (tests/fakes) as a process of its own."""

    module = "tests.fakes.upstream"


@contextmanager
def running_server(
    *args: str, kind: type[ServerProcess] = ServerProcess
) -> Iterator[ServerProcess]:
    server = kind.start(*args)
    try:
        yield server
    finally:
        server.stop()


def loopback_client(url: str, timeout: float = 30.0) -> httpx2.AsyncClient:
    """An HTTP client for a test server's ``http://127.0.0.1:...`` url.

    No TLS is ever negotiated there, so ``verify=False`` changes nothing but
    the client's set-up: it spares loading the CA bundle, ~25 ms of CPU per
    client, which a polling loop (faults' ``settle``) pays many times over
    while parallel test files compete for the cores."""
    if not url.startswith("http://"):
        raise ValueError(f"not a plain-HTTP test server url: {url}")
    return httpx2.AsyncClient(base_url=url, timeout=timeout, verify=False)


async def poll_until(probe: Callable[[], T | None]) -> T:
    """Poll ``probe`` until it returns something other than ``None``; bound it
    with a deadline.

    Only for state that lives in another process or thread (the server log,
    the exit code), which no trio primitive can wait for."""
    while True:
        result = probe()
        if result is not None:
            return result
        await trio.sleep(POLL_INTERVAL)
