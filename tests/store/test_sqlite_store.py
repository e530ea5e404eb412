"""The SQLite run store against a real database file in ``tmp_path``.

Real threads and real SQLite, so real time: nothing here sleeps except
where a lock wait is the behaviour under test (a few hundred ms at most).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing

from server.agents.scripted import ScriptedAgent
from server.core.agent import AgentRequest
from server.core.events import (
    AgentOutput,
    CancelReason,
    ErrorInfo,
    RunStatus,
    TextDelta,
    Usage,
)
from server.core.result import RunResult
from server.core.run import Run
from server.store import (
    CRASH_RECOVERY,
    SCHEMA_VERSION,
    Retention,
    RunRecord,
    SqliteRunStore,
    StoreObserver,
    StoreOpenError,
    StoreReadError,
    StoreWriteError,
    open_sqlite_store,
)
from server.store.schema import MIGRATIONS, migrate
from server.store.sqlite import DB_FILE, THREAD_NAME
from tests.helpers import FailingAgent

ALICE = "key-alice"
BOB = "key-bob"


# When ended() says a run finished, unless told.
FINISHED_AT = 1_700_000_010.0


def ended(
    run_id: str,
    *,
    status: RunStatus,
    cancel_reason: CancelReason | None = None,
    text: str = "",
    usage: Usage | None = None,
    error_code: str | None = None,
    error_message: str = "",
    finished_at: float | None = FINISHED_AT,
) -> RunResult:
    """What the engine hands the store when a run ends."""
    return RunResult(
        run_id=run_id,
        principal=ALICE,
        session_id="s1",
        agent="scripted",
        status=status,
        cancel_reason=None if cancel_reason is None else cancel_reason.value,
        text=text,
        usage=usage,
        error=None if error_code is None else ErrorInfo(code=error_code, message=error_message),
        created_at=FINISHED_AT - 1,
        finished_at=finished_at,
    )


@attrs.define
class WallClock:
    """A wall clock the test moves by hand (UNIX seconds)."""

    now: float = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> WallClock:
    return WallClock()


@pytest.fixture
async def store(tmp_path: Path, clock: WallClock) -> AsyncIterator[SqliteRunStore]:
    async with open_sqlite_store(tmp_path, clock=clock) as store:
        yield store


def started(
    run_id: str,
    *,
    principal: str = ALICE,
    session_id: str = "s1",
    created_at: float = 1_700_000_000.0,
) -> RunRecord:
    return RunRecord(
        run_id=run_id,
        principal=principal,
        session_id=session_id,
        prompt=f"prompt of {run_id}",
        agent="scripted",
        status=RunStatus.RUNNING,
        created_at=created_at,
    )


def raw(tmp_path: Path) -> sqlite3.Connection:
    """A second, independent connection: what is really on disk."""
    return sqlite3.connect(tmp_path / DB_FILE, isolation_level=None)


def open_files(path: Path) -> list[str]:
    """This process's open file descriptors that point at ``path``'s directory."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(path)):
            found.append(target)
    return found


# --- opening: schema, WAL, migrations, lock -------------------------------------


async def test_open_creates_versioned_schema_in_wal_mode(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="server.store")
    data_dir = tmp_path / "nested" / "data"
    async with open_sqlite_store(data_dir) as store:
        assert store.path == data_dir / DB_FILE
        assert store.recovered == 0
    assert "migrated=1,2,3 " in caplog.text

    db = raw(data_dir)
    assert SCHEMA_VERSION == 3
    assert db.execute("PRAGMA user_version").fetchone()[0] == 3
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    indexes = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert {"runs_by_session", "runs_by_finish"} <= indexes
    columns = [row[2] for row in db.execute("PRAGMA index_info(runs_by_session)")]
    assert columns == ["principal", "session_id", "created_at"]
    db.close()


