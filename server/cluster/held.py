"""What both sides of the coordinator share: the node's settings, its
counters, the sessions it holds, and every backend call bounded."""

from __future__ import annotations

import enum
import os
import socket
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TypeVar

import attrs
import trio

from ..core.run import Run
from ..core.session import Session, SessionKey
from ..settings import CLUSTER_CALL_TIMEOUT as CALL_TIMEOUT
from ..settings import check_lease_ttl
from .backend import BackendUnavailable, ClusterBackend, Lease, SessionRef

T = TypeVar("T")


def new_node_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def ref_of(key: SessionKey) -> SessionRef:
    return SessionRef(principal=key.principal, session_id=key.session_id)


@attrs.define(eq=False)
class ClusterMetrics:
    """Plain counters for ``/metrics``; ``on_remote_wait`` (a histogram's
    observe) also gets every remote wait."""

    lease_acquisitions: int = 0  # fresh leases taken (nobody held the session)
    handovers_received: int = 0  # leases handed to this node by their owner
    handovers_given: int = 0  # leases this node handed to another
    orphans_ended: int = 0  # runs of an owner whose lease expired, ended owner_lost
    owner_lost: int = 0  # leases this node lost (its runs ended owner_lost)
    cancels_sent: int = 0  # intents sent to another node (supersede, enqueue, stop...)
    cancels_handled: int = 0  # intents this node answered
    fenced_writes_refused: int = 0  # writes the backend refused: the lease had moved
    backend_errors: int = 0  # calls that failed or timed out
    # Whether the latest call reached the shared state (the intents reader
    # calls at least every second): what /readyz reports.
    reachable: bool = True
    # Seconds a prompt waited for another node to hand a session over (the latest).
    remote_waits: deque[float] = attrs.field(factory=lambda: deque(maxlen=1000))
    on_remote_wait: Callable[[float], None] | None = None

    def remote_wait(self, seconds: float) -> None:
        self.remote_waits.append(seconds)
        if self.on_remote_wait is not None:
            self.on_remote_wait(seconds)


@attrs.frozen(kw_only=True)
class ClusterConfig:
    """A node's timing. A lease must outlive the run's cleanup and two calls
    (see :attr:`give_up_after`): ``lease_ttl > cleanup_budget + 2 *
    call_timeout``, else :class:`ValueError`."""

    # Seconds a lease lives without renewal (--lease-ttl).
    lease_ttl: float = attrs.field(default=10.0, validator=attrs.validators.gt(0))
    # Seconds one backend call may take (a blocking read: on top of its block).
    call_timeout: float = attrs.field(default=CALL_TIMEOUT, validator=attrs.validators.gt(0))
    # A run's cleanup budget (the engine's), for waits that follow one.
    cleanup_budget: float = attrs.field(default=5.0, validator=attrs.validators.gt(0))
    # A run's stream: entries kept, and seconds kept once it ended.
    max_run_events: int = attrs.field(default=100_000, validator=attrs.validators.ge(8))
    retain_seconds: float = attrs.field(default=3600.0, validator=attrs.validators.ge(0))

    def __attrs_post_init__(self) -> None:
        check_lease_ttl(self.lease_ttl, self.cleanup_budget, self.call_timeout)

    @property
    def give_up_after(self) -> float:
        """Seconds after the last renewal (timed from before its call) at
        which a node gives a lease up and cancels its runs: their cleanup
        (``cleanup_budget``) and the publish of their end (``call_timeout``)
        are over before the lease can expire in the shared state, so no
        other node starts a run while one of ours is still alive."""
        return self.lease_ttl - self.cleanup_budget - self.call_timeout

    @property
    def stop_budget(self) -> float:
        """Seconds a stopping node gives its runs' ends to be published (a
        run cancelled as it stops ends within its cleanup budget, and may
        have been cancelled just before: twice that, then one publish);
        its leases are released after that, bounded by a call."""
        return 2 * self.cleanup_budget + self.call_timeout

    @property
    def renew_every(self) -> float:
        """Three tries of a renewal before :attr:`give_up_after`."""
        return self.give_up_after / 3


class HeldState(enum.Enum):
    HELD = "held"
    MOVING = "moving"  # being handed over: renewed, never released
    GONE = "gone"  # handed over or lost: nothing more is written with it


@attrs.define(eq=False)
class Mirror:
    """Copies one run's events to the backend; ``done`` once the terminal
    event is published (or the lease was lost)."""

    run: Run
    # Set once its first publish (run.started and the record) went through,
    # or the mirror ended without it.
    first_published: trio.Event = attrs.field(factory=trio.Event)
    done: trio.Event = attrs.field(factory=trio.Event)
    terminal_published: bool = False


@attrs.define(eq=False)
class Held:
    """A session this node owns, and the lease that proves it."""

    session: Session
    lease: Lease
    # trio clock from before the call of the last renewal that worked (or
    # of the acquire or handover): the shared state's ttl started later.
    renewed_at: float
    state: HeldState = HeldState.HELD
    mirrors: dict[str, Mirror] = attrs.field(factory=dict)


@attrs.define(eq=False)
class Calls:
    """The backend, every call bounded by ``call_timeout`` (plus its block):
    a timeout is :class:`BackendUnavailable`, and every failure counts."""

    backend: ClusterBackend
    config: ClusterConfig
    metrics: ClusterMetrics

    async def __call__(self, call: Awaitable[T], *, block: float = 0.0) -> T:
        try:
            with trio.fail_after(self.config.call_timeout + block):
                result = await call
        except trio.TooSlowError as exc:
            self.metrics.backend_errors += 1
            self.metrics.reachable = False
            raise BackendUnavailable("the shared state did not answer in time") from exc
        except BackendUnavailable:
            self.metrics.backend_errors += 1
            self.metrics.reachable = False
            raise
        self.metrics.reachable = True
        return result
