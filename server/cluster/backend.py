"""What a cluster's shared state must do: the primitives the coordinator is
built on, implemented twice with the same meaning (Redis for real nodes,
in memory for one process and for the MockClock tests).

The coordination *logic* (who waits for whom, when a lease is renewed or
handed over, what a node does with an intent) is written once above this
seam (:mod:`server.cluster.coordinator`); a backend only keeps state and
makes each primitive atomic.

Rules (each primitive keeps them atomically, as one Redis script does):

Rule 1: a session's lease names one node and a fencing token. Tokens come
        from one counter that only grows, so every new owner of a session
        holds a larger token than every owner before it.
Rule 2: a lease lives ``ttl`` seconds from its last renewal; an expired
        lease is no lease: the next :meth:`ClusterBackend.acquire` takes it
        with a new token.
Rule 3: every write made on behalf of a session (events, run records,
        renewal, release, handover) names the token it holds and is refused
        (returns False / None, writes nothing) unless that token still holds
        the lease. A paused node that lost its lease can never write again.
Rule 4: a run's events are appended in ``seq`` order with no gap; the entry
        of event ``seq`` has stream id ``0-(seq+1)``; nothing is appended
        after a terminal event.
Rule 5: intents are durable: a message sent to a node's inbox stays there
        (bounded) until read past, so a node that was busy, paused or
        reconnecting still finds it. Replies are durable for ``REPLY_TTL``.

Values cross the seam as plain JSON-able dicts for events and run records
(the native event shape of :func:`server.wire.native.event_dict`), so a
backend never imports the engine's classes; it knows a terminal event by
its type, one of :data:`TERMINAL_TYPES` (derived from the event classes).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any, Protocol

import attrs

from ..core.events import TERMINAL_TYPES as TERMINAL_TYPES

# Seconds a reply stays readable after it was written.
REPLY_TTL = 60.0
# A session's list of runs keeps the ids of this many newest runs.
SESSION_RUNS_KEPT = 100


@attrs.frozen(kw_only=True)
class SessionRef:
    """A session as the cluster names it (principal is already a non-secret
    name derived from the API key)."""

    principal: str
    session_id: str


@attrs.frozen(kw_only=True)
class Lease:
    """Ownership of one session by one node, proven by ``token``."""

    session: SessionRef
    node: str
    token: int


@attrs.frozen(kw_only=True)
class Holder:
    """Who holds a session's lease now, as another node sees it."""

    node: str
    token: int
    # Seconds until the lease expires unless renewed.
    expires_in: float
    # The owner has a live run (or a submission on its way): what ``reject``
    # refuses on. The run's id, if it has one.
    busy: bool
    run_id: str | None


class IntentKind(enum.StrEnum):
    SUPERSEDE = "supersede"  # cancel the live run (superseded), hand the lease over
    ROLLBACK = "rollback"  # supersede, and forget the superseded run
    ENQUEUE = "enqueue"  # hand the lease over once the live run ends by itself
    STOP = "stop"  # cancel run_id (client_stop), keep the lease, reply its record


@attrs.frozen(kw_only=True)
class Intent:
    """A request from one node to the owner of a session."""

    kind: IntentKind
    session: SessionRef
    from_node: str
    # Where the owner writes its :class:`Reply` (see ``reply``/``wait_reply``).
    reply_to: str
    # STOP: the run to stop.
    run_id: str | None = None
    # The token the asker saw holding the session (None: not said, from an
    # older node): a node holding that token with no session that uses it
    # gives it up at once (fenced by it), instead of being asked until it
    # expires.
    token: int | None = None


class Published(enum.Enum):
    """What :meth:`ClusterBackend.publish` did. True only for ``WRITTEN``."""

    WRITTEN = "written"
    # The lease no longer holds the session (Rule 3): nothing written, and
    # nothing more will be for that lease.
    LEASE_LOST = "lease_lost"
    # The run already has its terminal event (Rule 4), so new events or a
    # record alone are refused (nothing written); the lease is not in doubt.
    ENDED = "ended"

    def __bool__(self) -> bool:
        return self is Published.WRITTEN


class ReplyStatus(enum.StrEnum):
    DONE = "done"  # done as asked; for a handover ``token`` is the asker's lease
    NOT_OWNER = "not_owner"  # the addressee no longer owns the session: ask again
    NO_SUCH_RUN = "no_such_run"  # STOP: the run is not (or no longer) live there


@attrs.frozen(kw_only=True)
class Reply:
    status: ReplyStatus
    # A handover: the fencing token of the lease now held by the asker.
    token: int | None = None
    # STOP: the run's record once its cleanup finished.
    record: dict[str, Any] | None = None


