"""The cluster's shared state in memory: every :class:`ClusterBackend`
primitive with the meaning the seam's rules give it, for several nodes in
one trio run (tests, and one process that wants the coordinator's code
path without Redis).

Time is trio's clock, so under ``MockClock`` leases and replies expire at
exact times. Blocking reads wait on a :class:`trio.Event` per inbox, reply
and run stream, bounded by their ``block``. Everything kept is bounded: an
inbox by :data:`INBOX_MAX`, a run's stream by ``max_events``, a session's
run list by :data:`SESSION_RUNS_KEPT`, ended runs and replies by their
retention.

Faults for tests: :attr:`MemoryBackend.available` off makes every call raise
:class:`BackendUnavailable` (Redis gone, for every node); a
:class:`~server.cluster.memory_link.MemoryLink` is one node's connection
to it, which can be paused (its calls block until resumed: a stalled
network or a SIGSTOP'd process, seen from the node) or cut (its calls fail).
"""

from __future__ import annotations

import copy
import itertools
from collections import deque
from collections.abc import Sequence
from typing import Any

import attrs
import trio

from .backend import (
    REPLY_TTL,
    SESSION_RUNS_KEPT,
    TERMINAL_TYPES,
    BackendUnavailable,
    Holder,
    Intent,
    Lease,
    Published,
    Reply,
    SessionRef,
)

INBOX_MAX = 10_000


def _terminal(event: dict[str, Any]) -> bool:
    return event.get("type") in TERMINAL_TYPES


@attrs.define(eq=False)
class _LeaseRow:
    node: str
    token: int
    expires_at: float
    busy: bool = True
    run_id: str | None = None
    # The token this lease was handed over from (a retried hand_over).
    prev: int | None = None


