"""The observer's pending terminal writes, against a real store file whose
lock another connection holds (no server process: exact control of when the
store refuses and when it recovers)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Awaitable
from pathlib import Path

import attrs
import pytest
import trio

from server.agents.scripted import ScriptedAgent
from server.core.agent import Agent, AgentRequest
from server.core.events import AgentOutput, RunStatus, TextDelta
from server.core.result import RunResult
from server.core.run import Run
from server.store import (
    RunRecord,
    SqliteRunStore,
    StoreObserver,
    StoreWriteError,
    open_sqlite_store,
)
from server.store.observer import RETRY_MAX_INTERVAL, TERMINAL_WRITE_ATTEMPTS
from server.store.sqlite import DB_FILE


class GatedAgent:
    """Says one word, then finishes when the gate opens."""

    name = "gated"

    def __init__(self) -> None:
        self.gate = trio.Event()

    async def run(
        self, request: AgentRequest, send_channel: trio.MemorySendChannel[AgentOutput]
    ) -> None:
        await send_channel.send(TextDelta("partial"))
        await self.gate.wait()


def completed(run: Run) -> RunResult:
    """The result the engine would hand the store had ``run`` completed."""
    return attrs.evolve(run.result, status=RunStatus.COMPLETED, finished_at=time.time())


def make_run(observer: StoreObserver, agent: Agent | None = None) -> Run:
    return Run(
        session_id="s1",
        request=AgentRequest(prompt="hello there"),
        agent=agent or ScriptedAgent(token_delay=0, reply_words=3),
        observer=observer,
        principal="alice",
    )


async def start_recorded(nursery: trio.Nursery, store: SqliteRunStore, run: Run) -> None:
    """Start ``run`` and wait until its start is in the store."""
    await nursery.start(run.run)
    # The start is written by the run's task, after it reported started.
    while True:
        if await store.get(run.run_id) is not None:
            return
        await trio.sleep(0.005)


def running_record(run_id: str) -> RunRecord:
    return RunRecord(
        run_id=run_id,
        principal="alice",
        session_id="s1",
        prompt="hello there",
        agent="scripted",
        status=RunStatus.RUNNING,
        created_at=0.0,
    )


async def refused_quietly(call: Awaitable[None]) -> None:
    with pytest.raises(StoreWriteError):
        await call


def locker(tmp_path: Path) -> sqlite3.Connection:
    return sqlite3.connect(tmp_path / DB_FILE, isolation_level=None, check_same_thread=False)


async def test_a_refused_terminal_write_lands_once_the_store_takes_writes_again(
    tmp_path: Path,
) -> None:
    async with open_sqlite_store(tmp_path, busy_timeout=0.05) as store:
        observer = StoreObserver(store)
        agent = GatedAgent()
        refused = make_run(observer, agent)
        other = locker(tmp_path)
        async with trio.open_nursery() as nursery:
            await nursery.start(observer.serve)
            await start_recorded(nursery, store, refused)
            other.execute("BEGIN EXCLUSIVE")
            agent.gate.set()  # its terminal write meets the lock
            await refused.wait_ended()
            assert refused.error_details is not None
            assert refused.error_details.code == "store_write_failed"
            record = await store.get(refused.run_id)
            assert record is not None and record.status is RunStatus.RUNNING
            assert observer.unfinished == 1
            other.execute("ROLLBACK")
            other.close()

            # No other run ends: the observer's own task lands it.
            # (Polled: the write lands in the store's thread, which no trio
            # primitive here can wait for.)
            with trio.fail_after(2 * RETRY_MAX_INTERVAL):
                while True:
                    if not observer.unfinished:
                        break
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()

        record = await store.get(refused.run_id)
        assert record is not None and record.status is RunStatus.COMPLETED
        assert record.text == refused.text


async def test_pending_terminal_writes_land_before_the_store_closes(tmp_path: Path) -> None:
    async with open_sqlite_store(tmp_path, busy_timeout=0.05) as store:
        observer = StoreObserver(store)
        other = locker(tmp_path)
        other.execute("BEGIN EXCLUSIVE")
        # Neither its start nor its end is written while the lock is held.
        run = make_run(observer)
        await run.run()
        assert observer.unfinished == 1
        other.execute("ROLLBACK")
        other.close()
    async with open_sqlite_store(tmp_path) as store:
        record = await store.get(run.run_id)
        assert store.recovered == 0
    assert record is not None and record.status is RunStatus.COMPLETED


async def test_a_terminal_write_refused_again_and_again_is_given_up(tmp_path: Path) -> None:
    async with open_sqlite_store(tmp_path, busy_timeout=0.01) as store:
        observer = StoreObserver(store)
        agent = GatedAgent()
        run = make_run(observer, agent)
        async with trio.open_nursery() as nursery:
            await start_recorded(nursery, store, run)
            await store.delete(run.run_id)  # no row to finish: refused every time
            agent.gate.set()
        for _ in range(TERMINAL_WRITE_ATTEMPTS - 1):
            assert observer.unfinished == 1
            await observer.flush()
        assert observer.unfinished == 0


async def test_a_write_cancelled_before_its_turn_is_not_an_attempt(tmp_path: Path) -> None:
    async with open_sqlite_store(tmp_path, busy_timeout=0.05) as store:
        observer = StoreObserver(store)
        run = make_run(observer)
        await store.insert_started(running_record(run.run_id))
        other = locker(tmp_path)
        other.execute("BEGIN EXCLUSIVE")
        async with trio.open_nursery() as nursery:
            # Takes the store's turn and waits on the lock meanwhile.
            nursery.start_soon(refused_quietly, store.insert_started(running_record("blocker")))
            await trio.sleep(0.01)
            with trio.move_on_after(0.01) as scope:
                await observer.run_ended(run, completed(run))
            assert scope.cancelled_caught
        other.execute("ROLLBACK")
        other.close()
        assert observer.unfinished == 1
        for _ in range(TERMINAL_WRITE_ATTEMPTS + 1):
            with trio.move_on_after(0):
                await observer.flush()  # cancelled each time before its turn
        assert observer.unfinished == 1
        await observer.flush()
        record = await store.get(run.run_id)
        assert record is not None and record.status is RunStatus.COMPLETED


async def test_a_write_failing_unexpectedly_is_given_up_and_blames_no_other_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_sqlite_store(tmp_path) as store:
        observer = StoreObserver(store)
        broken = make_run(observer)
        healthy = [make_run(observer) for _ in range(TERMINAL_WRITE_ATTEMPTS)]
        for run in (broken, *healthy):
            await store.insert_started(running_record(run.run_id))
        finish = SqliteRunStore.finish

        async def finish_or_fail(self: SqliteRunStore, result: RunResult) -> None:
            if result.run_id == broken.run_id:
                raise ValueError("not a StoreWriteError")
            await finish(self, result)

        monkeypatch.setattr(SqliteRunStore, "finish", finish_or_fail)
        with pytest.raises(ValueError):
            await observer.run_ended(broken, completed(broken))
        # Each retry fails it again; the failure stays with its own run.
        for run in healthy:
            await observer.run_ended(run, completed(run))
            await observer.flush()
        assert observer.unfinished == 0  # given up, not retried forever
