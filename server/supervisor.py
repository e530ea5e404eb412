"""``--workers N``: N node processes on one host serving one port.

The parent (this module) serves no HTTP itself. It binds the listening
socket(s) once, starts N workers, logs ``listening url=...`` once every
worker listens, and supervises them; each worker is ``python -m server``
with the same flags plus ``--workers 1`` and ``--data-dir
<data-dir>/worker-<i>`` (each has an SQLite archive of its own; ``''``
stays ``''``), a full node with its own drain (:func:`server.launcher.serve`).
What a worker inherits is in :mod:`server.handoff`.

Why the workers inherit the parent's socket rather than each binding its
own with ``SO_REUSEPORT``:

* one bind, before any worker starts: ``--port 0`` picks one port for all,
  and a port in use is one line and exit status 2 from the parent;
* one accept queue: a new connection waits until *any* worker accepts it.
  With ``SO_REUSEPORT`` the kernel hashes each connection onto one
  worker's own queue, where it waits for that worker even while it is
  stopped, stuck or restarting, and is reset when that worker's socket
  closes (a worker killed with SIGKILL loses what was queued to it);
* the port stays bound while a worker restarts: nothing else can take it.
The cost: every worker is woken for each new connection and one wins the
``accept`` (a thundering herd, negligible for N near the number of cores).
Not Hypercorn's own ``-w N`` either: its workers would run Hypercorn's
``serve``, not :func:`server.launcher.serve` (the drain inside the shutdown
trigger, start-up errors as one line, traced connections).

Signals: SIGTERM, SIGINT and SIGHUP to the parent are forwarded to every
worker, a second one too (each worker then skips the rest of its drain, as
:mod:`server.shutdown` describes). Workers run in their own process group,
so a terminal's Ctrl-C reaches them once, through the parent. A worker that
is still starting gets the signals once it listens (its handlers are in
place then); one waiting to be restarted is not restarted. The parent
exits 0 once every worker it stopped exited 0, and
1 if one did not, or had to be killed after the stop bound
(``--drain-timeout`` + ``--cleanup-budget`` + the launcher's flush time +
:data:`STOP_SLACK`).

Restarts: a worker that exits while the parent is not stopping (crashed,
killed, or told to stop on its own) is restarted with the same index and
data dir after a backoff of 0.25 s doubling up to 5 s
(:class:`RestartPolicy`); a worker that exits once more than
``--max-worker-restarts`` (5) times within 60 s makes the parent give up:
it stops the others as on SIGTERM and exits 1. A
worker that exits with status 2 before it listens (a start-up error the
operator must fix) is not restarted: the parent stops the others and exits
2 (the worker printed the one line). A worker that does not listen within
:data:`READY_TIMEOUT` is killed and counts as a crash.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import attrs
import trio
from hypercorn.utils import repr_socket_addr

from .handoff import READY, WORKER_ENV, Handoff
from .launcher import CLEANUP_SLACK, FLUSH_TIMEOUT, hypercorn_config, listening_sockets
from .logs import log_event
from .settings import Settings
from .shutdown import shutdown_signals
from .startup import EXIT_STARTUP_ERROR, bind_error

logger = logging.getLogger(__name__)
# The harness and operators wait for the launcher's ``listening`` line.
launcher_logger = logging.getLogger("server.launcher")

# Seconds a worker may take from its start to listening.
READY_TIMEOUT = 60.0
# Seconds beyond a worker's own bounded shutdown before it is killed.
STOP_SLACK = 5.0
# Seconds to wait for a killed worker to be reaped.
KILL_WAIT = 5.0
EXIT_FAILURE = 1


@attrs.define(eq=False)
class RestartPolicy:
    """When to restart a worker that exited by itself: after a backoff that
    doubles with each recent restart, and never more than ``max_restarts``
    times within ``window`` seconds (then: give up)."""

    max_restarts: int = 5
    window: float = 60.0
    first_delay: float = 0.25
    max_delay: float = 5.0
    _restarts: list[float] = attrs.field(factory=list, init=False)

    def next_delay(self, now: float) -> float | None:
        """The backoff before the next restart, or ``None``: give up."""
        self._restarts = [at for at in self._restarts if now - at < self.window]
        if len(self._restarts) >= self.max_restarts:
            return None
        delay = min(self.max_delay, self.first_delay * (1 << len(self._restarts)))
        self._restarts.append(now)
        return delay


@attrs.define(eq=False)
class Slot:
    """Worker ``index``: at most one process at a time."""

    index: int
    restarts: RestartPolicy = attrs.field(factory=RestartPolicy)
    process: trio.Process | None = None
    ready: bool = False
    ever_ready: bool = False
    # The wait in progress (for listening, exiting or a backoff); a stop
    # bounds it by the stop deadline.
    waiting: trio.CancelScope | None = None


def worker_data_dir(data_dir: str, index: int) -> str:
    return os.path.join(data_dir, f"worker-{index}") if data_dir else ""


@attrs.define(eq=False)
class Supervisor:
    settings: Settings
    # The parent's own command-line arguments, given to every worker.
    args: Sequence[str]
    listen_fds: tuple[int, ...]
    lifeline_fd: int
    urls: list[str]
    slots: list[Slot] = attrs.field(init=False)
    # The shutdown signals received, in order (forwarded to every worker).
    received: list[int] = attrs.field(factory=list, init=False)
    stop_requested: trio.Event = attrs.field(factory=trio.Event, init=False)
    stop_deadline: float = attrs.field(default=math.inf, init=False)
    status: int = attrs.field(default=0, init=False)
    announced: bool = attrs.field(default=False, init=False)

    def __attrs_post_init__(self) -> None:
        self.slots = [
            Slot(index, RestartPolicy(max_restarts=self.settings.max_worker_restarts))
            for index in range(self.settings.workers)
        ]

    @property
    def stop_timeout(self) -> float:
        """How long a stopped worker may take: its drain, its cleanup, its
        flush, and some slack."""
        settings = self.settings
        return (
            settings.drain_timeout
            + settings.cleanup_budget
            + CLEANUP_SLACK
            + FLUSH_TIMEOUT
            + STOP_SLACK
        )

    async def run(self) -> int:
        async with trio.open_nursery() as nursery:
            for slot in self.slots:
                nursery.start_soon(self._keep, slot)
        log_event(logger, "workers_stopped", status=self.status)
        return self.status

    # --- stopping ---------------------------------------------------------------

    def forward(self, signum: int) -> None:
        """A shutdown signal: pass it on to every worker that listens (the
        others get it once they do) and stop."""
        self.received.append(signum)
        self._stop()
        for slot in self.slots:
            if slot.ready and slot.process is not None:
                self._send(slot, signum)

    def _give_up(self, status: int) -> None:
        if not self.stop_requested.is_set():
            self.status = status
            self.forward(signal.SIGTERM)

    def _stop(self) -> None:
        if self.stop_requested.is_set():
            return
        self.stop_deadline = trio.current_time() + self.stop_timeout
        self.stop_requested.set()
        for slot in self.slots:
            if slot.waiting is not None:
                slot.waiting.deadline = min(slot.waiting.deadline, self.stop_deadline)

    def _send(self, slot: Slot, signum: int) -> None:
        assert slot.process is not None
        if slot.process.returncode is None:
            slot.process.send_signal(signum)

    @contextmanager
    def _wait(self, slot: Slot, timeout: float) -> Iterator[trio.CancelScope]:
        """A wait of ``slot``'s, bounded by ``timeout`` and by the stop."""
        deadline = min(trio.current_time() + timeout, self.stop_deadline)
        with trio.CancelScope(deadline=deadline) as scope:
            slot.waiting = scope
            try:
                yield scope
            finally:
                slot.waiting = None

    # --- one worker -------------------------------------------------------------

    async def _keep(self, slot: Slot) -> None:
        """Run worker ``slot.index`` until the stop, restarting it as
        :class:`RestartPolicy` says."""
        while not self.stop_requested.is_set():
            status = await self._run_once(slot)
            if self.stop_requested.is_set():
                if status != 0:
                    self.status = self.status or EXIT_FAILURE
                return
            if not slot.ready and status == EXIT_STARTUP_ERROR:
                log_event(logger, "worker_failed_to_start", logging.ERROR, worker=slot.index)
                self._give_up(EXIT_STARTUP_ERROR)
                return
            delay = slot.restarts.next_delay(trio.current_time())
            if delay is None:
                log_event(
                    logger,
                    "workers_giving_up",
                    logging.ERROR,
                    worker=slot.index,
                    restarts=slot.restarts.max_restarts,
                    window_s=slot.restarts.window,
                )
                self._give_up(EXIT_FAILURE)
                return
            log_event(logger, "worker_restarting", logging.WARNING, worker=slot.index, in_s=delay)
            with self._wait(slot, delay):
                await self.stop_requested.wait()

    async def _run_once(self, slot: Slot) -> int:
        """Start worker ``slot.index``, wait until it exits; its exit status.
        Whichever way this ends, the process has exited and been reaped
        (killed if need be): no worker outlives its task."""
        slot.ready = False
        ready_read, ready_write = os.pipe()
        try:
            handoff = Handoff(
                index=slot.index,
                listen_fds=self.listen_fds,
                lifeline_fd=self.lifeline_fd,
                ready_fd=ready_write,
            )
            process = await trio.lowlevel.open_process(
                self._command(slot),
                env={**os.environ, WORKER_ENV: handoff.encode()},
                pass_fds=(*self.listen_fds, self.lifeline_fd, ready_write),
                stdin=subprocess.DEVNULL,
                # Ctrl-C in a terminal reaches the parent only, which forwards it once.
                process_group=0,
            )
        except BaseException:
            os.close(ready_read)
            raise
        finally:
            os.close(ready_write)  # the worker holds the only write end now
        slot.process = process
        log_event(logger, "worker_started", worker=slot.index, pid=process.pid)
        try:
            async with trio.lowlevel.FdStream(ready_read) as ready_pipe:
                with self._wait(slot, READY_TIMEOUT):
                    slot.ready = await ready_pipe.receive_some(1) == READY
            if slot.ready:
                self._listening(slot)
            elif process.returncode is None and process.poll() is None:
                # Not listening in time, or not by the stop's deadline.
                log_event(logger, "worker_unresponsive", logging.ERROR, worker=slot.index)
                process.kill()
            with self._wait(slot, math.inf):
                await process.wait()
            if process.returncode is None:
                log_event(logger, "worker_killed", logging.ERROR, worker=slot.index)
                process.kill()
        finally:
            # On every way out (a bug, cancellation): no worker outlives its task.
            with trio.move_on_after(KILL_WAIT, shield=True):
                await _reap(process)
            slot.process = None
        # None only if the killed process was not reaped within KILL_WAIT.
        status = -signal.SIGKILL if process.returncode is None else process.returncode
        log_event(logger, "worker_exited", worker=slot.index, pid=process.pid, status=status)
        return status

    def _listening(self, slot: Slot) -> None:
        """Worker ``slot`` listens: send it what the others got; once all
        listen the first time, say so."""
        slot.ever_ready = True
        if self.received:
            self._send(slot, self.received[0])
            if len(self.received) > 1:
                self._send(slot, self.received[-1])
        if not self.announced and all(other.ever_ready for other in self.slots):
            self.announced = True
            for url in self.urls:
                log_event(launcher_logger, "listening", url=url, workers=len(self.slots))

    def _command(self, slot: Slot) -> list[str]:
        data_dir = worker_data_dir(self.settings.data_dir, slot.index)
        # Later flags win: these override the parent's own.
        return [
            sys.executable,
            "-m",
            "server",
            *self.args,
            "--workers",
            "1",
            "--data-dir",
            data_dir,
        ]


