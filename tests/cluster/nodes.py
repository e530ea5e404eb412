"""Several nodes (session managers with a cluster coordinator each) sharing
one in-memory backend, in one trio run."""

from __future__ import annotations

from typing import Any

import attrs
import trio

from server.cluster.backend import TERMINAL_TYPES
from server.cluster.coordinator import ClusterCoordinator
from server.cluster.held import ClusterConfig
from server.cluster.memory import MemoryBackend
from server.cluster.memory_link import MemoryLink
from server.core import AgentRequest, EngineConfig, OnConflict, SessionManager
from server.core.agent import Agent
from server.core.result import RunResult
from server.core.run import Run

PRINCIPAL = "key-test"
# Longer than the cleanup budget (5 s) and two call timeouts (2 s each).
TTL = 12.0


class RecordingObserver:
    """What the node's store would have recorded."""

    def __init__(self) -> None:
        self.ended: dict[str, RunResult] = {}
        self.discarded: list[str] = []

    async def run_started(self, run: Run) -> None:
        return None

    async def run_ended(self, run: Run, result: RunResult) -> None:
        self.ended[run.run_id] = result

    async def run_discarded(self, run: Run) -> None:
        self.discarded.append(run.run_id)


@attrs.define(eq=False)
class Node:
    name: str
    manager: SessionManager
    coordinator: ClusterCoordinator
    link: MemoryLink
    observer: RecordingObserver

    async def prompt(
        self,
        prompt: str,
        session_id: str = "s1",
        on_conflict: OnConflict = OnConflict.INTERRUPT,
    ) -> Run:
        return await self.manager.submit(
            PRINCIPAL, session_id, AgentRequest(prompt=prompt), on_conflict=on_conflict
        )

    def live_runs(self) -> list[Run]:
        return [run for run in self.manager.live_runs.runs if not run.ended]


async def start_node(
    nursery: trio.Nursery,
    backend: MemoryBackend,
    name: str,
    agent: Agent,
    *,
    ttl: float = TTL,
    cleanup_budget: float = 5.0,
) -> Node:
    link = MemoryLink(backend)
    coordinator = ClusterCoordinator(
        backend=link,  # type: ignore[arg-type]
        config=ClusterConfig(lease_ttl=ttl, cleanup_budget=cleanup_budget),
        node=name,
    )
    observer = RecordingObserver()
    manager = SessionManager(
        agent=agent,
        config=EngineConfig(cleanup_budget=cleanup_budget, coalesce_window=0),
        observer=observer,
        coordinator=coordinator,
    )
    await nursery.start(manager.serve)
    return Node(name, manager, coordinator, link, observer)


def terminals(backend: MemoryBackend, run_id: str) -> list[dict[str, Any]]:
    return [event for event in backend.stream(run_id) if event["type"] in TERMINAL_TYPES]


def journal_index(backend: MemoryBackend, run_id: str, event_type: str) -> int:
    for index, (_, rid, kind) in enumerate(backend.journal):
        if rid == run_id and kind == event_type:
            return index
    raise AssertionError(f"{event_type} of {run_id} never published")