async def test_reopen_migrates_nothing_twice(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_sqlite_store(tmp_path) as store:
        await store.insert_started(started("r1"))
    caplog.set_level(logging.INFO, logger="server.store")
    async with open_sqlite_store(tmp_path) as store:
        assert await store.get("r1") is not None
    assert "migrated=none " in caplog.text
    db = raw(tmp_path)
    assert migrate(db) == []
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.close()


async def test_version_1_database_migrates_to_nullable_prompts_keeping_its_rows(
    tmp_path: Path,
) -> None:
    db = raw(tmp_path)
    db.execute("BEGIN")
    for statement in MIGRATIONS[0]:
        db.execute(statement)
    db.execute("PRAGMA user_version = 1")
    db.execute(
        "INSERT INTO runs (run_id, principal, session_id, prompt, agent, status, created_at,"
        " finished_at, output_text) VALUES ('old', ?, 's1', 'an old prompt', 'scripted',"
        " 'completed', 1, 2, 'an answer')",
        (ALICE,),
    )
    db.execute("COMMIT")
    db.close()
    async with open_sqlite_store(tmp_path) as store:
        old = await store.get("old")
        await store.insert_started(attrs.evolve(started("new"), prompt=None))
        new = await store.get("new")
    assert old is not None and (old.prompt, old.text) == ("an old prompt", "an answer")
    assert new is not None and new.prompt is None
    db = raw(tmp_path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    indexes = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert {"runs_by_session", "runs_by_finish"} <= indexes
    db.close()


async def test_version_2_database_migrates_to_owner_lost_keeping_its_rows(
    tmp_path: Path,
) -> None:
    db = raw(tmp_path)
    db.execute("BEGIN")
    for migration in MIGRATIONS[:2]:
        for statement in migration:
            db.execute(statement)
    db.execute("PRAGMA user_version = 2")
    db.execute(
        "INSERT INTO runs (run_id, principal, session_id, agent, status, cancel_reason,"
        " created_at, finished_at) VALUES ('old', ?, 's1', 'scripted', 'cancelled',"
        " 'superseded', 1, 2)",
        (ALICE,),
    )
    db.execute("COMMIT")
    db.close()
    async with open_sqlite_store(tmp_path) as store:
        old = await store.get("old")
        await store.insert_started(started("lost"))
        await store.finish(
            ended("lost", status=RunStatus.INTERRUPTED, cancel_reason=CancelReason.OWNER_LOST)
        )
        lost = await store.get("lost")
    assert old is not None and (old.status, old.cancel_reason) == (
        RunStatus.CANCELLED,
        "superseded",
    )
    assert lost is not None and (lost.status, lost.cancel_reason) == (
        RunStatus.INTERRUPTED,
        "owner_lost",
    )


async def test_every_cancel_reason_can_be_recorded(store: SqliteRunStore) -> None:
    # Regression (issue 12): owner_lost was refused by the table's CHECK, so
    # a node that lost a session's lease left its run `running` in its archive.
    for reason in CancelReason:
        status = RunStatus.INTERRUPTED if reason.ended_by_server else RunStatus.CANCELLED
        await store.insert_started(started(reason.value))
        await store.finish(ended(reason.value, status=status, cancel_reason=reason))
        record = await store.get(reason.value)
        assert record is not None and record.cancel_reason == reason.value


async def test_database_from_a_newer_server_is_refused(tmp_path: Path) -> None:
    async with open_sqlite_store(tmp_path):
        pass
    db = raw(tmp_path)
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(StoreOpenError, match="newer server"):
        await SqliteRunStore.open(tmp_path)
    # Nothing was left open by the failed attempt.
    assert open_files(tmp_path) == []


async def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    (tmp_path / DB_FILE).write_bytes(b"this is not sqlite " * 100)
    with pytest.raises(StoreOpenError, match="cannot open"):
        await SqliteRunStore.open(tmp_path)
    assert open_files(tmp_path) == []


async def test_second_store_on_the_same_data_dir_is_refused(tmp_path: Path) -> None:
    async with open_sqlite_store(tmp_path):
        with pytest.raises(StoreOpenError, match="in use by another server process"):
            await SqliteRunStore.open(tmp_path)
    # Released on close.
    async with open_sqlite_store(tmp_path):
        pass


# --- writing and reading ------------------------------------------------------


async def test_insert_finish_get_round_trip(store: SqliteRunStore, clock: WallClock) -> None:
    record = started("r1")
    await store.insert_started(record)
    assert await store.get("r1") == record

    clock.now += 2.5
    await store.finish(
        ended(
            "r1",
            status=RunStatus.COMPLETED,
            text="hello world",
            usage=Usage(prompt_tokens=3, completion_tokens=2),
            finished_at=clock.now,
        )
    )
    assert await store.get("r1") == attrs.evolve(
        record,
        status=RunStatus.COMPLETED,
        text="hello world",
        usage=Usage(prompt_tokens=3, completion_tokens=2),
        finished_at=clock.now,
    )
    assert await store.get("missing") is None


async def test_finish_records_cancel_reason_and_error(store: SqliteRunStore) -> None:
    await store.insert_started(started("cancelled"))
    await store.insert_started(started("failed"))
    await store.finish(
        ended(
            "cancelled",
            status=RunStatus.CANCELLED,
            cancel_reason=CancelReason.SUPERSEDED,
            text="par",
        )
    )
    await store.finish(
        ended(
            "failed",
            status=RunStatus.FAILED,
            error_code="agent_error",
            error_message="The agent failed while producing the answer.",
            finished_at=1_700_000_009.0,
        )
    )
    cancelled = await store.get("cancelled")
    assert cancelled is not None
    assert (cancelled.status, cancelled.cancel_reason, cancelled.text) == (
        RunStatus.CANCELLED,
        "superseded",
        "par",
    )
    failed = await store.get("failed")
    assert failed is not None
    assert failed.status is RunStatus.FAILED
    assert failed.finished_at == 1_700_000_009.0
    assert failed.error == ErrorInfo(
        code="agent_error", message="The agent failed while producing the answer."
    )


async def test_update_text_saves_progress_until_the_run_ends(store: SqliteRunStore) -> None:
    await store.insert_started(started("r1"))
    assert await store.update_text("r1", "so far")
    record = await store.get("r1")
    assert record is not None and record.text == "so far"
    await store.finish(ended("r1", status=RunStatus.COMPLETED, text="final"))
    # A late progress write never overwrites the terminal record.
    assert not await store.update_text("r1", "late")
    record = await store.get("r1")
    assert record is not None and record.text == "final"


async def test_only_the_owner_reads_a_run(store: SqliteRunStore) -> None:
    await store.insert_started(started("r1", principal=ALICE))
    mine = await store.get_for_principal(ALICE, "r1")
    assert mine is not None and mine.run_id == "r1"
    assert await store.get_for_principal(BOB, "r1") is None
    assert await store.get_for_principal(ALICE, "nope") is None


async def test_recent_for_session_is_newest_first_and_limited(store: SqliteRunStore) -> None:
    for index in range(5):
        await store.insert_started(started(f"r{index}", created_at=1000.0 + index))
    # Same session id under another key, and another session: not included.
    await store.insert_started(started("bob", principal=BOB, created_at=2000.0))
    await store.insert_started(started("other", session_id="s2", created_at=2000.0))
    # Equal timestamps: insertion order breaks the tie.
    await store.insert_started(started("r5", created_at=1004.0))

    recent = await store.recent_for_session(ALICE, "s1", limit=3)
    assert [record.run_id for record in recent] == ["r5", "r4", "r3"]
    everything = await store.recent_for_session(ALICE, "s1", limit=100)
    assert [record.run_id for record in everything] == ["r5", "r4", "r3", "r2", "r1", "r0"]
    assert await store.recent_for_session(BOB, "s2", limit=10) == []


async def test_count_by_status(store: SqliteRunStore) -> None:
    for run_id in ("a", "b", "c"):
        await store.insert_started(started(run_id))
    await store.finish(ended("a", status=RunStatus.COMPLETED))
    await store.finish(
        ended("b", status=RunStatus.INTERRUPTED, cancel_reason=CancelReason.SHUTDOWN)
    )
    counts = await store.count_by_status()
    assert counts == {
        RunStatus.RUNNING: 1,
        RunStatus.COMPLETED: 1,
        RunStatus.CANCELLED: 0,
        RunStatus.INTERRUPTED: 1,
        RunStatus.FAILED: 0,
    }


async def test_delete_removes_record_and_output(store: SqliteRunStore) -> None:
    await store.insert_started(started("r1"))
    await store.finish(
        ended("r1", status=RunStatus.CANCELLED, cancel_reason=CancelReason.SUPERSEDED, text="x")
    )
    assert await store.delete("r1")
    assert await store.get("r1") is None
    assert not await store.delete("r1")


# --- crash recovery -----------------------------------------------------------


async def test_runs_left_running_by_a_crash_are_interrupted_on_open(
    tmp_path: Path, clock: WallClock, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_sqlite_store(tmp_path, clock=clock) as store:
        await store.insert_started(started("done"))
        await store.finish(ended("done", status=RunStatus.COMPLETED, text="ok"))
        await store.insert_started(started("orphan-1"))
        await store.insert_started(started("orphan-2"))
        await store.update_text("orphan-2", "half an ans")
        # Closed without finishing: what a killed process leaves behind.

    clock.now += 60
    caplog.set_level(logging.INFO, logger="server.store")
    async with open_sqlite_store(tmp_path, clock=clock) as store:
        assert store.recovered == 2
        for run_id in ("orphan-1", "orphan-2"):
            record = await store.get(run_id)
            assert record is not None
            assert record.status is RunStatus.INTERRUPTED
            assert record.cancel_reason == CRASH_RECOVERY
            assert record.finished_at == clock.now
        orphan = await store.get("orphan-2")
        assert orphan is not None and orphan.text == "half an ans"
        done = await store.get("done")
        assert done is not None and done.status is RunStatus.COMPLETED
    assert "run_store_crash_recovery interrupted=2" in caplog.text

    async with open_sqlite_store(tmp_path, clock=clock) as store:
        assert store.recovered == 0


# --- retention ------------------------------------------------------------------


async def finished_at(store: SqliteRunStore, run_id: str, when: float) -> None:
    await store.insert_started(started(run_id, created_at=when - 1))
    await store.finish(ended(run_id, status=RunStatus.COMPLETED, finished_at=when))


async def remaining(store: SqliteRunStore) -> list[str]:
    return sorted(record.run_id for record in await store.recent_for_session(ALICE, "s1", 1000))


async def test_prune_keeps_the_most_recently_finished(store: SqliteRunStore) -> None:
    for index in range(6):
        await finished_at(store, f"r{index}", 1000.0 + index)
    await store.insert_started(started("live", created_at=0.0))
    assert await store.prune(keep_last=2) == 4
    # Running runs are never pruned and do not count against keep_last.
    assert await remaining(store) == ["live", "r4", "r5"]
    assert await store.prune(keep_last=2) == 0


async def test_prune_drops_runs_older_than_max_age(store: SqliteRunStore, clock: WallClock) -> None:
    await finished_at(store, "old", clock.now - 7200)
    await finished_at(store, "recent", clock.now - 60)
    await store.insert_started(started("live", created_at=clock.now - 99_999))
    assert await store.prune(keep_last=100, older_than=3600) == 1
    assert await remaining(store) == ["live", "recent"]


async def test_retention_prunes_before_reporting_started(
    store: SqliteRunStore, clock: WallClock
) -> None:
    await finished_at(store, "old", clock.now - 7200)
    await finished_at(store, "recent", clock.now - 60)
    async with trio.open_nursery() as nursery:
        await nursery.start(Retention(store=store, keep_last=10, max_age=3600, interval=60).serve)
        assert await remaining(store) == ["recent"]
        nursery.cancel_scope.cancel()


# --- failures -------------------------------------------------------------------


def assert_client_safe(error: StoreWriteError | StoreReadError) -> None:
    assert str(error) == error.message
    assert "sqlite" not in error.message.lower()
    assert error.error_info.code == error.code


async def test_a_failed_write_raises_a_safe_error_and_the_store_stays_usable(
    store: SqliteRunStore, caplog: pytest.LogCaptureFixture
) -> None:
    await store.insert_started(started("r1"))
    with pytest.raises(StoreWriteError) as caught:
        await store.insert_started(started("r1"))
    assert_client_safe(caught.value)
    assert caught.value.error_info == ErrorInfo(
        code="store_write_failed", message="The run could not be recorded."
    )
    # The real cause is in the log (and on __cause__), not in the message.
    assert isinstance(caught.value.__cause__, sqlite3.IntegrityError)
    assert "op=insert_started" in caplog.text and "UNIQUE constraint failed" in caplog.text

    await store.insert_started(started("r2"))
    await store.finish(ended("r2", status=RunStatus.COMPLETED))
    record = await store.get("r2")
    assert record is not None and record.status is RunStatus.COMPLETED


async def test_the_terminal_status_is_written_once(store: SqliteRunStore) -> None:
    await store.insert_started(started("r1"))
    await store.finish(ended("r1", status=RunStatus.COMPLETED, text="first"))
    with pytest.raises(StoreWriteError):
        await store.finish(ended("r1", status=RunStatus.FAILED, error_code="x", error_message="y"))
    with pytest.raises(StoreWriteError):
        await store.finish(ended("unknown", status=RunStatus.COMPLETED))
    record = await store.get("r1")
    assert record is not None and (record.status, record.text) == (RunStatus.COMPLETED, "first")


async def test_incoherent_arguments_are_a_programming_error(store: SqliteRunStore) -> None:
    await store.insert_started(started("r1"))
    with pytest.raises(ValueError, match="terminal status"):
        await store.finish(ended("r1", status=RunStatus.RUNNING, finished_at=None))
    with pytest.raises(ValueError, match="no cancel reason"):
        await store.finish(
            ended("r1", status=RunStatus.COMPLETED, cancel_reason=CancelReason.SHUTDOWN)
        )
    with pytest.raises(ValueError, match="finished_at"):
        await store.finish(ended("r1", status=RunStatus.COMPLETED, finished_at=None))


async def test_check_constraints_back_up_the_record_rules(tmp_path: Path) -> None:
    async with open_sqlite_store(tmp_path):
        pass
    db = raw(tmp_path)
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
        db.execute(
            "INSERT INTO runs (run_id, principal, session_id, prompt, agent, status, created_at)"
            " VALUES ('x', 'p', 's', '', 'a', 'bogus', 0)"
        )
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
        db.execute(
            "INSERT INTO runs (run_id, principal, session_id, prompt, agent, status, created_at,"
            " finished_at) VALUES ('x', 'p', 's', '', 'a', 'running', 0, 1)"
        )
    db.close()


async def test_a_locked_database_fails_the_write_after_busy_timeout(tmp_path: Path) -> None:
    async with open_sqlite_store(tmp_path, busy_timeout=0.05) as store:
        await store.insert_started(started("r1"))
        other = raw(tmp_path)
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreWriteError) as caught:
            await store.finish(ended("r1", status=RunStatus.COMPLETED))
        assert_client_safe(caught.value)
        # Readers are not blocked by a writer in WAL mode.
        record = await store.get("r1")
        assert record is not None and record.status is RunStatus.RUNNING
        other.execute("ROLLBACK")
        other.close()
        await store.finish(ended("r1", status=RunStatus.COMPLETED))


async def test_a_closed_store_refuses_calls(store: SqliteRunStore) -> None:
    await store.aclose()
    assert store.closed
    with pytest.raises(StoreWriteError) as write_error:
        await store.insert_started(started("r1"))
    assert_client_safe(write_error.value)
    with pytest.raises(StoreReadError) as read_error:
        await store.get("r1")
    assert_client_safe(read_error.value)
    await store.aclose()  # idempotent


# --- ordering, closing, threads ---------------------------------------------------


async def test_concurrent_writes_land_in_the_order_they_were_made(
    tmp_path: Path, store: SqliteRunStore
) -> None:
    made: list[str] = []

    async def writer(index: int) -> None:
        run_id = f"r{index:02d}"
        for step in range(3):
            made.append(run_id if step == 0 else f"{run_id}/{step}")
            if step == 0:
                await store.insert_started(started(run_id))
            else:
                await store.update_text(run_id, f"step {step}")
        made.append(f"{run_id}/end")
        await store.finish(ended(run_id, status=RunStatus.COMPLETED, text="done"))

    async with trio.open_nursery() as nursery:
        for index in range(40):
            nursery.start_soon(writer, index)

    inserts = [entry for entry in made if "/" not in entry]
    db = raw(tmp_path)
    on_disk = [row[0] for row in db.execute("SELECT run_id FROM runs ORDER BY rowid")]
    db.close()
    # Rows were inserted in exactly the order the calls were made.
    assert on_disk == inserts
    assert len(on_disk) == 40
    for record in await store.recent_for_session(ALICE, "s1", 100):
        assert (record.status, record.text) == (RunStatus.COMPLETED, "done")


async def test_closing_completes_calls_already_made(tmp_path: Path) -> None:
    store = await SqliteRunStore.open(tmp_path)
    results: list[str] = []

    async def writer(run_id: str) -> None:
        await store.insert_started(started(run_id))
        results.append(run_id)

    async with trio.open_nursery() as nursery:
        for index in range(20):
            nursery.start_soon(writer, f"r{index}")
        await trio.testing.wait_all_tasks_blocked()
        await store.aclose()
    assert len(results) == 20

    async with open_sqlite_store(tmp_path) as reopened:
        assert len(await reopened.recent_for_session(ALICE, "s1", 100)) == 20


async def test_closing_is_bounded_when_a_call_is_stuck(tmp_path: Path) -> None:
    store = await SqliteRunStore.open(tmp_path, busy_timeout=0.3, close_timeout=0.05)
    await store.insert_started(started("r1"))
    other = raw(tmp_path)
    other.execute("BEGIN IMMEDIATE")
    outcomes: list[str] = []

    async def finisher() -> None:
        try:
            await store.finish(ended("r1", status=RunStatus.COMPLETED))
        except StoreWriteError:
            outcomes.append("failed")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(finisher)  # stuck on the lock
        nursery.start_soon(finisher)  # queued behind it
        await trio.testing.wait_all_tasks_blocked()
        with trio.fail_after(2):
            await store.aclose()
    other.execute("ROLLBACK")
    other.close()
    assert outcomes == ["failed", "failed"]
    assert open_files(tmp_path) == []


async def test_closing_under_cancellation_still_closes(tmp_path: Path) -> None:
    store = await SqliteRunStore.open(tmp_path)
    with trio.CancelScope() as scope:
        scope.cancel()
        await store.aclose()
    assert store.closed
    assert open_files(tmp_path) == []


async def test_no_thread_or_file_outlives_the_store(tmp_path: Path) -> None:
    before = {thread.ident for thread in threading.enumerate()}
    async with open_sqlite_store(tmp_path) as store:
        async with trio.open_nursery() as nursery:
            for index in range(10):
                nursery.start_soon(store.insert_started, started(f"r{index}"))
        assert open_files(tmp_path)
    # The database, its WAL and the lock are all closed.
    assert open_files(tmp_path) == []
    # trio keeps idle worker threads cached for a while (not ours to end);
    # none of them is running store work.
    new_threads = [thread for thread in threading.enumerate() if thread.ident not in before]
    assert all(thread.name.startswith("Trio thread ") for thread in new_threads), new_threads
    assert not [thread for thread in threading.enumerate() if thread.name == THREAD_NAME]


# --- the engine's observer ----------------------------------------------------------


@attrs.frozen
class StallingAgent:
    """Says a little, then waits to be cancelled."""

    name: str = "stalling"

    async def run(
        self, request: AgentRequest, send_channel: trio.MemorySendChannel[AgentOutput]
    ) -> None:
        await send_channel.send(TextDelta("partial "))
        await send_channel.send(TextDelta("answer"))
        await trio.sleep_forever()


async def start_run(
    nursery: trio.Nursery, observer: StoreObserver, run: Run, *, principal: str = ALICE
) -> Run:
    # The run tells the observer it started, then runs.
    await nursery.start(run.run)
    return run


def completed(run: Run) -> RunResult:
    """The result the engine would hand the store had ``run`` completed."""
    return attrs.evolve(run.result, status=RunStatus.COMPLETED, finished_at=time.time())


def make_run(
    agent: ScriptedAgent | StallingAgent | FailingAgent,
    observer: StoreObserver,
    prompt: str = "tell me a story",
    principal: str = ALICE,
) -> Run:
    return Run(
        session_id="s1",
        request=AgentRequest(prompt=prompt),
        agent=agent,
        observer=observer,
        principal=principal,
    )


@pytest.mark.parametrize(("store_prompts", "prompt"), [(False, None), (True, "tell me a story")])
async def test_observer_records_a_completed_run(
    store: SqliteRunStore, store_prompts: bool, prompt: str | None
) -> None:
    observer = StoreObserver(store, store_prompts=store_prompts)
    run = make_run(ScriptedAgent(token_delay=0, reply_words=5), observer)
    async with trio.open_nursery() as nursery:
        await start_run(nursery, observer, run)
    record = await store.get_for_principal(ALICE, run.run_id)
    assert record is not None
    assert record.status is RunStatus.COMPLETED
    assert (record.prompt, record.agent, record.session_id) == (prompt, "scripted", "s1")
    assert record.text == run.text and record.text.startswith("You said: tell me a")
    assert record.usage == Usage(prompt_tokens=4, completion_tokens=5)
    assert record.cancel_reason is None and record.finished_at is not None


async def test_observer_records_cancel_reasons(store: SqliteRunStore) -> None:
    observer = StoreObserver(store)
    stopped = make_run(StallingAgent(), observer)
    shut_down = make_run(StallingAgent(), observer)
    async with trio.open_nursery() as outer:
        await start_run(outer, observer, stopped)
        async with trio.open_nursery() as inner:
            await start_run(inner, observer, shut_down)
            for run in (stopped, shut_down):  # both agents have sent their text
                while len(run.log) < 3:
                    await run.log.wait_beyond(len(run.log))
            stopped.cancel(CancelReason.CLIENT_STOP)
            # Cancelled from outside without a reason: a shutdown.
            inner.cancel_scope.cancel()
    by_id = {record.run_id: record for record in await store.recent_for_session(ALICE, "s1", 10)}
    assert (by_id[stopped.run_id].status, by_id[stopped.run_id].cancel_reason) == (
        RunStatus.CANCELLED,
        "client_stop",
    )
    assert (by_id[shut_down.run_id].status, by_id[shut_down.run_id].cancel_reason) == (
        RunStatus.INTERRUPTED,
        "shutdown",
    )
    assert by_id[stopped.run_id].text == "partial answer"


async def test_observer_records_a_failed_run_with_its_client_safe_error(
    store: SqliteRunStore,
) -> None:
    observer = StoreObserver(store)
    run = make_run(FailingAgent(after=0), observer, prompt="fail now")
    async with trio.open_nursery() as nursery:
        await start_run(nursery, observer, run)
    record = await store.get(run.run_id)
    assert record is not None and record.status is RunStatus.FAILED
    assert record.error == run.error
    assert record.error_message is not None and "secret" not in record.error_message


async def test_observer_reraises_a_failed_terminal_write(store: SqliteRunStore) -> None:
    observer = StoreObserver(store)
    run = make_run(ScriptedAgent(token_delay=0, reply_words=2), observer)
    async with trio.open_nursery() as nursery:
        await start_run(nursery, observer, run)
    await store.delete(run.run_id)
    with pytest.raises(StoreWriteError) as caught:
        await observer.run_ended(run, completed(run))
    assert caught.value.error_info.code == "store_write_failed"


async def test_observer_inserts_a_cancelled_start_when_the_run_ends(
    tmp_path: Path, store: SqliteRunStore
) -> None:
    observer = StoreObserver(store)
    run = make_run(ScriptedAgent(token_delay=0, reply_words=2), observer)
    other = raw(tmp_path)
    other.execute("BEGIN IMMEDIATE")
    async with trio.open_nursery() as nursery:
        # Holds the store's turn: stuck on the lock until the ROLLBACK below.
        nursery.start_soon(store.insert_started, started("blocker"))
        await trio.testing.wait_all_tasks_blocked()
        # Cancelled while waiting for its turn: propagates, nothing written.
        with trio.move_on_after(0.05) as scope:
            await observer.run_started(run)
        assert scope.cancelled_caught
        other.execute("ROLLBACK")
    other.close()
    assert await store.get(run.run_id) is None

    await run.run()
    record = await store.get(run.run_id)
    assert record is not None and record.status is RunStatus.COMPLETED
    assert record.principal == ALICE


async def test_observer_inserts_a_failed_start_when_the_run_ends(tmp_path: Path) -> None:
    async with open_sqlite_store(tmp_path, busy_timeout=0.05) as store:
        observer = StoreObserver(store)
        run = make_run(StallingAgent(), observer)
        other = raw(tmp_path)
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreWriteError):
            await observer.run_started(run)
        other.execute("ROLLBACK")
        other.close()
        async with trio.open_nursery() as nursery:
            await nursery.start(run.run)
            run.cancel(CancelReason.CLIENT_DISCONNECT)
        record = await store.get(run.run_id)
        assert record is not None
        assert (record.status, record.cancel_reason) == (RunStatus.CANCELLED, "client_disconnect")