async def _reap(process: trio.Process) -> None:
    """Kill ``process`` unless it has exited, and wait for it (the caller
    bounds the wait: SIGKILL cannot be ignored, but a process in
    uninterruptible sleep can take a while to go)."""
    if process.returncode is None and process.poll() is None:
        process.kill()
    await process.wait()


async def supervise(settings: Settings, args: Sequence[str]) -> int:
    """Serve ``settings`` with ``settings.workers`` worker processes until a
    shutdown signal; the exit status (see the module docstring).

    Raises :class:`~server.startup.StartupError` if the port cannot be bound."""
    with shutdown_signals() as signals:
        config = hypercorn_config(settings)
        try:
            sockets = listening_sockets(config, settings)
        except OSError as exc:
            raise bind_error(exc, settings) from exc
        listening = sockets.insecure_sockets
        lifeline_read, lifeline_write = os.pipe()
        try:
            supervisor = Supervisor(
                settings,
                args,
                listen_fds=tuple(sock.fileno() for sock in listening),
                lifeline_fd=lifeline_read,
                urls=[
                    f"http://{repr_socket_addr(sock.family, sock.getsockname())}"
                    for sock in listening
                ],
            )
            signals.forward = supervisor.forward
            if signals.requested.is_set():  # a signal came before the forwarding
                supervisor.forward(signal.SIGTERM)
            return await supervisor.run()
        finally:
            for sock in listening:
                sock.close()
            os.close(lifeline_read)
            os.close(lifeline_write)
