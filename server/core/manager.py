"""The process-wide session table and the nursery that owns every session.

Resource handling: :meth:`SessionManager.serve` is started with
``nursery.start`` in the application's serving lifecycle and owns one task
per session; each session owns its runs. Nothing the manager starts outlives
``serve``.

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
from .events import CancelReason
from .registry import RunRegistry
from .run import NullObserver, Run, RunObserver
from .session import (
    Draining,
    LiveRuns,
    OnConflict,
    QueueFull,
    RunInProgress,
    Session,
    SessionClosed,
    SessionKey,
)

logger = logging.getLogger(__name__)

__all__ = ["Draining", "EngineConfig", "SessionClosed", "SessionManager"]


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

    async def serve(
        self, *, task_status: trio.TaskStatus[SessionManager] = trio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
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
        (``enqueue``) as ``on_conflict`` says."""
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
        if session is None:
            session = Session(
                key=key,
                agent=self.agent,
                config=self.config,
                idle_timeout=0 if ephemeral else self.config.idle_timeout,
                live_runs=self.live_runs,
                observer=self.observer,
                on_dropped=self._forget,
                on_discarded=self.runs.discard,
            )
            self._sessions[key] = session
        if on_conflict is OnConflict.REJECT and session.busy:
            raise RunInProgress
        if on_conflict is OnConflict.ENQUEUE and session.users >= self.config.max_queued:
            raise QueueFull
        ticket = session.admit()
        try:
            if created:
                await self._start_session(session)
            run = await session.submit(request, ticket, on_conflict=on_conflict)
        finally:
            session.leave(ticket)
        self.runs.add(principal, run)
        return run

    def find_session(self, principal: str, session_id: str) -> Session | None:
        return self._sessions.get(SessionKey(principal, session_id))

    async def _start_session(self, session: Session) -> None:
        assert self._nursery is not None
        try:
            await self.coordinator.acquire(session.key)
            self._coordinated.add(session)
            await self._nursery.start(session.serve)
        except BaseException:
            # Wakes anyone already waiting on it; they get SessionClosed.
            session.close()
            raise

    def _forget(self, session: Session) -> None:
        if self._sessions.get(session.key) is session:
            del self._sessions[session.key]
        if session in self._coordinated:
            self._coordinated.discard(session)
            self.coordinator.release(session.key)

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
