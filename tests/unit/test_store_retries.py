"""When the observer retries the writes the store refused (issue 11,
finding 6), under a fake clock and a fake store that refuses on demand."""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable
from contextlib import suppress

import attrs
import pytest
import trio
import trio.testing

from server.core.events import RunStatus
from server.core.result import RunResult
from server.store import RunRecord, StoreObserver, StoreWriteError
from server.store import observer as observer_module
from server.store.observer import RETRY_MAX_INTERVAL, RETRY_MIN_INTERVAL


@attrs.define
class RefusingStore:
    """The store calls the observer makes; refuses (as a full disk does)
    while ``refusing``."""

    refusing: bool = False
    # Runs whose terminal write fails for good (no row to finish, say).
    broken: set[str] = attrs.field(factory=set)
    rows: dict[str, str] = attrs.field(factory=dict)
    # (operation, trio time) of every call.
    calls: list[tuple[str, float]] = attrs.field(factory=list)
    # Set when a terminal status lands.
    finished: trio.Event = attrs.field(factory=trio.Event)
    before_close: list[Callable[[], Awaitable[None]]] = attrs.field(factory=list)
    unrecovered: int = 0

    def clock(self) -> float:
        return 1_700_000_000.0

    async def _call(self, operation: str) -> None:
        await trio.lowlevel.checkpoint()
        self.calls.append((operation, trio.current_time()))
        if self.refusing:
            raise StoreWriteError(operation, transient=True)

    async def insert_started(self, record: RunRecord, *, if_absent: bool = False) -> None:
        await self._call("insert_started")
        self.rows.setdefault(record.run_id, "running")

    async def finish(self, result: RunResult) -> None:
        await self._call("finish")
        if result.run_id in self.broken:
            raise StoreWriteError("finish")
        self.rows[result.run_id] = result.status.value
        self.finished.set()


@attrs.frozen
class Named:
    name: str = "agent"
    prompt: str = "a prompt"


def completed(run_id: str) -> RunResult:
    return RunResult(
        run_id=run_id,
        principal="alice",
        session_id="s1",
        agent="agent",
        status=RunStatus.COMPLETED,
        text="an answer",
        created_at=1_700_000_000.0,
        finished_at=1_700_000_001.0,
    )


@attrs.frozen
class EndedRun:
    """What the observer reads of a run."""

    run_id: str
    request: Named = Named()

    @property
    def result(self) -> RunResult:
        return attrs.evolve(completed(self.run_id), status=RunStatus.RUNNING, finished_at=None)


async def end(observer: StoreObserver, run_id: str) -> None:
    """A run ends; a refused terminal write is the run's error, not the test's."""
    with suppress(StoreWriteError):
        await observer.run_ended(EndedRun(run_id), completed(run_id))  # type: ignore[arg-type]


def retry_times(store: RefusingStore) -> list[float]:
    return [when for operation, when in store.calls if operation == "finish"]


async def test_refused_writes_are_retried_with_backoff_and_never_given_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = RefusingStore(refusing=True)
    observer = StoreObserver(store)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(observer.serve)
        await end(observer, "r1")
        await trio.sleep(40)  # refused all along
        assert observer.unfinished == 1
        times = retry_times(store)
        gaps = [round(later - earlier, 6) for earlier, later in itertools.pairwise(times)]
        # The run's own try, then retries backing off, capped.
        assert gaps[:6] == [RETRY_MIN_INTERVAL, 1.0, 2.0, 4.0, 8.0, RETRY_MAX_INTERVAL]
        assert len(times) > observer_module.TERMINAL_WRITE_ATTEMPTS  # and still kept

        freed_at = trio.current_time()
        store.refusing = False  # the disk has room again; no other run ends
        await store.finished.wait()
        assert trio.current_time() - freed_at <= RETRY_MAX_INTERVAL
        assert observer.unfinished == 0
        assert store.rows == {"r1": "completed"}
        nursery.cancel_scope.cancel()


async def test_a_run_end_the_store_takes_lands_the_pending_ones_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = RefusingStore(refusing=True)
    observer = StoreObserver(store)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(observer.serve)
        await end(observer, "r1")
        await end(observer, "r2")
        await trio.sleep(20)  # the retry interval is at its cap
        store.refusing = False
        ended_at = trio.current_time()
        await end(observer, "r3")
        await trio.testing.wait_all_tasks_blocked()
        assert observer.unfinished == 0
        assert trio.current_time() == ended_at
        assert store.rows == dict.fromkeys(("r1", "r2", "r3"), "completed")
        nursery.cancel_scope.cancel()


async def test_a_live_runs_refused_start_is_inserted_before_it_ends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = RefusingStore(refusing=True)
    observer = StoreObserver(store)  # type: ignore[arg-type]
    run = EndedRun("live")
    async with trio.open_nursery() as nursery:
        await nursery.start(observer.serve)
        with pytest.raises(StoreWriteError):
            await observer.run_started(run)  # type: ignore[arg-type]
        store.refusing = False
        await trio.sleep(RETRY_MAX_INTERVAL)
        assert store.rows == {"live": "running"}
        nursery.cancel_scope.cancel()


async def test_pending_writes_are_bounded_oldest_given_up_first(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(observer_module, "MAX_PENDING_WRITES", 3)
    store = RefusingStore(refusing=True)
    observer = StoreObserver(store)  # type: ignore[arg-type]
    for index in range(5):
        await end(observer, f"r{index}")
    assert observer.unfinished == 3
    store.refusing = False
    await observer.flush()
    assert store.rows == dict.fromkeys(("r2", "r3", "r4"), "completed")


async def test_a_write_that_fails_for_good_holds_up_no_other_and_is_given_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = RefusingStore(refusing=True, broken={"broken"})
    observer = StoreObserver(store)  # type: ignore[arg-type]
    await end(observer, "broken")  # oldest: tried first every time
    await end(observer, "r2")
    store.refusing = False
    await observer.flush()
    assert store.rows == {"r2": "completed"}
    assert observer.unfinished == 1
    for _ in range(observer_module.TERMINAL_WRITE_ATTEMPTS):
        await observer.flush()
    assert observer.unfinished == 0  # given up
