"""What a node does when another node asks for one of its sessions (or
for a stop): the owner's side of the acknowledged handover.

SUPERSEDE/ROLLBACK: the session's current run is cancelled (superseded)
and its cleanup awaited; ENQUEUE: the run ends by itself. Either way the
intent first takes a place in the session's line (local prompts admitted
before it are served first), waits until the run's terminal event is in the
shared state, then hands the lease over in one step and replies DONE with
the new token; the local session admits nothing more and its waiting
prompts ask again. STOP: the run is cancelled (client_stop) and its record
sent back once its end is published; the lease stays. A session not held
here (or held under another token) is answered NOT_OWNER.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from typing import Protocol

import attrs
import trio

from ..core.events import CancelReason
from ..core.lifecycle_log import lifecycle_event
from ..core.run import Run
from ..core.session import SessionClosed
from .backend import BackendUnavailable, Intent, IntentKind, Lease, Reply, ReplyStatus, SessionRef
from .held import Calls, ClusterConfig, ClusterMetrics, Held, HeldState
from .records import record_of

logger = logging.getLogger(__name__)

# Shortest and longest pause between retries of a call that failed.
MIN_BACKOFF = 0.05
MAX_BACKOFF = 1.0
# A blocking read of the inbox waits this long per call.
INBOX_BLOCK = 1.0


class OwnerView(Protocol):
    """What answering intents needs of the node's owner side
    (:class:`~server.cluster.owner.Owner`), so this module does not import it."""

    node: str
    calls: Calls
    config: ClusterConfig
    metrics: ClusterMetrics
    # Sessions held here, and those whose lease was lost while their runs end.
    held: dict[SessionRef, Held]
    lost: dict[SessionRef, Held]
    # Sessions an acquire here is taking (a handover may be on its way).
    acquiring: Counter[SessionRef]

    def holds(self, ref: SessionRef, token: int) -> bool: ...


@attrs.define(eq=False)
class Intents:
    owner: OwnerView

    async def read_forever(self, nursery: trio.Nursery) -> None:
        """Read the node's inbox (durable: nothing sent while this node was
        busy or cut off is missed) and answer each intent in a task of its
        own in ``nursery``: a slow cleanup holds up no other session."""
        after = "0"
        backoff = MIN_BACKOFF
        while True:
            try:
                batch = await self.owner.calls(
                    self.owner.calls.backend.read_intents(
                        self.owner.node, after, block=INBOX_BLOCK
                    ),
                    block=INBOX_BLOCK,
                )
            except Exception as exc:
                # Redis away, or a bug: this node must go on reading either way.
                if not isinstance(exc, BackendUnavailable):
                    logger.exception("reading the inbox failed; trying again")
                await trio.sleep(backoff)
                backoff = min(MAX_BACKOFF, backoff * 2)
                continue
            backoff = MIN_BACKOFF
            for position, intent in batch:
                after = position
                if intent is not None:  # a malformed entry is skipped (logged)
                    nursery.start_soon(self._answer, intent)

    async def _answer(self, intent: Intent) -> None:
        """Answer one intent. Error handling: a failure here is logged and
        answered NOT_OWNER (the asker asks again); it ends no other task."""
        try:
            if intent.kind is IntentKind.STOP:
                reply = await self._stop_here(intent)
            else:
                reply = await self._hand_over_here(intent)
        except Exception:
            logger.exception("intent %s for %s failed", intent.kind.value, intent.session)
            reply = Reply(status=ReplyStatus.NOT_OWNER)
        self.owner.metrics.cancels_handled += 1
        try:
            await self.owner.calls(self.owner.calls.backend.reply(intent.reply_to, reply))
        except BackendUnavailable:
            # The asker sees the lease move (or expire) and asks again.
            logger.warning("intent %s: the reply could not be written", intent.kind.value)

    async def _hand_over_here(self, intent: Intent) -> Reply:
        not_owner = Reply(status=ReplyStatus.NOT_OWNER)
        held = self.owner.held.get(intent.session)
        if held is None or held.state is not HeldState.HELD:
            await self._give_up_stray(intent)
            return not_owner
        session = held.session
        try:
            # A place in the session's line: local prompts admitted before
            # the intent are served first (enqueue keeps its order across nodes).
            ticket = session.admit()
        except SessionClosed:
            return not_owner
        try:
            await ticket.wait()
            previous = session.current
            if held.state is HeldState.HELD and previous is not None:
                await self._end_for_handover(held, previous, intent.kind)
            if held.state is not HeldState.HELD or session.closed:
                return not_owner
            if (
                intent.kind is IntentKind.ROLLBACK
                and previous is not None
                and previous.cancel_reason is CancelReason.SUPERSEDED
            ):
                await session.roll_back(previous)
            # From here the session admits nothing; its waiting prompts ask again.
            held.state = HeldState.MOVING
            session.moved = True
            session.close()
            try:
                lease = await self.owner.calls(
                    self.owner.calls.backend.hand_over(
                        held.lease, intent.from_node, self.owner.config.lease_ttl
                    )
                )
            except BackendUnavailable:
                lease = None
            held.state = HeldState.GONE
            if lease is None:
                self.owner.metrics.fenced_writes_refused += 1
                return not_owner
            self.owner.metrics.handovers_given += 1
            lifecycle_event(
                "lease_handed_over",
                session=session.session_id,
                to=intent.from_node,
                token=lease.token,
            )
            return Reply(status=ReplyStatus.DONE, token=lease.token)
        finally:
            session.leave(ticket)

    async def _give_up_stray(self, intent: Intent) -> None:
        """The asker saw this node hold the session with ``intent.token``,
        but no session here uses it (a release that did not get through):
        release it, fenced by that token, so the asker need not wait for it
        to expire. A session whose lease was given up while its runs are
        still ending keeps it (it is released once they ended)."""
        ref = intent.session
        if (
            intent.token is None
            or self.owner.holds(ref, intent.token)
            or ref in self.owner.lost
            or ref in self.owner.acquiring  # a handover to us, not held yet
        ):
            return
        lease = Lease(session=ref, node=self.owner.node, token=intent.token)
        with contextlib.suppress(BackendUnavailable):  # it expires by itself
            await self.owner.calls(self.owner.calls.backend.release(lease))

    async def _end_for_handover(self, held: Held, run: Run, kind: IntentKind) -> None:
        if not run.ended:
            wait_started = trio.current_time()
            if kind is not IntentKind.ENQUEUE:
                run.cancel(CancelReason.SUPERSEDED)
            await run.wait_ended()
            lifecycle_event(
                "prev_stream_finished_cleanly",
                session=run.session_id,
                trace=run.run_id,
                waited_ms=round((trio.current_time() - wait_started) * 1000),
            )
        mirror = held.mirrors.get(run.run_id)
        if mirror is not None:
            await mirror.done.wait()

    async def _stop_here(self, intent: Intent) -> Reply:
        held = self.owner.held.get(intent.session)
        run = held.session.current if held is not None else None
        if held is None or run is None or run.run_id != intent.run_id:
            return Reply(status=ReplyStatus.NO_SUCH_RUN)
        stopped = run.cancel(CancelReason.CLIENT_STOP)
        await run.wait_ended()
        mirror = held.mirrors.get(run.run_id)
        if mirror is not None:
            await mirror.done.wait()
        record = record_of(run, node=self.owner.node, token=held.lease.token)
        status = ReplyStatus.DONE if stopped else ReplyStatus.NO_SUCH_RUN
        return Reply(status=status, record=record)
