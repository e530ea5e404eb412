"""The run lifecycle as an explicit state machine (in the manner of h11's
``_state.py``).

Rule 1: a run moves PENDING → RUNNING → CLEANING → ENDED and never back.
Rule 2: a run that is cancelled before it ever ran still passes through
        RUNNING: it publishes ``run.started`` and then its terminal event, so
        every run has the same event shape.
Rule 3: ENDED is final; the terminal event is published exactly once, on
        the CLEANING → ENDED transition.

Any other transition is a bug and raises :class:`LifecycleError`.
"""

from __future__ import annotations

import enum

import attrs


class RunState(enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    CLEANING = "cleaning"
    ENDED = "ended"


_ALLOWED: dict[RunState, frozenset[RunState]] = {
    RunState.PENDING: frozenset({RunState.RUNNING}),
    RunState.RUNNING: frozenset({RunState.CLEANING}),
    RunState.CLEANING: frozenset({RunState.ENDED}),
    RunState.ENDED: frozenset(),
}


class LifecycleError(RuntimeError):
    """An illegal lifecycle transition: a bug in the engine, never client input."""


@attrs.define
class Lifecycle:
    state: RunState = RunState.PENDING

    def advance(self, new: RunState) -> None:
        if new not in _ALLOWED[self.state]:
            raise LifecycleError(f"illegal run transition {self.state.value} -> {new.value}")
        self.state = new

    @property
    def alive(self) -> bool:
        """Producing or cleaning up: what invariant 1 counts."""
        return self.state in (RunState.RUNNING, RunState.CLEANING)
