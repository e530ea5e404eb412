"""What a worker process gets from its supervisor (:mod:`server.supervisor`)
and what it tells it back: the worker's side of ``--workers N``.

The supervisor starts each worker as ``python -m server`` with one internal
environment variable, :data:`WORKER_ENV`, holding a :class:`Handoff` as
JSON: the worker's index and three inherited file descriptors.

* ``listen_fds``: the listening sockets the supervisor bound; the worker
  serves them as Hypercorn's ``fd://`` binds (:func:`server.launcher.serve`).
* ``lifeline_fd``: the read end of a pipe whose write end only the
  supervisor holds. Nothing is ever written to it; end of file means the
  supervisor is gone (killed with SIGKILL, say), and the worker then shuts
  down as on SIGTERM (logged ``supervisor_gone``): it drains, bounded as
  usual, and exits, so no worker outlives its supervisor by more than a
  drain. Not ``PR_SET_PDEATHSIG``: trio starts a subprocess from a worker
  thread (``trio.lowlevel.open_process`` runs ``Popen`` in
  ``trio.to_thread``), and Linux sends the death signal when the *thread*
  that forked exits, which trio's idle threads do after a while: healthy
  workers would be killed.
* ``ready_fd``: the write end of a pipe the worker writes one byte to once
  it listens (:meth:`Handoff.report_ready`), then closes. The supervisor
  thereby knows the worker's signal handlers are in place (a signal before
  that would end the worker without a drain) and when every worker serves.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping

import attrs
import trio

from .logs import log_event
from .shutdown import ShutdownSignals

# Internal: set by the supervisor for its workers only; not a flag.
WORKER_ENV = "TSS_WORKER"
READY = b"r"

# With the launcher's lines: supervisor_gone sits with draining and drained.
logger = logging.getLogger("server.launcher")


@attrs.frozen(kw_only=True)
class Handoff:
    index: int
    listen_fds: tuple[int, ...]
    lifeline_fd: int
    ready_fd: int

    def encode(self) -> str:
        return json.dumps(attrs.asdict(self))

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Handoff | None:
        """The handoff of this process, if a supervisor started it."""
        text = environ.get(WORKER_ENV)
        if not text:
            return None
        fields = json.loads(text)
        return cls(
            index=int(fields["index"]),
            listen_fds=tuple(int(fd) for fd in fields["listen_fds"]),
            lifeline_fd=int(fields["lifeline_fd"]),
            ready_fd=int(fields["ready_fd"]),
        )

    @property
    def binds(self) -> list[str]:
        """The inherited sockets as Hypercorn binds."""
        return [f"fd://{fd}" for fd in self.listen_fds]

    def report_ready(self) -> None:
        """Tell the supervisor that this worker listens (one byte into an
        empty pipe: never blocks)."""
        try:
            os.write(self.ready_fd, READY)
        except OSError:
            pass  # the supervisor is gone: the lifeline says so too
        finally:
            os.close(self.ready_fd)

    async def supervisor_gone(self) -> None:
        """Return once the supervisor has exited (the lifeline's end of file)."""
        async with trio.lowlevel.FdStream(self.lifeline_fd) as lifeline:
            while await lifeline.receive_some():
                pass


async def shutdown_requested(signals: ShutdownSignals, handoff: Handoff | None) -> None:
    """Return once a shutdown was asked for: a shutdown signal, or, for a
    worker, its supervisor gone (then the shutdown is requested as a signal
    would, and a later signal hurries the drain as usual)."""
    if handoff is None:
        await signals.requested.wait()
        return

    async def watch_supervisor() -> None:
        await handoff.supervisor_gone()
        if not signals.requested.is_set():
            log_event(logger, "supervisor_gone")
            signals.requested.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_supervisor)
        await signals.requested.wait()
        nursery.cancel_scope.cancel()
