"""Property-based: random interleavings of what clients and agents do to a
few sessions, run under MockClock, with the design's invariants checked
after every step.

Hypothesis generates the program (a list of operations); each example runs
it against a fresh engine in its own trio run. Operations: submit (with any
on_conflict), stop, disconnect, reattach from a random seq, let time pass
(agents finish), an agent that fails, and a shutdown (drain) after which
nothing more is admitted.
"""

from __future__ import annotations

from typing import Any

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.core import (
    AgentError,
    AgentRequest,
    CancelReason,
    Draining,
    EngineConfig,
    OnConflict,
    QueueFull,
    RunInProgress,
    RunStatus,
    SessionManager,
)
from server.core.events import AgentOutput, TextDelta, status_of
from server.core.result import RunResult
from server.core.run import Run
from tests.helpers import assert_well_formed

SESSIONS = ["s0", "s1", "s2"]


class PromptAgent:
    """``ok N GAP``: N tokens GAP seconds apart; ``fail N GAP``: then an error.
    Gaps shorter than the coalescing window make deltas merge."""

    name = "prompted"

    async def run(
        self, request: AgentRequest, send_channel: trio.MemorySendChannel[AgentOutput]
    ) -> None:
        kind, count, gap = request.prompt.split()
        for index in range(int(count)):
            await trio.sleep(float(gap))
            await send_channel.send(TextDelta(f"t{index} "))
        if kind == "fail":
            raise AgentError("upstream_error", "The model server reported an error.")


class MemoryStore:
    """The observer as a store: one row per run, the terminal status once."""

    def __init__(self) -> None:
        self.rows: dict[str, str] = {}
        self.writes: dict[str, int] = {}

    async def run_started(self, run: Run) -> None:
        await trio.sleep(0.01)  # a store takes time
        self.rows.setdefault(run.run_id, RunStatus.RUNNING.value)

    async def run_ended(self, run: Run, result: RunResult) -> None:
        await trio.sleep(0.01)
        self.rows[run.run_id] = result.status.value
        self.writes[run.run_id] = self.writes.get(run.run_id, 0) + 1

    async def run_discarded(self, run: Run) -> None:
        self.rows.pop(run.run_id, None)


operation = st.one_of(
    st.tuples(
        st.just("submit"),
        st.sampled_from(SESSIONS),
        st.sampled_from(["ok", "fail"]),
        st.integers(0, 6),
        st.sampled_from([0.005, 0.3]),
        st.sampled_from(list(OnConflict)),
    ),
    st.tuples(st.just("stop"), st.sampled_from(SESSIONS)),
    st.tuples(st.just("disconnect"), st.sampled_from(SESSIONS)),
    st.tuples(st.just("reattach"), st.sampled_from(SESSIONS), st.integers(-1, 10)),
    st.tuples(st.just("wait"), st.sampled_from([0.0, 0.1, 0.5, 2.0])),
    st.tuples(st.just("shutdown")),
)


def check_invariants(manager: SessionManager, store: MemoryStore, runs: list[Run]) -> None:
    by_session: dict[str, int] = {}
    for run in runs:
        if run.alive:
            by_session[run.session_id] = by_session.get(run.session_id, 0) + 1
        events = run.log.events
        assert [event.seq for event in events] == list(range(len(events)))
        if run.ended:
            assert_well_formed(events)
            # Everything the run took in went out, before the terminal event.
            published = "".join(event.text for event in events if event.type == "run.delta")  # type: ignore[union-attr]
            assert published == run.text
            terminal = run.terminal
            assert terminal is not None
            if run.run_id in store.rows:  # rolled-back runs are gone from the store
                assert store.rows[run.run_id] == status_of(terminal).value
                assert store.writes[run.run_id] == 1
        else:
            assert not any(event.terminal for event in events)
    # Invariant 1: never two runs alive in one session.
    assert all(count <= 1 for count in by_session.values()), by_session


async def play(program: list[tuple[Any, ...]]) -> None:
    store = MemoryStore()
    manager = SessionManager(
        agent=PromptAgent(),
        config=EngineConfig(cleanup_budget=1.0, coalesce_window=0.02, max_queued=3),
        observer=store,
    )
    runs: list[Run] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.serve)

        async def submit(
            session: str, kind: str, count: int, gap: float, on_conflict: OnConflict
        ) -> None:
            try:
                run = await manager.submit(
                    "key-a",
                    session,
                    AgentRequest(prompt=f"{kind} {count} {gap}"),
                    on_conflict=on_conflict,
                )
            except (RunInProgress, QueueFull, Draining):
                return
            runs.append(run)

        for step in program:
            match step:
                case ("submit", session, kind, count, gap, on_conflict):
                    nursery.start_soon(submit, session, kind, count, gap, on_conflict)
                case ("stop" | "disconnect" as action, session):
                    current = manager.find_session("key-a", session)
                    if current is not None and current.current is not None:
                        reason = (
                            CancelReason.CLIENT_STOP
                            if action == "stop"
                            else CancelReason.CLIENT_DISCONNECT
                        )
                        current.current.cancel(reason)
                case ("reattach", session, after):
                    mine = [run for run in runs if run.session_id == session]
                    if mine:
                        run = mine[-1]
                        with run.subscribe(after=after) as subscription:
                            assert subscription.take() == list(run.log.events[after + 1 :])
                case ("wait", seconds):
                    await trio.sleep(seconds)
                case ("shutdown",):
                    await manager.drain(grace_period=0.5)
            await trio.testing.wait_all_tasks_blocked()
            check_invariants(manager, store, runs)
        await manager.drain(grace_period=5)
        await trio.testing.wait_all_tasks_blocked()
        check_invariants(manager, store, runs)
        assert all(run.ended for run in runs)
        await manager.aclose()


# derandomize: the same programs every run, so the suite stays deterministic.
@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(st.lists(operation, max_size=30))
def test_invariants_hold_under_random_interleavings(program: list[tuple[Any, ...]]) -> None:
    trio.run(play, program, clock=trio.testing.MockClock(autojump_threshold=0))
