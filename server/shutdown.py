"""What SIGINT, SIGTERM and SIGHUP do while ``python -m server`` runs.

* The first one asks for a graceful shutdown: the launcher drains (stop
  admitting runs, let live ones finish for ``--drain-timeout``, interrupt
  the rest with reason ``shutdown``), then Hypercorn closes and the process
  exits 0.
* Any later one while the drain waits cuts the wait short: live runs are
  interrupted (reason ``shutdown``) at once, recorded, and the process exits
  0 as usual. Once the drain is over it changes nothing: what is left
  (writing terminal frames, closing the store) is bounded already.
* SIGHUP is a shutdown like SIGTERM: there is no configuration to reload,
  and its default action (end the process at once) would leave streams
  without a terminal frame and runs ``running`` in the store.

Why not ``trio.open_signal_receiver``: when its block exits it re-delivers
the signals still pending through the process's previous handling, so a
second SIGTERM that arrived while the server stopped ended the process by
that signal (exit -15) and a second SIGINT raised ``KeyboardInterrupt``
with a traceback. Here the handler only hands the signal to trio (as trio's
own does) and nothing is ever re-delivered.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

import attrs
import trio

from .logs import log_event

# The launcher's log: shutdown_requested sits with draining and drained.
logger = logging.getLogger("server.launcher")

SHUTDOWN_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@attrs.define(eq=False)
class ShutdownSignals:
    """The shutdown signals received so far, as two events."""

    # The first signal: shut down gracefully.
    requested: trio.Event = attrs.field(factory=trio.Event)
    # Any later one: skip what is left of the drain.
    hurried: trio.Event = attrs.field(factory=trio.Event)
    # Also called with every signal (a supervisor passes each on to its workers).
    forward: Callable[[int], None] | None = None

    def received(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if not self.requested.is_set():
            log_event(logger, "shutdown_requested", signal=name)
            self.requested.set()
        else:
            log_event(logger, "shutdown_hurried", signal=name)
            self.hurried.set()
        if self.forward is not None:
            self.forward(signum)


@contextmanager
def shutdown_signals(forward: Callable[[int], None] | None = None) -> Iterator[ShutdownSignals]:
    """Receive :data:`SHUTDOWN_SIGNALS` for the duration of the block, in
    trio's main thread; on exit the previous handlers are back. ``forward``
    is called with each signal too, after the events are set.

    A signal that arrives after the block (the server has stopped, nothing is
    left to clean up) gets the process's previous handling."""
    signals = ShutdownSignals(forward=forward)
    token = trio.lowlevel.current_trio_token()

    def handler(signum: int, frame: FrameType | None) -> None:
        # Runs between two bytecodes of whatever the main thread was doing:
        # only schedule the work for trio, as trio's own signal handler does.
        token.run_sync_soon(signals.received, signum)

    previous = {signum: signal.signal(signum, handler) for signum in SHUTDOWN_SIGNALS}
    try:
        yield signals
    finally:
        for signum, action in previous.items():
            signal.signal(signum, action)
