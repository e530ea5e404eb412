"""Where cross-process coordination plugs in: who owns a session.

A session may only be owned by one process at a time. Within one process
the session table already guarantees that, so :class:`InProcessCoordinator`
just keeps the books and refuses a double acquire (a bug): no task, no call
per run. The cluster coordinator (:mod:`server.cluster.coordinator`) owns a
session through a fenced lease in the shared state, asks the owner on
another node to hand it over, mirrors each run's events there and stops a
session's runs (reason ``owner_lost``) when its lease is lost.

The manager calls, in order:

* :meth:`Coordinator.acquire` before a new local session serves (it may
  wait for another node's run to end, or raise :class:`RunInProgress`
  (``reject``) or :class:`CoordinatorUnavailable`);
* ``run_started(session, run)`` right after each run's task started, when
  the coordinator has that hook (cluster mode only);
* (cluster mode) :meth:`Coordinator.run_recorded` once ``run.started`` is
  out, before the client learns the run's id: bounded, it waits until the
  run's record is in the shared state, so any node can answer for it;
* (cluster mode) :meth:`Coordinator.run_discarded` when a run was rolled
  back here: bounded, it forgets the run in the shared state too;
* :meth:`Coordinator.release` when the session is dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import attrs
import trio

from .run import Run
from .session import OnConflict, Session, SessionKey


class Coordinator(Protocol):
    @property
    def node(self) -> str | None:
        """This process's node id in a cluster; None: one process, no cluster."""

    @property
    def run_started(self) -> Callable[[Session, Run], None] | None:
        """Called right after a run's task started (cluster mode), else None."""

    async def acquire(self, session: Session, on_conflict: OnConflict) -> None:
        """Become the owner of ``session``'s key; wait while another owns it."""

    def release(self, session: Session) -> None:
        """Give up ownership (the session was dropped)."""

    async def run_recorded(self, run: Run) -> None:
        """Cluster mode: until ``run``'s start is in the shared state (bounded)."""

    async def run_discarded(self, run: Run) -> None:
        """Cluster mode: forget a rolled-back run in the shared state (bounded)."""

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The coordinator's own tasks (cluster mode), until cancelled."""


@attrs.define
class InProcessCoordinator:
    owned: set[SessionKey] = attrs.field(factory=set)
    node: str | None = None
    run_started: Callable[[Session, Run], None] | None = None

    async def acquire(self, session: Session, on_conflict: OnConflict) -> None:
        if session.key in self.owned:
            raise RuntimeError(f"session {session.key} acquired twice in one process")
        self.owned.add(session.key)

    def release(self, session: Session) -> None:
        self.owned.discard(session.key)

    async def run_recorded(self, run: Run) -> None:
        return None  # never asked: there is no shared state

    async def run_discarded(self, run: Run) -> None:
        return None  # the store and the registry are all there is

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
