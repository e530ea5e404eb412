"""The process-wide session table and the nursery that owns every session.

Resource handling: :meth:`SessionManager.serve` is started with
``nursery.start`` in the application's serving lifecycle and owns one task
per session; each session owns its runs. Nothing the manager starts outlives
``serve``.

Limits: sessions (per principal and in total) and concurrent runs (per
principal and in total) are checked and taken in the synchronous part of
:meth:`SessionManager.submit`, before its first checkpoint, so two
submissions cannot both take the last slot; a refused submission creates
nothing. A *run slot* is held by a session from the admission that made it
busy until it is quiet again (no live run, no submission on its way): a
supersede or an enqueued prompt reuses its session's slot.

Shutdown: :meth:`drain` stops admitting runs (:class:`Draining`), lets live
runs finish for up to the drain timeout, then cancels the rest with reason
``shutdown`` and waits for their bounded cleanup. :meth:`aclose` does the
same without the grace period and ends ``serve``.
"""

from __future__ import annotations

import logging
import uuid

import attrs
import trio

from .agent import Agent, AgentRequest
from .config import EngineConfig
from .coordinator import Coordinator, InProcessCoordinator
from .errors import (
    Draining,
    QueueFull,
    RunInProgress,
    SessionClosed,
    SessionMoved,
    TooManyRuns,
    TooManySessions,
)
from .events import CancelReason
from .lifecycle_log import current_node
from .registry import RunRegistry
from .run import NullObserver, Run, RunObserver
from .session import LiveRuns, OnConflict, Session, SessionKey

logger = logging.getLogger(__name__)

__all__ = ["Draining", "EngineConfig", "SessionClosed", "SessionManager"]


# Times one submission follows its session to another owner before giving up.
MAX_MOVES = 8


def ephemeral_session_id() -> str:
    return f"anon-{uuid.uuid4().hex}"