class BackendUnavailable(Exception):
    """The shared state could not be reached within its timeout; nothing is
    known about whether the call took effect (a refused write is a False,
    never this)."""


class BackendError(Exception):
    """The shared state answered a call with an error (a wrong key type, a
    script error): a bug, ours or the deployment's, not an outage. It is
    not :class:`BackendUnavailable`: the node stays ready, and an HTTP
    request that meets it gets a logged 500 ``internal_error``."""


class ClusterBackend(Protocol):
    """Every call is bounded by the backend's own timeout and raises
    :class:`BackendUnavailable` when it runs out or the connection fails."""

    # --- leases ---------------------------------------------------------

    async def acquire(self, session: SessionRef, node: str, ttl: float) -> Lease | Holder:
        """Take the lease if nobody holds it (a new token), else say who does."""

    async def holder(self, session: SessionRef) -> Holder | None:
        """Who holds the lease now (None: nobody)."""

    async def renew(self, lease: Lease, ttl: float, *, busy: bool, run_id: str | None) -> bool:
        """Extend the lease by ``ttl`` and record whether it is busy; False if
        ``lease`` no longer holds it (nothing written)."""

    async def release(self, lease: Lease) -> bool:
        """Give the lease up; False if it was no longer held by ``lease``."""

    async def hand_over(self, lease: Lease, to_node: str, ttl: float) -> Lease | None:
        """Give the lease to ``to_node`` with a new token, in one step (no
        other node can take it in between); None if ``lease`` no longer
        holds it."""

    # --- runs -------------------------------------------------------------

    async def publish(
        self,
        lease: Lease,
        run_id: str,
        events: Sequence[dict[str, Any]],
        *,
        record: dict[str, Any] | None = None,
        max_events: int,
        retain_seconds: float,
    ) -> Published:
        """Append ``events`` (consecutive ``seq``, continuing the run's
        stream) and, if given, replace the run's record, fenced by
        ``lease``. A terminal event in ``events`` starts the retention
        clock of the stream and the record (``retain_seconds``); the stream
        keeps at most ``max_events`` entries. Events the stream already has
        are skipped (a retry appends nothing twice). ``LEASE_LOST`` if
        ``lease`` no longer holds the session; ``ENDED`` if the run already
        ended and there is something new (events, or only a record) to
        write; nothing is written then. :class:`ValueError` for a gap."""

    async def end_orphan(
        self, lease: Lease, run_id: str, terminal: dict[str, Any], record: dict[str, Any]
    ) -> bool:
        """For a run whose owner lost its lease mid-run: append ``terminal``
        (its ``seq`` set by the backend to follow the stream's last entry)
        and write ``record``, unless the run already has a terminal event.
        Fenced by ``lease`` (the new owner's). True if it wrote."""

    async def forget_run(self, lease: Lease, run_id: str) -> bool:
        """Delete a run's record and events and drop it from its session's
        runs (``rollback``), fenced by ``lease``. False (nothing deleted) if
        ``lease`` no longer holds the session; True also when the run was
        not there."""

    async def end_orphan_unleased(
        self, session: SessionRef, run_id: str, terminal: dict[str, Any], record: dict[str, Any]
    ) -> bool:
        """:meth:`end_orphan` for a reader, who takes no lease: only if
        nobody holds ``session``'s lease (its owner's expired), in the same
        atomic step. True if it wrote."""

    async def run_record(self, run_id: str) -> dict[str, Any] | None:
        """A run's record (within retention), whoever owns it."""

    async def run_events(
        self, run_id: str, after_seq: int, *, block: float
    ) -> list[dict[str, Any]]:
        """The run's events after ``after_seq`` (-1: from the start); when
        there are none yet, wait up to ``block`` seconds for some."""

    async def session_runs(self, session: SessionRef, limit: int) -> list[dict[str, Any]]:
        """The session's run records, newest first (within retention)."""

    # --- intents ----------------------------------------------------------

    async def send_intent(self, to_node: str, intent: Intent) -> None:
        """Leave ``intent`` in ``to_node``'s inbox."""

    async def read_intents(
        self, node: str, after: str, *, block: float
    ) -> list[tuple[str, Intent | None]]:
        """Intents in ``node``'s inbox after position ``after`` ("0": from the
        start), with their positions; waits up to ``block`` seconds for one.
        An entry that is no intent (malformed) is logged and comes as None:
        its position still counts, so the next read goes past it."""

    async def reply(self, reply_to: str, reply: Reply) -> None:
        """Answer an intent (durable for :data:`REPLY_TTL`)."""

    async def wait_reply(self, reply_to: str, *, block: float) -> Reply | None:
        """The reply to an intent, waiting up to ``block`` seconds (None:
        not yet)."""
