"""A node of a cluster: the coordination logic, written once above the
:class:`~server.cluster.backend.ClusterBackend` seam (Redis for real nodes,
memory for tests), plugged into the session manager as its coordinator.

Acquire (a prompt for a session this node does not hold):

1. ``acquire`` the lease. Got it: first end the session's *orphans* (a run
   record still ``running`` under a smaller token: its owner died or was
   paused past its lease) as ``interrupted/owner_lost``, then serve.
2. Someone holds it. ``reject`` and the holder is busy: :class:`RunInProgress`,
   nothing sent. Otherwise leave an intent in the holder's inbox
   (interrupt → supersede, rollback → rollback, enqueue/reject → enqueue)
   and wait for its reply in slices of at most a second, each bounded: DONE
   carries the lease; NOT_OWNER, or a holder that changed or vanished,
   means ask again from 1. There is no proceed-anyway timeout: a live
   owner answers after its run's cleanup, a dead one's lease expires.
3. If the prompt is given up after sending (its client went away), a
   handover may still come: wait for the reply (shielded, bounded by the
   cleanup budget) and release a lease it carries.

The owner side (intents, renewal, the run mirror, release) is
:class:`~server.cluster.owner.Owner`. Reads of runs and sessions for the
HTTP edge, and stopping a run on another node, are here too.

Errors: a backend that cannot be reached (or does not answer within
``call_timeout``) makes a prompt fail with :class:`CoordinatorUnavailable`.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Any

import attrs
import trio

from ..core.errors import CoordinatorUnavailable, RunInProgress
from ..core.run import Run
from ..core.session import OnConflict, Session, SessionKey
from .backend import (
    BackendUnavailable,
    ClusterBackend,
    Holder,
    Intent,
    IntentKind,
    Lease,
    ReplyStatus,
    SessionRef,
)
from .held import Calls, ClusterConfig, ClusterMetrics, new_node_id, ref_of
from .owner import Owner
from .records import orphan_ending

logger = logging.getLogger(__name__)

_INTENT_FOR = {
    OnConflict.INTERRUPT: IntentKind.SUPERSEDE,
    OnConflict.ROLLBACK: IntentKind.ROLLBACK,
    OnConflict.ENQUEUE: IntentKind.ENQUEUE,
    # The holder was idle when asked (else 409): take it once its run ends.
    OnConflict.REJECT: IntentKind.ENQUEUE,
}
# A wait for a reply is cut into slices this long at most (then: is the
# owner still there?).
REPLY_SLICE = 1.0
# Orphans looked for among the session's newest records.
ORPHAN_SCAN = 5


@attrs.define(eq=False)
class ClusterCoordinator:
    backend: ClusterBackend
    config: ClusterConfig = attrs.field(factory=ClusterConfig)
    node: str = attrs.field(factory=new_node_id)
    metrics: ClusterMetrics = attrs.field(factory=ClusterMetrics)
    owner: Owner = attrs.field(init=False)
    calls: Calls = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.calls = Calls(self.backend, self.config, self.metrics)
        self.owner = Owner(self.node, self.calls, self.config, self.metrics)

    # --- the manager's seam (server.core.coordinator.Coordinator) ----------

    @property
    def run_started(self) -> Callable[[Session, Run], None]:
        return self.owner.run_started

    # Owner.serve reports started (ASYNC128 cannot see through the call).
    async def serve(  # noqa: ASYNC128
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The owner side's tasks (see :meth:`Owner.serve`, which reports
        started)."""
        await self.owner.serve(task_status=task_status)

    def release(self, session: Session) -> None:
        self.owner.release(session)

    async def run_recorded(self, run: Run) -> None:
        """Until the run's record (and ``run.started``) is in the shared
        state, at most ``call_timeout``: a client that learns the run's id
        can then read it from any node."""
        with trio.move_on_after(self.config.call_timeout):
            await self.owner.wait_mirrored(run)

    async def run_discarded(self, run: Run) -> None:
        """Rolled back (here, or for another node's ``rollback`` intent): the
        run leaves the shared state too, so no node answers for it."""
        await self.owner.forget(run)

    async def acquire(self, session: Session, on_conflict: OnConflict) -> None:
        ref = ref_of(session.key)
        self.owner.acquiring[ref] += 1
        try:
            await self._acquire(session, ref, on_conflict)
        finally:
            self.owner.acquiring[ref] -= 1
            if not self.owner.acquiring[ref]:
                del self.owner.acquiring[ref]

    async def _acquire(self, session: Session, ref: SessionRef, on_conflict: OnConflict) -> None:
        try:
            releasing = self.owner.releasing.get(ref)
            if releasing is not None:  # our own release of it, on its way
                bound = self.config.cleanup_budget + 2 * self.config.call_timeout
                with trio.move_on_after(bound):
                    await releasing.wait()
            while True:
                # The lease's ttl starts when the backend runs the call: later.
                since = trio.current_time()
                got = await self.calls(self.backend.acquire(ref, self.node, self.config.lease_ttl))
                if isinstance(got, Lease):
                    self.metrics.lease_acquisitions += 1
                    lease = got
                    break
                if got.node == self.node and not self.owner.holds(ref, got.token):
                    # Ours, but no session here uses it (a release that did
                    # not get through): drop it (fenced by its token), ask again.
                    await self.calls(
                        self.backend.release(Lease(session=ref, node=self.node, token=got.token))
                    )
                    continue
                if on_conflict is OnConflict.REJECT and got.busy:
                    raise RunInProgress
                handed = await self._ask_owner(ref, got, _INTENT_FOR[on_conflict])
                if handed is not None:
                    self.metrics.handovers_received += 1
                    lease, since = handed
                    break
        except BackendUnavailable as exc:
            raise CoordinatorUnavailable(str(exc)) from exc
        self.owner.hold(session, lease, since)
        granted = False
        try:
            await self._end_orphans(lease)
            granted = True
        except BackendUnavailable as exc:
            raise CoordinatorUnavailable(str(exc)) from exc
        finally:
            if not granted:
                # The manager does not release what it was never granted.
                self.owner.release(session)

    # --- acquiring --------------------------------------------------------

    async def _ask_owner(
        self, ref: SessionRef, holder: Holder, kind: IntentKind
    ) -> tuple[Lease, float] | None:
        """The lease handed over by ``holder`` and a time its ttl started
        after; None: ask again."""
        reply_to = f"{self.node}:{uuid.uuid4().hex}"
        intent = Intent(
            kind=kind, session=ref, from_node=self.node, reply_to=reply_to, token=holder.token
        )
        asked_at = trio.current_time()
        await self.calls(self.backend.send_intent(holder.node, intent))
        self.metrics.cancels_sent += 1
        answered = False
        try:
            handed = await self._await_handover(ref, holder, reply_to, asked_at)
            answered = True
            return handed
        finally:
            self.metrics.remote_wait(trio.current_time() - asked_at)
            if not answered:
                with trio.move_on_after(self.config.cleanup_budget, shield=True):
                    await self._give_back_late_handover(ref, reply_to)

    async def _await_handover(
        self, ref: SessionRef, holder: Holder, reply_to: str, since: float
    ) -> tuple[Lease, float] | None:
        # ``since``: from before the latest call that saw ``holder`` still
        # holding the session, so the handover (and its ttl) came later.
        # NOT_OWNER: the holder has no session using the lease (it gives a
        # stray lease up at once, else it expires): asking again before the
        # lease changed would only ask again and again, so wait for that.
        not_owner = False
        while True:
            block = min(REPLY_SLICE, max(holder.expires_in, 0.0))
            if not_owner:
                await trio.sleep(block)
            else:
                reply = await self.calls(
                    self.backend.wait_reply(reply_to, block=block), block=block
                )
                if reply is not None:
                    if reply.status is ReplyStatus.DONE and reply.token is not None:
                        return Lease(session=ref, node=self.node, token=reply.token), since
                    not_owner = True
            checked_at = trio.current_time()
            now = await self.calls(self.backend.holder(ref))
            if now is None:
                return None  # the owner's lease expired: take it
            if now.token != holder.token:
                if now.node == self.node:  # handed to us; its reply is on its way
                    return Lease(session=ref, node=self.node, token=now.token), since
                return None
            holder, since = now, checked_at

    async def _give_back_late_handover(self, ref: SessionRef, reply_to: str) -> None:
        try:
            reply = await self.calls(
                self.backend.wait_reply(reply_to, block=self.config.cleanup_budget),
                block=self.config.cleanup_budget,
            )
            if reply is not None and reply.status is ReplyStatus.DONE and reply.token is not None:
                await self.calls(
                    self.backend.release(Lease(session=ref, node=self.node, token=reply.token))
                )
        except BackendUnavailable:
            pass  # the lease expires by itself

    async def _end_orphans(self, lease: Lease) -> None:
        for record in await self.calls(self.backend.session_runs(lease.session, ORPHAN_SCAN)):
            if record.get("status") != "running" or int(record.get("token", 0)) >= lease.token:
                continue
            terminal, ended = orphan_ending(record)
            if await self.calls(self.backend.end_orphan(lease, record["run_id"], terminal, ended)):
                self.metrics.orphans_ended += 1
                logger.info(
                    "orphan_ended trace=%s owner=%s reason=owner_lost",
                    record["run_id"],
                    record.get("node"),
                )

    # --- reads and stops from any node --------------------------------------

    def leases(self) -> dict[SessionKey, tuple[str, int]]:
        """Sessions this node holds: its node id and each lease's token."""
        return {
            SessionKey(ref.principal, ref.session_id): (held.lease.node, held.lease.token)
            for ref, held in self.owner.held.items()
        }

    async def run_record(self, principal: str, run_id: str) -> dict[str, Any] | None:
        """A run's record from the shared state; another principal's is None.
        A record still ``running`` whose owner no longer holds the session
        is an orphan: it is ended (``owner_lost``) before it is answered."""
        try:
            record = await self._record(principal, run_id)
            if record is None or record.get("status") != "running":
                return record
            ref = SessionRef(principal=principal, session_id=record["session_id"])
            holder = await self.calls(self.backend.holder(ref))
            if holder is not None and holder.token == record.get("token"):
                return record
            await self._settle_orphans(ref)
            return await self._record(principal, run_id)
        except BackendUnavailable as exc:
            raise CoordinatorUnavailable(str(exc)) from exc

    async def _record(self, principal: str, run_id: str) -> dict[str, Any] | None:
        record = await self.calls(self.backend.run_record(run_id))
        return record if record is not None and record.get("principal") == principal else None

    async def session_runs(
        self, principal: str, session_id: str, limit: int
    ) -> list[dict[str, Any]]:
        ref = SessionRef(principal=principal, session_id=session_id)
        try:
            return await self.calls(self.backend.session_runs(ref, limit))
        except BackendUnavailable as exc:
            raise CoordinatorUnavailable(str(exc)) from exc

    async def read_events(self, run_id: str, after: int, *, block: float) -> list[dict[str, Any]]:
        """One bounded read of a run's events after ``after`` (maybe none)."""
        try:
            return await self.calls(
                self.backend.run_events(run_id, after, block=block), block=block
            )
        except BackendUnavailable as exc:
            raise CoordinatorUnavailable(str(exc)) from exc

    async def stop_run(self, principal: str, run_id: str) -> dict[str, Any] | None:
        """Stop a run that lives on another node (reason ``client_stop``)
        and answer its record once ended; None: no such run for this
        principal. A dead owner is waited out (its lease expires), then the
        orphan is ended ``owner_lost``."""
        try:
            record = await self._record(principal, run_id)
            if record is None or record.get("status") != "running":
                return record
            ref = SessionRef(principal=principal, session_id=record["session_id"])
            reply_to = f"{self.node}:{uuid.uuid4().hex}"
            intent = Intent(
                kind=IntentKind.STOP,
                session=ref,
                from_node=self.node,
                reply_to=reply_to,
                run_id=run_id,
            )
            await self.calls(self.backend.send_intent(str(record["node"]), intent))
            self.metrics.cancels_sent += 1
            token = int(record["token"])
            while True:
                holder = await self.calls(self.backend.holder(ref))
                if holder is None or holder.token != token:
                    await self._settle_orphans(ref)
                    break
                block = min(REPLY_SLICE, max(holder.expires_in, 0.0))
                reply = await self.calls(
                    self.backend.wait_reply(reply_to, block=block), block=block
                )
                if reply is not None:
                    break
            return await self._record(principal, run_id)
        except BackendUnavailable as exc:
            raise CoordinatorUnavailable(str(exc)) from exc

    async def _settle_orphans(self, ref: SessionRef) -> None:
        """End the session's orphans if nobody holds it (whoever does ended
        them when it took the lease). A read takes no lease: each orphan is
        ended in one step that checks nobody holds the session (a prompt
        elsewhere meanwhile is neither delayed nor refused)."""
        for record in await self.calls(self.backend.session_runs(ref, ORPHAN_SCAN)):
            if record.get("status") != "running":
                continue
            terminal, ended = orphan_ending(record)
            run_id = record["run_id"]
            if await self.calls(self.backend.end_orphan_unleased(ref, run_id, terminal, ended)):
                self.metrics.orphans_ended += 1
                logger.info(
                    "orphan_ended trace=%s owner=%s reason=owner_lost",
                    run_id,
                    record.get("node"),
                )