@attrs.define(eq=False)
class SessionManager:
    agent: Agent
    config: EngineConfig = attrs.field(factory=EngineConfig)
    observer: RunObserver = attrs.field(factory=NullObserver)
    coordinator: Coordinator = attrs.field(factory=InProcessCoordinator)

    live_runs: LiveRuns = attrs.field(factory=LiveRuns, init=False)
    runs: RunRegistry = attrs.field(init=False)
    _sessions: dict[SessionKey, Session] = attrs.field(factory=dict, init=False)
    _nursery: trio.Nursery | None = attrs.field(default=None, init=False)
    _closing: trio.Event = attrs.field(factory=trio.Event, init=False)
    _closed: trio.Event = attrs.field(factory=trio.Event, init=False)
    # Sessions whose ownership the coordinator granted (and must get back).
    _coordinated: set[Session] = attrs.field(factory=set, init=False)
    # Open sessions and run slots (sessions that are busy), per principal.
    _sessions_of: dict[str, int] = attrs.field(factory=dict, init=False)
    _run_slots_of: dict[str, int] = attrs.field(factory=dict, init=False)
    _run_slots: int = attrs.field(default=0, init=False)

    @runs.default
    def _make_registry(self) -> RunRegistry:
        return RunRegistry(
            keep_ended=self.config.keep_ended_runs,
            keep_seconds=self.config.keep_ended_seconds,
            keep_bytes=self.config.keep_ended_bytes,
        )

    @property
    def draining(self) -> bool:
        return self.live_runs.draining

    @property
    def sessions(self) -> dict[SessionKey, Session]:
        return dict(self._sessions)

    @property
    def busy_sessions(self) -> int:
        """Sessions holding a run slot: what ``max_runs`` counts."""
        return self._run_slots

    async def serve(
        self, *, task_status: trio.TaskStatus[SessionManager] = trio.TASK_STATUS_IGNORED
    ) -> None:
        if self.coordinator.node is not None:
            # Every task of this node (sessions, runs, intents) logs its id.
            current_node.set(self.coordinator.node)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self.coordinator.node is not None:
                    await nursery.start(self.coordinator.serve)
                task_status.started(self)
                await self._closing.wait()
                await self._stop_runs(grace=0)
                nursery.cancel_scope.cancel()
        finally:
            self._closed.set()

    # --- submitting --------------------------------------------------------

    async def submit(
        self,
        principal: str,
        session_id: str | None,
        request: AgentRequest,
        *,
        on_conflict: OnConflict = OnConflict.INTERRUPT,
    ) -> Run:
        """Start a run in ``(principal, session_id)``'s session, superseding
        its current run. ``session_id=None`` makes a session of its own,
        dropped as soon as it is idle.

        Raises :class:`Draining` while shutting down, :class:`SessionClosed`
        if the session failed to start while this submission waited,
        :class:`RunInProgress` (``reject``) and :class:`QueueFull`
        (``enqueue``) as ``on_conflict`` says, :class:`TooManySessions` and
        :class:`TooManyRuns` when a limit refuses it (nothing created).
        In cluster mode also :class:`CoordinatorUnavailable`; a submission
        whose session moved to another node meanwhile asks again."""
        # The node's id on lifecycle lines, also of the tasks (session, run)
        # this submission starts: trio copies the spawner's context.
        node = current_node.set(self.coordinator.node) if self.coordinator.node else None
        try:
            for _ in range(MAX_MOVES):
                try:
                    return await self._submit(principal, session_id, request, on_conflict)
                except SessionMoved:
                    pass  # asks again: the session lives elsewhere now
            raise SessionClosed
        finally:
            if node is not None:
                current_node.reset(node)

    async def _submit(
        self,
        principal: str,
        session_id: str | None,
        request: AgentRequest,
        on_conflict: OnConflict,
    ) -> Run:
        if self.draining:
            raise Draining
        ephemeral = session_id is None
        key = SessionKey(
            principal, session_id if session_id is not None else ephemeral_session_id()
        )
        # Find or make the session and take our place in its line in one
        # synchronous step: that fixes the order submissions are served in.
        session = self._sessions.get(key)
        created = session is None
        cluster = self.coordinator.node is not None
        # Every limit is checked before anything is created or counted.
        if session is None:
            self._check_room_for_session(principal)
        if session is None or not session.holds_run_slot:
            self._check_room_for_run(principal)
        if session is None:
            session = Session(
                key=key,
                agent=self.agent,
                config=self.config,
                # A cluster node gives a session's lease back once it is idle.
                idle_timeout=0 if ephemeral or cluster else self.config.idle_timeout,
                live_runs=self.live_runs,
                observer=self.observer,
                on_dropped=self._forget,
                on_discarded=self.runs.discard,
                forget_shared=self._forget_shared,
                on_quiet=self._release_run_slot,
            )
            self._sessions[key] = session
            self._sessions_of[principal] = self._sessions_of.get(principal, 0) + 1
        if on_conflict is OnConflict.REJECT and session.busy:
            raise RunInProgress
        if on_conflict is OnConflict.ENQUEUE and session.users >= self.config.max_queued:
            raise QueueFull
        ticket = session.admit()
        self._take_run_slot(session)
        try:
            if created:
                await self._start_session(session, on_conflict)
            try:
                run = await session.submit(request, ticket, on_conflict=on_conflict)
            except SessionClosed:
                if session.moved:
                    raise SessionMoved from None
                raise
            if self.coordinator.run_started is not None:
                self.coordinator.run_started(session, run)
            self.runs.add(principal, run)
            # Its start recorded, run.started out: only now may the client
            # learn its id. Still in line meanwhile, so the session is busy
            # and the next prompt waits its turn.
            await run.wait_started()
            if not run.log:
                # An engine failure before run.started ended the session
                # (logged there); the client may retry.
                self.runs.discard(run)
                raise SessionClosed
            if self.coordinator.node is not None:
                await self.coordinator.run_recorded(run)
        finally:
            session.leave(ticket)
        return run

    def find_session(self, principal: str, session_id: str) -> Session | None:
        return self._sessions.get(SessionKey(principal, session_id))

    async def _start_session(self, session: Session, on_conflict: OnConflict) -> None:
        assert self._nursery is not None
        try:
            await self.coordinator.acquire(session, on_conflict)
            self._coordinated.add(session)
            await self._nursery.start(session.serve)
        except BaseException:
            # Wakes anyone already waiting on it; they get SessionClosed.
            session.close()
            raise

    # --- limits ----------------------------------------------------------

    def _check_room_for_session(self, principal: str) -> None:
        if self._sessions_of.get(principal, 0) >= self.config.max_sessions_per_principal:
            raise TooManySessions(
                f"This API key has {self.config.max_sessions_per_principal} open sessions, "
                "its limit; idle sessions close after the idle timeout."
            )
        if len(self._sessions) >= self.config.max_sessions:
            raise TooManySessions("The server has as many open sessions as it accepts.")

    def _check_room_for_run(self, principal: str) -> None:
        if self._run_slots_of.get(principal, 0) >= self.config.max_runs_per_principal:
            raise TooManyRuns(
                f"This API key has {self.config.max_runs_per_principal} runs going, its limit; "
                "wait for one to end."
            )
        if self._run_slots >= self.config.max_runs:
            raise TooManyRuns("The server is running as many runs as it accepts.")

    def _take_run_slot(self, session: Session) -> None:
        if not session.holds_run_slot:
            session.holds_run_slot = True
            principal = session.key.principal
            self._run_slots_of[principal] = self._run_slots_of.get(principal, 0) + 1
            self._run_slots += 1

    def _release_run_slot(self, session: Session) -> None:
        if session.holds_run_slot:
            session.holds_run_slot = False
            principal = session.key.principal
            self._run_slots_of[principal] -= 1
            if not self._run_slots_of[principal]:
                del self._run_slots_of[principal]
            self._run_slots -= 1

    async def _forget_shared(self, run: Run) -> None:
        """A rolled-back run, in cluster mode: out of the shared state too."""
        if self.coordinator.node is not None:
            await self.coordinator.run_discarded(run)

    def _forget(self, session: Session) -> None:
        self._release_run_slot(session)
        if self._sessions.get(session.key) is session:
            del self._sessions[session.key]
            principal = session.key.principal
            self._sessions_of[principal] -= 1
            if not self._sessions_of[principal]:
                del self._sessions_of[principal]
        if session in self._coordinated:
            self._coordinated.discard(session)
            self.coordinator.release(session)

    # --- shutting down -----------------------------------------------------

    async def drain(self, grace_period: float) -> None:
        """Stop admitting runs, give live ones ``grace_period`` seconds to finish,
        cancel the rest with reason ``shutdown`` and await their cleanup."""
        await self._stop_runs(grace=grace_period)

    async def aclose(self) -> None:
        """End :meth:`serve` and wait for it: live runs are interrupted with
        reason ``shutdown``."""
        self._closing.set()
        await self._closed.wait()

    async def _stop_runs(self, *, grace: float) -> None:
        self.live_runs.draining = True
        if grace > 0:
            with trio.move_on_after(grace):
                await self.live_runs.wait_empty()
        for run in list(self.live_runs.runs):
            run.cancel(CancelReason.SHUTDOWN)
        await self.live_runs.wait_empty()
