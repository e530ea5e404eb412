"""The owner side of a node: the sessions it holds, what keeps their
leases alive and what copies their runs to the shared state (what it does
when another node asks for one of them: :mod:`server.cluster.intents`).

Resource handling: :meth:`Owner.serve` runs the node's long-lived tasks
(the intents reader, the renewer, the lease deadline watcher) and one task
per intent, in its own nursery (inside the session manager's); a run's mirror lives in its
session's nursery. On the way out every lease still held is released,
shielded and bounded, once its runs' terminal events are published.

Losing a lease (a renewal or a publish refused, or no renewal that worked
for a whole TTL): the session's runs are cancelled with reason
``owner_lost`` (status interrupted, recorded locally), the session is
dropped here, and nothing more is written with that lease.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable

import attrs
import trio

from ..core.eventlog import Subscription
from ..core.events import CancelReason
from ..core.lifecycle_log import lifecycle_event
from ..core.run import Run
from ..core.session import Session
from ..wire.native import event_dict
from .backend import (
    BackendUnavailable,
    Lease,
    Published,
    SessionRef,
)
from .held import Calls, ClusterConfig, ClusterMetrics, Held, HeldState, Mirror, ref_of
from .intents import MAX_BACKOFF, MIN_BACKOFF, Intents
from .records import record_of

logger = logging.getLogger(__name__)


@attrs.define(eq=False)
class Owner:
    node: str
    calls: Calls
    config: ClusterConfig
    metrics: ClusterMetrics
    held: dict[SessionRef, Held] = attrs.field(factory=dict)
    # Sessions whose lease was lost or given up while their runs may still
    # be ending: the lease is not released from under them.
    lost: dict[SessionRef, Held] = attrs.field(factory=dict)
    # Releases on their way, by session: an acquire of the same session waits.
    releasing: dict[SessionRef, trio.Event] = attrs.field(factory=dict)
    # Sessions an acquire here is taking: a lease handed over to this node
    # is in the backend before its reply reaches the acquire (and before it
    # is held), so it is no stray lease to release meanwhile.
    acquiring: Counter[SessionRef] = attrs.field(factory=Counter)
    _nursery: trio.Nursery | None = attrs.field(default=None, init=False)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(Intents(self).read_forever, nursery)
                nursery.start_soon(self._renew_forever)
                nursery.start_soon(self._watch_deadlines)
                task_status.started()
        finally:
            self._nursery = None
            # The mirrors' bound, then the releases' (one call).
            bound = self.config.stop_budget + self.config.call_timeout
            with trio.move_on_after(bound, shield=True):
                await self._release_all()

    # --- holding ---------------------------------------------------------------

    def hold(self, session: Session, lease: Lease, since: float) -> Held:
        """``session`` owns ``lease``, whose ttl started no earlier than
        ``since`` (trio clock from before the call that gave it)."""
        held = Held(session=session, lease=lease, renewed_at=since)
        self.held[lease.session] = held
        return held

    def holds(self, ref: SessionRef, token: int) -> bool:
        """A session here holds (or is handing over) ``ref`` with ``token``."""
        held = self.held.get(ref)
        return held is not None and held.lease.token == token

    def release(self, session: Session) -> None:
        """The session was dropped: give its lease back (in the background)."""
        ref = ref_of(session.key)
        held = self.held.get(ref)
        if held is None or held.session is not session:
            return
        if self._nursery is None:
            return  # the node is stopping: _release_all gives it back
        del self.held[ref]
        if held.state is not HeldState.HELD:
            return  # handed over or lost: not ours to release
        held.state = HeldState.GONE
        done = trio.Event()
        self.releasing[ref] = done
        self._nursery.start_soon(self._release, held, done)

    async def _release(self, held: Held, done: trio.Event) -> None:
        try:
            with trio.move_on_after(self.config.call_timeout, shield=True):
                await self.calls(self.calls.backend.release(held.lease))
        except BackendUnavailable:
            pass  # it expires by itself
        finally:
            done.set()
            if self.releasing.get(held.lease.session) is done:
                del self.releasing[held.lease.session]

    async def _release_all(self) -> None:
        """Once every run's end is published (each mirror bounds its own
        wait by ``stop_budget``), release every lease still held, at once."""
        helds = list(self.held.values())
        self.held.clear()
        with trio.move_on_after(self.config.stop_budget):
            for held in helds:
                for mirror in list(held.mirrors.values()):
                    await mirror.done.wait()
        async with trio.open_nursery() as nursery:
            for held in helds:
                if held.state is HeldState.HELD:
                    held.state = HeldState.GONE
                    nursery.start_soon(self._release_one, held)

    async def _release_one(self, held: Held) -> None:
        with contextlib.suppress(BackendUnavailable):  # it expires by itself
            await self.calls(self.calls.backend.release(held.lease))

    def lose(self, held: Held, why: str) -> bool:
        """The lease is no longer ours: stop the session's runs here.
        False if it was already gone."""
        if held.state is HeldState.GONE:
            return False
        held.state = HeldState.GONE
        ref = held.lease.session
        self.metrics.owner_lost += 1
        session = held.session
        lifecycle_event("lease_lost", session=ref.session_id, token=held.lease.token, cause=why)
        current = session.current
        if self.held.get(ref) is held:
            del self.held[ref]
            if self._nursery is not None:
                # Until its run's cleanup is over, neither this node (a local
                # prompt) nor an intent's stray-lease release lets it go.
                self.lost[ref] = held
                done = trio.Event()
                self.releasing[ref] = done
                self._nursery.start_soon(self._release_when_ended, held, current, done)
        session.moved = True
        if current is not None:
            current.cancel(CancelReason.OWNER_LOST)
        session.close()
        return True

    async def _release_when_ended(self, held: Held, run: Run | None, done: trio.Event) -> None:
        """Once the lost session's run ended (its cleanup is bounded), give
        the lease back if it is still ours (fenced: a no-op if it moved on),
        so nobody waits for it to expire."""
        ref = held.lease.session
        try:
            if run is not None:
                with trio.move_on_after(self.config.cleanup_budget + self.config.call_timeout):
                    await run.wait_ended()
            with contextlib.suppress(BackendUnavailable):  # it expires by itself
                await self.calls(self.calls.backend.release(held.lease))
        finally:
            if self.lost.get(ref) is held:
                del self.lost[ref]
            done.set()
            if self.releasing.get(ref) is done:
                del self.releasing[ref]

    # --- renewal ----------------------------------------------------------------

    async def _forever(self, what: str, step: Callable[[], Awaitable[None]]) -> None:
        """``step`` again and again. Error handling: an unexpected error (a
        bug) is logged and the loop goes on after a pause (bounded,
        doubling): one bad turn never ends the node."""
        backoff = MIN_BACKOFF
        while True:
            try:
                await step()
            except Exception:
                logger.exception("%s failed; going on", what)
                await trio.sleep(backoff)
                backoff = min(MAX_BACKOFF, backoff * 2)
            else:
                backoff = MIN_BACKOFF

    async def _renew_forever(self) -> None:
        await self._forever("renewing leases", self._renew_all)

    async def _renew_all(self) -> None:
        await trio.sleep(self.config.renew_every)
        async with trio.open_nursery() as nursery:
            for held in list(self.held.values()):
                nursery.start_soon(self._renew, held)

    async def _watch_deadlines(self) -> None:
        """A lease not renewed for ``give_up_after`` is given up at that very
        moment (not at the next try): its runs are cancelled then, so their
        cleanup and the publish of their end are over before the lease can
        expire in the shared state (whose ttl started after ``renewed_at``)
        and another node start a run of the session."""
        await self._forever("watching lease deadlines", self._give_up_late_leases)

    async def _give_up_late_leases(self) -> None:
        after = self.config.give_up_after
        now = trio.current_time()
        for held in list(self.held.values()):
            if now >= held.renewed_at + after:
                self.lose(held, "not renewed in time")
        # A lease taken later has a later deadline than any held now.
        deadlines = [held.renewed_at + after for held in self.held.values()]
        await trio.sleep_until(min(deadlines, default=now + after))

    async def _renew(self, held: Held) -> None:
        if held.state is HeldState.GONE:
            return
        session = held.session
        current = session.current
        run_id = current.run_id if current is not None and not current.ended else None
        asked_at = trio.current_time()
        try:
            renewed = await self.calls(
                self.calls.backend.renew(
                    held.lease, self.config.lease_ttl, busy=session.busy, run_id=run_id
                )
            )
        except BackendUnavailable:
            return  # tried again soon; _watch_deadlines gives up in time
        except Exception:
            # A bug: logged; the other sessions' renewals go on.
            logger.exception("renewing the lease of %s failed", held.lease.session)
            return
        if renewed:
            held.renewed_at = asked_at
        elif self.lose(held, "renewal refused"):
            self.metrics.fenced_writes_refused += 1

    async def forget(self, run: Run) -> None:
        """Delete a rolled-back run's record and events in the shared state,
        once its mirror is done (else the mirror could write them again).
        Fenced: a lease lost meanwhile refuses it (lost here too); with the
        backend away the record stays until its retention ends (logged)."""
        held = self.held.get(SessionRef(principal=run.principal, session_id=run.session_id))
        if held is None or held.state is HeldState.GONE:
            return
        mirror = held.mirrors.get(run.run_id)
        budget = self.config.lease_ttl + self.config.call_timeout
        with trio.move_on_after(budget):
            if mirror is not None:
                await mirror.done.wait()
            try:
                forgotten = await self.calls(self.calls.backend.forget_run(held.lease, run.run_id))
            except BackendUnavailable:
                pass
            else:
                if not forgotten and self.lose(held, "forget refused"):
                    self.metrics.fenced_writes_refused += 1
                return
        logger.warning("rollback: run %s may still be in the shared state", run.run_id)

    # --- the run mirror -----------------------------------------------------------

    def run_started(self, session: Session, run: Run) -> None:
        """Start copying ``run``'s events to the backend (in its session's nursery)."""
        held = self.held.get(ref_of(session.key))
        if held is None or held.session is not session or held.state is HeldState.GONE:
            run.cancel(CancelReason.OWNER_LOST)  # lost while it was being started
            return
        mirror = Mirror(run)
        held.mirrors[run.run_id] = mirror
        # Not one of the run's readers (their limit is the clients'); the
        # session is kept busy from now, so it is not idle (nor its lease
        # released) before the terminal event is out.
        subscription = run.subscribe(counted=False)
        session.mirror_started()
        session.nursery.start_soon(self._mirror, held, mirror, subscription)

    async def wait_mirrored(self, run: Run) -> None:
        """Until ``run``'s first publish went through (or its mirror ended)."""
        held = self.held.get(SessionRef(principal=run.principal, session_id=run.session_id))
        mirror = None if held is None else held.mirrors.get(run.run_id)
        if mirror is not None:
            await mirror.first_published.wait()

    async def _mirror(self, held: Held, mirror: Mirror, subscription: Subscription) -> None:
        run = mirror.run
        pending: list[dict[str, object]] = []
        first = True
        try:
            with subscription:
                while held.state is not HeldState.GONE:
                    await subscription.wait()
                    pending += [event_dict(event) for event in subscription.take()]
                    if not pending:
                        mirror.terminal_published = subscription.finished
                        if mirror.terminal_published:
                            return
                        continue
                    final = subscription.finished
                    if not await self._publish(held, run, pending, with_record=first or final):
                        return
                    first, pending = False, []
                    mirror.first_published.set()
                    if subscription.finished:
                        mirror.terminal_published = True
                        return
        finally:
            try:
                if not mirror.terminal_published and held.state is not HeldState.GONE:
                    # Cancelled (the node is stopping): the run ends within its
                    # cleanup budget; publish how, once, bounded.
                    with trio.move_on_after(self.config.stop_budget, shield=True):
                        await run.wait_ended()
                        pending += [event_dict(event) for event in subscription.take()]
                        if pending:
                            await self._publish_once(held, run, pending)
            finally:
                held.session.mirror_ended()
                held.mirrors.pop(run.run_id, None)
                mirror.first_published.set()  # nothing more to wait for
                mirror.done.set()

    async def _publish(
        self, held: Held, run: Run, events: list[dict[str, object]], *, with_record: bool
    ) -> bool:
        """Publish ``events`` (retrying while the backend is away and the
        lease still ours); False once the lease is lost, or if the run's end
        is already in the shared state (nothing more can be written for it;
        the lease is not in doubt)."""
        backoff = MIN_BACKOFF
        while held.state is not HeldState.GONE:
            try:
                published = await self._publish_call(held, run, events, with_record=with_record)
            except BackendUnavailable:
                await trio.sleep(backoff)
                backoff = min(MAX_BACKOFF, backoff * 2)
                continue
            if published is Published.LEASE_LOST:
                if self.lose(held, "publish refused"):
                    self.metrics.fenced_writes_refused += 1
                return False
            if published is Published.ENDED:
                logger.warning("run %s already ended in the shared state", run.run_id)
                return False
            return True
        return False

    async def _publish_once(self, held: Held, run: Run, events: list[dict[str, object]]) -> None:
        try:
            published = await self._publish_call(held, run, events, with_record=True)
        except BackendUnavailable:
            return
        if published is Published.LEASE_LOST:
            self.metrics.fenced_writes_refused += 1

    async def _publish_call(
        self, held: Held, run: Run, events: list[dict[str, object]], *, with_record: bool
    ) -> Published:
        """One bounded publish of ``events`` (and the run's record as it
        stands now, if asked) under ``held``'s lease."""
        record = record_of(run, node=self.node, token=held.lease.token) if with_record else None
        return await self.calls(
            self.calls.backend.publish(
                held.lease,
                run.run_id,
                events,
                record=record,
                max_events=self.config.max_run_events,
                retain_seconds=self.config.retain_seconds,
            )
        )