@attrs.define(eq=False)
class _RunRow:
    lease_session: SessionRef
    record: dict[str, Any] | None = None
    events: deque[dict[str, Any]] = attrs.field(factory=deque)
    # seq of the last event appended (-1: none), trimmed or not.
    last_seq: int = -1
    ended: bool = False
    expires_at: float = float("inf")
    changed: trio.Event = attrs.field(factory=trio.Event)

    def wake(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


@attrs.define(eq=False)
class _Inbox:
    entries: deque[tuple[int, Intent]] = attrs.field(factory=deque)
    changed: trio.Event = attrs.field(factory=trio.Event)

    def wake(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


@attrs.define(eq=False)
class MemoryBackend:
    available: bool = True
    # How long an orphan's record stays once ended (the seam names none).
    orphan_retain_seconds: float = 3600.0
    # Seconds the shared state's clock is ahead of trio's (see jump).
    skew: float = 0.0
    _fence: int = attrs.field(default=0, init=False)
    _leases: dict[SessionRef, _LeaseRow] = attrs.field(factory=dict, init=False)
    _runs: dict[str, _RunRow] = attrs.field(factory=dict, init=False)
    _session_runs: dict[SessionRef, list[str]] = attrs.field(factory=dict, init=False)
    _inboxes: dict[str, _Inbox] = attrs.field(factory=dict, init=False)
    _positions: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1), init=False)
    _replies: dict[str, tuple[Reply, float]] = attrs.field(factory=dict, init=False)
    _reply_changed: trio.Event = attrs.field(factory=trio.Event, init=False)
    # For tests: (trio time, run id, event type) of every event appended, in order.
    journal: list[tuple[float, str, str]] = attrs.field(factory=list, init=False)

    def _now(self) -> float:
        return trio.current_time() + self.skew

    def jump(self, seconds: float) -> None:
        """The shared state's clock jumps ahead: to it, every node has been
        frozen that long (a SIGSTOP'd or GC-paused owner sees its lease gone
        the moment it runs again, before its own timers could notice)."""
        self.skew += seconds

    def _check(self) -> None:
        if not self.available:
            raise BackendUnavailable("the shared state is unavailable")

    def _lease(self, session: SessionRef) -> _LeaseRow | None:
        row = self._leases.get(session)
        if row is not None and self._now() >= row.expires_at:
            del self._leases[session]  # Rule 2: an expired lease is no lease
            return None
        return row

    def _holds(self, lease: Lease) -> _LeaseRow | None:
        row = self._lease(lease.session)
        return row if row is not None and row.token == lease.token else None  # Rule 3

    def _holder(self, row: _LeaseRow) -> Holder:
        return Holder(
            node=row.node,
            token=row.token,
            expires_in=row.expires_at - self._now(),
            busy=row.busy,
            run_id=row.run_id,
        )

    def _new_lease(self, session: SessionRef, node: str, ttl: float) -> Lease:
        self._fence += 1  # Rule 1
        self._leases[session] = _LeaseRow(
            node=node, token=self._fence, expires_at=self._now() + ttl
        )
        return Lease(session=session, node=node, token=self._fence)

    # --- leases ---------------------------------------------------------

    async def acquire(self, session: SessionRef, node: str, ttl: float) -> Lease | Holder:
        self._check()
        await trio.lowlevel.checkpoint()
        row = self._lease(session)
        return self._new_lease(session, node, ttl) if row is None else self._holder(row)

    async def holder(self, session: SessionRef) -> Holder | None:
        self._check()
        await trio.lowlevel.checkpoint()
        row = self._lease(session)
        return None if row is None else self._holder(row)

    async def renew(self, lease: Lease, ttl: float, *, busy: bool, run_id: str | None) -> bool:
        self._check()
        await trio.lowlevel.checkpoint()
        row = self._holds(lease)
        if row is None:
            return False
        row.expires_at = self._now() + ttl
        row.busy, row.run_id = busy, run_id
        return True

    async def release(self, lease: Lease) -> bool:
        self._check()
        await trio.lowlevel.checkpoint()
        if self._holds(lease) is None:
            return False
        del self._leases[lease.session]
        return True

    async def hand_over(self, lease: Lease, to_node: str, ttl: float) -> Lease | None:
        self._check()
        await trio.lowlevel.checkpoint()
        if self._holds(lease) is None:
            row = self._lease(lease.session)
            if row is not None and row.prev == lease.token and row.node == to_node:
                # It already happened (a retry after a lost answer): the same lease.
                return Lease(session=lease.session, node=to_node, token=row.token)
            return None
        handed = self._new_lease(lease.session, to_node, ttl)
        self._leases[lease.session].prev = lease.token
        return handed

    # --- runs -------------------------------------------------------------

    def _run(self, run_id: str) -> _RunRow | None:
        row = self._runs.get(run_id)
        if row is not None and self._now() >= row.expires_at:
            del self._runs[run_id]
            return None
        return row

    def _remember(self, session: SessionRef, run_id: str) -> None:
        runs = self._session_runs.setdefault(session, [])
        if run_id not in runs:
            runs.append(run_id)
            del runs[:-SESSION_RUNS_KEPT]

    def _append(self, row: _RunRow, event: dict[str, Any], max_events: int) -> None:
        self.journal.append((trio.current_time(), str(event["run_id"]), str(event["type"])))
        del self.journal[:-10_000]
        row.events.append(copy.deepcopy(event))
        row.last_seq = int(event["seq"])
        while len(row.events) > max_events:
            row.events.popleft()

    def _end(self, row: _RunRow, retain_seconds: float) -> None:
        row.ended = True
        row.expires_at = self._now() + retain_seconds

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
        self._check()
        await trio.lowlevel.checkpoint()
        seqs = [int(event["seq"]) for event in events]
        if seqs and seqs != list(range(seqs[0], seqs[0] + len(seqs))):
            raise ValueError(f"events of run {run_id} are not consecutive: {seqs}")
        if self._holds(lease) is None:
            return Published.LEASE_LOST
        row = self._run(run_id)
        # A retried publish may repeat events already in: those are skipped.
        last_seq = -1 if row is None else row.last_seq
        fresh = [event for event in events if int(event["seq"]) > last_seq]
        if row is not None and row.ended and (fresh or not events):
            return Published.ENDED  # Rule 4 (a record alone, too)
        if fresh and int(fresh[0]["seq"]) != last_seq + 1:
            raise ValueError(f"events of run {run_id} leave a gap at {last_seq + 1}")
        if row is None:
            row = self._runs[run_id] = _RunRow(lease_session=lease.session)
            self._remember(lease.session, run_id)
        for event in fresh:
            self._append(row, event, max_events)
            if _terminal(event):
                self._end(row, retain_seconds)
        if record is not None:
            row.record = copy.deepcopy(record)
        row.wake()
        return Published.WRITTEN

    async def end_orphan(
        self, lease: Lease, run_id: str, terminal: dict[str, Any], record: dict[str, Any]
    ) -> bool:
        self._check()
        await trio.lowlevel.checkpoint()
        if self._holds(lease) is None:
            return False
        return self._end_orphan(lease.session, run_id, terminal, record)

    async def end_orphan_unleased(
        self, session: SessionRef, run_id: str, terminal: dict[str, Any], record: dict[str, Any]
    ) -> bool:
        self._check()
        await trio.lowlevel.checkpoint()
        if self._lease(session) is not None:
            return False
        return self._end_orphan(session, run_id, terminal, record)

    def _end_orphan(
        self, session: SessionRef, run_id: str, terminal: dict[str, Any], record: dict[str, Any]
    ) -> bool:
        row = self._run(run_id)
        if row is None:
            row = self._runs[run_id] = _RunRow(lease_session=session)
            self._remember(session, run_id)
        if row.ended:
            return False
        self._append(row, {**terminal, "seq": row.last_seq + 1}, max_events=2**31)
        row.record = copy.deepcopy(record)
        self._end(row, self.orphan_retain_seconds)
        row.wake()
        return True

    async def forget_run(self, lease: Lease, run_id: str) -> bool:
        self._check()
        await trio.lowlevel.checkpoint()
        if self._holds(lease) is None:
            return False
        row = self._runs.pop(run_id, None)
        runs = self._session_runs.get(lease.session, [])
        if run_id in runs:
            runs.remove(run_id)
        if row is not None:
            row.wake()  # its readers find it gone
        return True

    async def run_record(self, run_id: str) -> dict[str, Any] | None:
        self._check()
        await trio.lowlevel.checkpoint()
        row = self._run(run_id)
        return None if row is None or row.record is None else copy.deepcopy(row.record)

    async def run_events(
        self, run_id: str, after_seq: int, *, block: float
    ) -> list[dict[str, Any]]:
        self._check()
        with trio.move_on_after(block):
            while True:
                row = self._run(run_id)
                if row is None:
                    break
                fresh = [event for event in row.events if int(event["seq"]) > after_seq]
                if fresh:
                    return copy.deepcopy(fresh)
                await row.changed.wait()
                self._check()
        await trio.lowlevel.checkpoint()
        return []

    async def session_runs(self, session: SessionRef, limit: int) -> list[dict[str, Any]]:
        self._check()
        await trio.lowlevel.checkpoint()
        records = []
        for run_id in self._session_runs.get(session, []):
            row = self._run(run_id)
            if row is not None and row.record is not None:
                records.append(copy.deepcopy(row.record))
        records.sort(key=lambda record: float(record.get("created_at", 0)), reverse=True)
        return records[:limit]

    # --- intents ----------------------------------------------------------

    async def send_intent(self, to_node: str, intent: Intent) -> None:
        self._check()
        await trio.lowlevel.checkpoint()
        inbox = self._inboxes.setdefault(to_node, _Inbox())
        inbox.entries.append((next(self._positions), intent))
        while len(inbox.entries) > INBOX_MAX:
            inbox.entries.popleft()
        inbox.wake()

    async def read_intents(
        self, node: str, after: str, *, block: float
    ) -> list[tuple[str, Intent | None]]:
        self._check()
        position = int(after)
        inbox = self._inboxes.setdefault(node, _Inbox())
        with trio.move_on_after(block):
            while True:
                fresh: list[tuple[str, Intent | None]] = [
                    (str(at), intent) for at, intent in inbox.entries if at > position
                ]
                if fresh:
                    return fresh
                await inbox.changed.wait()
                self._check()
        await trio.lowlevel.checkpoint()
        return []

    async def reply(self, reply_to: str, reply: Reply) -> None:
        self._check()
        await trio.lowlevel.checkpoint()
        now = self._now()
        for key in [key for key, (_, until) in self._replies.items() if until <= now]:
            del self._replies[key]
        self._replies[reply_to] = (reply, now + REPLY_TTL)
        self._reply_changed.set()
        self._reply_changed = trio.Event()

    async def wait_reply(self, reply_to: str, *, block: float) -> Reply | None:
        self._check()
        with trio.move_on_after(block):
            while True:
                entry = self._replies.get(reply_to)
                if entry is not None and entry[1] > self._now():
                    return entry[0]
                await self._reply_changed.wait()
                self._check()
        await trio.lowlevel.checkpoint()
        return None

    # --- for tests ----------------------------------------------------------

    def stream(self, run_id: str) -> list[dict[str, Any]]:
        """A run's stream as kept (no expiry check)."""
        row = self._runs.get(run_id)
        return [] if row is None else list(row.events)
