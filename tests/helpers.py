"""Agents and probes shared by the unit tests."""

from __future__ import annotations

import attrs
import trio

from server.core.agent import AgentError, AgentRequest
from server.core.events import AgentOutput, RunEvent, TextDelta


def live_task_count() -> int:
    """Every task in this trio run's task tree."""

    def walk(task: trio.lowlevel.Task) -> int:
        return 1 + sum(
            walk(child) for nursery in task.child_nurseries for child in nursery.child_tasks
        )

    return walk(trio.lowlevel.current_root_task())


def assert_well_formed(events: tuple[RunEvent, ...] | list[RunEvent]) -> None:
    """Invariant 3: seq 0,1,2,... without gaps, run.started first, exactly one
    terminal event and it is last; a run.message only right before
    run.completed."""
    assert [event.seq for event in events] == list(range(len(events)))
    assert events[0].type == "run.started"
    assert [event.terminal for event in events].count(True) == 1
    assert events[-1].terminal
    for index, event in enumerate(events):
        if event.type == "run.message":
            assert index == len(events) - 2 and events[-1].type == "run.completed"


@attrs.define
class AliveProbe:
    """Counts agent calls alive at once (from their first step to the end of
    their cleanup), per session."""

    alive: dict[str, int] = attrs.field(factory=dict)
    most_alive: int = 0

    def enter(self, session: str) -> None:
        self.alive[session] = self.alive.get(session, 0) + 1
        self.most_alive = max(self.most_alive, self.alive[session])

    def leave(self, session: str) -> None:
        self.alive[session] -= 1


@attrs.define
class SlowCleanupAgent:
    """Streams ``words`` tokens ``delay`` apart; when cancelled it takes
    ``cleanup`` seconds (shielded, bounded) to let go, like an upstream
    connection being closed. Records when each run's cleanup finished."""

    probe: AliveProbe
    delay: float = 1.0
    words: int = 10
    cleanup: float = 3.0
    cleaned_up_at: dict[str, float] = attrs.field(factory=dict)
    name: str = "slow-cleanup"

    async def run(
        self, request: AgentRequest, send_channel: trio.MemorySendChannel[AgentOutput]
    ) -> None:
        session = request.model or "?"
        self.probe.enter(session)
        try:
            for index in range(self.words):
                await trio.sleep(self.delay)
                await send_channel.send(TextDelta(f"{request.prompt}-{index} "))
        finally:
            with trio.move_on_after(self.cleanup, shield=True):
                await trio.sleep(self.cleanup)
            self.cleaned_up_at[request.prompt] = trio.current_time()
            self.probe.leave(session)


@attrs.define
class FailingAgent:
    """Sends ``after`` tokens, then raises ``error`` if the prompt starts with
    "fail"; otherwise completes."""

    after: int = 2
    error: Exception = attrs.field(factory=lambda: RuntimeError("secret internal detail"))
    name: str = "failing"

    async def run(
        self, request: AgentRequest, send_channel: trio.MemorySendChannel[AgentOutput]
    ) -> None:
        for index in range(self.after):
            await trio.sleep(0.1)
            await send_channel.send(TextDelta(f"t{index} "))
        if request.prompt.startswith("fail"):
            raise self.error


__all__ = [
    "AgentError",
    "AliveProbe",
    "FailingAgent",
    "SlowCleanupAgent",
    "assert_well_formed",
    "live_task_count",
]
