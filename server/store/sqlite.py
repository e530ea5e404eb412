"""The embedded run store: one SQLite file, ``runs.sqlite3`` in the data directory.

Threading: the trio thread never touches SQLite. The store has ONE
connection (``check_same_thread=False``) and ONE :class:`trio.CapacityLimiter`
of 1; every call is ``trio.to_thread.run_sync(..., limiter=that limiter)``.
So calls run one at a time, in the order they were made: the limiter is
taken without a schedule point when free and handed over first-in,
first-out when not, and nothing awaits before it in :meth:`_call`.

Cancellation: a call still waiting for its turn is cancelled at once. A
call that is running in its thread is waited for (``abandon_on_cancel``
stays False), so its outcome is always known and no thread outlives the
call; SQLite's ``busy_timeout`` bounds how long it can wait on a lock, so
keep it below the cleanup budget.

Resource handling: :meth:`SqliteRunStore.open` creates the data directory,
takes an exclusive lock on it (crash recovery is only right if no other
live process writes this database), opens the connection in WAL mode,
migrates the schema and marks runs left ``running`` by a crash as
``interrupted`` / ``crash_recovery``. :meth:`~SqliteRunStore.aclose` stops
taking calls, lets the ones already made finish (for up to
``close_timeout``; after that the running statement is interrupted, a lock
wait ends within ``busy_timeout`` and the queued calls fail), closes the
connection and releases the lock. No store thread outlives ``aclose``.

Error handling: any SQLite failure is logged with its real text and raised
as :class:`StoreWriteError` or :class:`StoreReadError`, whose message is
client-safe. The connection runs in autocommit mode; multi-statement writes
are explicit transactions that roll back on failure, so one failed call
leaves the store usable for the next.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import attrs
import trio

from ..core.events import RunStatus, Usage
from ..core.result import RunResult
from .records import (
    CRASH_RECOVERY,
    RunRecord,
    StoreError,
    StoreOpenError,
    StoreReadError,
    StoreWriteError,
)
from .schema import SCHEMA_VERSION, SchemaTooNew, migrate

logger = logging.getLogger(__name__)

DB_FILE = "runs.sqlite3"
LOCK_FILE = "runs.sqlite3.lock"
# The name a worker thread carries while it runs a store call.
THREAD_NAME = "run-store"
# Defaults, in one place for both ways of opening the store: seconds a call
# waits on SQLite's lock (keep it below the engine's cleanup budget), and
# seconds aclose lets the calls already made finish.
BUSY_TIMEOUT = 1.0
CLOSE_TIMEOUT = 5.0

T = TypeVar("T")

_COLUMNS = (
    "run_id, principal, session_id, prompt, agent, status, cancel_reason, output_text,"
    " prompt_tokens, completion_tokens, created_at, finished_at, error_code, error_message"
)


class _NoRow(Exception):
    """A write found no row to change (raised and caught inside the store)."""


class _Closing(Exception):
    """The store gave up on queued calls while closing."""


@attrs.define(eq=False)
class SqliteRunStore:
    """Runs recorded in SQLite. Make one with :meth:`open` (or
    :func:`open_sqlite_store`) and end it with :meth:`aclose`."""

    path: Path
    # Runs found ``running`` at open and marked interrupted.
    recovered: int
    # Wall clock (UNIX seconds) for the timestamps the store fills in.
    clock: Callable[[], float]
    close_timeout: float
    _connection: sqlite3.Connection = attrs.field(alias="connection")
    _lock_fd: int | None = attrs.field(alias="lock_fd")
    _limiter: trio.CapacityLimiter = attrs.field(
        factory=lambda: trio.CapacityLimiter(1), init=False
    )
    _closing: bool = attrs.field(default=False, init=False)
    # Read from worker threads: queued calls fail instead of running.
    _abandon_queue: bool = attrs.field(default=False, init=False)
    _closed: trio.Event = attrs.field(factory=trio.Event, init=False)
    # Writes that failed (the store_write_failures metric).
    write_failures: int = attrs.field(default=0, init=False)
    # Awaited by aclose before it stops taking calls (the observer's pending writes).
    before_close: list[Callable[[], Awaitable[None]]] = attrs.field(factory=list, init=False)

    # --- lifecycle ---------------------------------------------------------

    @classmethod
    async def open(
        cls,
        data_dir: Path,
        *,
        busy_timeout: float = BUSY_TIMEOUT,
        close_timeout: float = CLOSE_TIMEOUT,
        clock: Callable[[], float] = time.time,
    ) -> SqliteRunStore:
        """Open (creating, migrating and recovering) the store in ``data_dir``.

        Raises :class:`StoreOpenError` with an operator-readable reason."""
        data_dir = Path(data_dir)
        opened = await trio.to_thread.run_sync(
            partial(_open_sync, data_dir, busy_timeout=busy_timeout, now=clock()),
            thread_name=THREAD_NAME,
        )
        connection, lock_fd, applied, recovered = opened
        store = cls(
            path=data_dir / DB_FILE,
            recovered=recovered,
            clock=clock,
            close_timeout=close_timeout,
            connection=connection,
            lock_fd=lock_fd,
        )
        logger.info(
            "run_store_open path=%s schema_version=%d migrated=%s recovered=%d",
            store.path,
            SCHEMA_VERSION,
            ",".join(map(str, applied)) or "none",
            recovered,
        )
        if recovered:
            logger.warning(
                "run_store_crash_recovery interrupted=%d reason=%s", recovered, CRASH_RECOVERY
            )
        return store

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def aclose(self) -> None:
        """Stop taking calls, finish the ones already made, close.

        Shielded: completes even when the caller is cancelled. Bounded: after
        ``close_timeout`` the running statement is interrupted and calls still
        queued fail with a store error."""
        if self._closing:
            await self._closed.wait()
            return
        with trio.move_on_after(self.close_timeout, shield=True):
            for hook in self.before_close:
                try:
                    await hook()
                except Exception:
                    logger.exception("run_store_before_close_failed")
        self._closing = True
        try:
            with trio.CancelScope(shield=True):
                # Queued behind every call already made (the limiter is FIFO).
                with trio.move_on_after(self.close_timeout):
                    await self._close_in_turn()
                    return
                logger.warning(
                    "run_store_close_timeout timeout_s=%s: interrupting calls in flight",
                    self.close_timeout,
                )
                self._abandon_queue = True
                self._connection.interrupt()
                await self._close_in_turn()
        finally:
            self._closed.set()

    async def _close_in_turn(self) -> None:
        await trio.to_thread.run_sync(
            self._close_sync, limiter=self._limiter, thread_name=THREAD_NAME
        )
        logger.info("run_store_closed path=%s", self.path)

    def _close_sync(self) -> None:
        try:
            self._connection.close()
        except sqlite3.Error as exc:
            logger.error("run_store_close_failed error=%r", exc)
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    # --- writes ------------------------------------------------------------

    async def insert_started(self, record: RunRecord) -> None:
        """Record a run that has just started (``status`` must be running)."""
        if record.ended:
            raise ValueError("insert_started takes a running record")
        values = _row(record)
        sql = f"INSERT INTO runs ({_COLUMNS}) VALUES ({', '.join('?' * len(values))})"

        def write(db: sqlite3.Connection) -> None:
            db.execute(sql, values)

        await self._call("insert_started", write, write=True)

    async def finish(self, result: RunResult) -> None:
        """Write an ended run's result over its running row (once: a run that
        has already ended, or has no row, is a :class:`StoreWriteError`)."""
        if result.status is RunStatus.RUNNING or result.finished_at is None:
            raise ValueError("finish takes an ended run's result (a terminal status)")
        error = result.error
        # Validate as a record would be, before touching the database.
        attrs.evolve(
            _PROBE,
            status=result.status,
            cancel_reason=result.cancel_reason,
            finished_at=result.finished_at,
            error_code=None if error is None else error.code,
            error_message=None if error is None else error.message,
        )
        usage = result.usage
        run_id = result.run_id
        params = (
            result.status.value,
            result.cancel_reason,
            result.text,
            None if usage is None else usage.prompt_tokens,
            None if usage is None else usage.completion_tokens,
            result.finished_at,
            None if error is None else error.code,
            None if error is None else error.message,
            run_id,
        )

        def write(db: sqlite3.Connection) -> None:
            cursor = db.execute(
                "UPDATE runs SET status = ?, cancel_reason = ?, output_text = ?,"
                " prompt_tokens = ?, completion_tokens = ?, finished_at = ?,"
                " error_code = ?, error_message = ?"
                " WHERE run_id = ? AND status = 'running'",
                params,
            )
            if cursor.rowcount == 0:
                found = db.execute("SELECT status FROM runs WHERE run_id = ?", (run_id,)).fetchone()
                raise _NoRow(f"run {run_id} " + ("has no row" if found is None else "has ended"))

        await self._call("finish", write, write=True)

    async def update_text(self, run_id: str, text: str) -> bool:
        """Save a running run's output so far. False if the run has ended
        (or has no row): progress never overwrites a terminal record."""
        changed = await self._call(
            "update_text",
            lambda db: (
                db.execute(
                    "UPDATE runs SET output_text = ? WHERE run_id = ? AND status = 'running'",
                    (text, run_id),
                ).rowcount
            ),
            write=True,
        )
        return changed > 0

    async def delete(self, run_id: str) -> bool:
        """Remove a run's record and output (the ``rollback`` strategy).
        Delete a run only after it ended, or its terminal write will fail."""
        deleted = await self._call(
            "delete",
            lambda db: db.execute("DELETE FROM runs WHERE run_id = ?", (run_id,)).rowcount,
            write=True,
        )
        return deleted > 0

    async def prune(self, *, keep_last: int, older_than: float | None = None) -> int:
        """Retention: delete ended runs beyond the ``keep_last`` most recently
        finished, and those finished more than ``older_than`` seconds ago.
        Running runs are never pruned. Returns the number deleted."""
        if keep_last < 0:
            raise ValueError("keep_last must be >= 0")
        if older_than is not None and older_than < 0:
            raise ValueError("older_than must be >= 0")
        cutoff = None if older_than is None else self.clock() - older_than

        def write(db: sqlite3.Connection) -> int:
            with _transaction(db):
                deleted = db.execute(
                    "DELETE FROM runs WHERE run_id IN ("
                    " SELECT run_id FROM runs WHERE finished_at IS NOT NULL"
                    " ORDER BY finished_at DESC, rowid DESC LIMIT -1 OFFSET ?)",
                    (keep_last,),
                ).rowcount
                if cutoff is not None:
                    deleted += db.execute(
                        "DELETE FROM runs WHERE finished_at < ?", (cutoff,)
                    ).rowcount
            return deleted

        deleted = await self._call("prune", write, write=True)
        if deleted:
            logger.info("run_store_pruned deleted=%d", deleted)
        return deleted

    # --- reads -------------------------------------------------------------

    async def get(self, run_id: str) -> RunRecord | None:
        """Any principal's run: for the server's own use, not for clients."""
        return await self._one("get", "run_id = ?", (run_id,))

    async def get_for_principal(self, principal: str, run_id: str) -> RunRecord | None:
        """The run if ``principal`` owns it; None otherwise (indistinguishable
        from a run that does not exist)."""
        return await self._one(
            "get_for_principal", "run_id = ? AND principal = ?", (run_id, principal)
        )

    async def recent_for_session(
        self, principal: str, session_id: str, limit: int = 20
    ) -> list[RunRecord]:
        """A principal's runs in one session, newest first."""
        if limit < 0:
            raise ValueError("limit must be >= 0")
        rows = await self._call(
            "recent_for_session",
            lambda db: db.execute(
                f"SELECT {_COLUMNS} FROM runs WHERE principal = ? AND session_id = ?"
                " ORDER BY created_at DESC, rowid DESC LIMIT ?",
                (principal, session_id, limit),
            ).fetchall(),
            write=False,
        )
        return [_record(row) for row in rows]

    async def count_by_status(self) -> dict[RunStatus, int]:
        rows = await self._call(
            "count_by_status",
            lambda db: db.execute("SELECT status, COUNT(*) FROM runs GROUP BY status").fetchall(),
            write=False,
        )
        counts = dict.fromkeys(RunStatus, 0)
        counts.update({RunStatus(status): count for status, count in rows})
        return counts

    async def _one(self, operation: str, where: str, params: tuple[str, ...]) -> RunRecord | None:
        row = await self._call(
            operation,
            lambda db: db.execute(f"SELECT {_COLUMNS} FROM runs WHERE {where}", params).fetchone(),
            write=False,
        )
        return None if row is None else _record(row)

    # --- the one way in ----------------------------------------------------

    async def _call(
        self, operation: str, fn: Callable[[sqlite3.Connection], T], *, write: bool
    ) -> T:
        # No await before to_thread.run_sync: the order of calls is the
        # order they reach the limiter.
        failure: type[StoreError] = StoreWriteError if write else StoreReadError
        if self._closing:
            logger.error("run_store_failed op=%s error=store closed", operation)
            self.write_failures += write
            raise failure(operation)
        try:
            return await trio.to_thread.run_sync(
                self._in_thread, fn, limiter=self._limiter, thread_name=THREAD_NAME
            )
        except (sqlite3.Error, _NoRow, _Closing) as exc:
            logger.error("run_store_failed op=%s error=%r", operation, exc)
            self.write_failures += write
            raise failure(operation) from exc

    def _in_thread(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._abandon_queue:
            raise _Closing("store closed before this call ran")
        return fn(self._connection)


@asynccontextmanager
async def open_sqlite_store(
    data_dir: Path,
    *,
    busy_timeout: float = BUSY_TIMEOUT,
    close_timeout: float = CLOSE_TIMEOUT,
    clock: Callable[[], float] = time.time,
) -> AsyncIterator[SqliteRunStore]:
    """``async with open_sqlite_store(data_dir) as store:`` — see
    :meth:`SqliteRunStore.open` and :meth:`SqliteRunStore.aclose`."""
    store = await SqliteRunStore.open(
        data_dir, busy_timeout=busy_timeout, close_timeout=close_timeout, clock=clock
    )
    try:
        yield store
    finally:
        await store.aclose()


# --- helpers (worker thread) --------------------------------------------------

# A valid record to evolve when checking finish()'s arguments.
_PROBE = RunRecord(
    run_id="probe",
    principal="",
    session_id="",
    prompt="",
    agent="",
    status=RunStatus.RUNNING,
    created_at=0.0,
)


@contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _row(record: RunRecord) -> tuple[Any, ...]:
    return (
        record.run_id,
        record.principal,
        record.session_id,
        record.prompt,
        record.agent,
        record.status.value,
        record.cancel_reason,
        record.text,
        None if record.usage is None else record.usage.prompt_tokens,
        None if record.usage is None else record.usage.completion_tokens,
        record.created_at,
        record.finished_at,
        record.error_code,
        record.error_message,
    )


def _record(row: tuple[Any, ...]) -> RunRecord:
    (
        run_id,
        principal,
        session_id,
        prompt,
        agent,
        status,
        cancel_reason,
        text,
        prompt_tokens,
        completion_tokens,
        created_at,
        finished_at,
        error_code,
        error_message,
    ) = row
    return RunRecord(
        run_id=run_id,
        principal=principal,
        session_id=session_id,
        prompt=prompt,
        agent=agent,
        status=RunStatus(status),
        cancel_reason=cancel_reason,
        text=text,
        usage=None
        if prompt_tokens is None
        else Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens),
        created_at=created_at,
        finished_at=finished_at,
        error_code=error_code,
        error_message=error_message,
    )


def _open_sync(
    data_dir: Path, *, busy_timeout: float, now: float
) -> tuple[sqlite3.Connection, int | None, list[int], int]:
    """Directory, lock, connection, pragmas, migrations, crash recovery; on
    any failure, release what was taken and raise :class:`StoreOpenError`."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        lock_fd = _lock_data_dir(data_dir)
    except OSError as exc:
        raise StoreOpenError("open", f"cannot use data directory {data_dir}: {exc}") from exc
    try:
        connection = sqlite3.connect(
            data_dir / DB_FILE, check_same_thread=False, isolation_level=None
        )
        try:
            connection.execute(f"PRAGMA busy_timeout = {round(busy_timeout * 1000):d}")
            mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                logger.warning("run_store_journal_mode mode=%s (WAL not available here)", mode)
            connection.execute("PRAGMA synchronous = NORMAL")
            applied = migrate(connection)
            recovered = connection.execute(
                "UPDATE runs SET status = 'interrupted', cancel_reason = ?, finished_at = ?"
                " WHERE finished_at IS NULL AND status = 'running'",
                (CRASH_RECOVERY, now),
            ).rowcount
        except BaseException:
            connection.close()
            raise
    except SchemaTooNew as exc:
        _unlock(lock_fd)
        raise StoreOpenError(
            "open", f"{data_dir / DB_FILE} was written by a newer server ({exc})"
        ) from exc
    except sqlite3.Error as exc:
        _unlock(lock_fd)
        raise StoreOpenError("open", f"cannot open {data_dir / DB_FILE}: {exc}") from exc
    except BaseException:
        _unlock(lock_fd)
        raise
    return connection, lock_fd, applied, recovered


def _lock_data_dir(data_dir: Path) -> int | None:
    """Hold an exclusive lock on the data directory while the store is open:
    crash recovery marks every ``running`` row interrupted, which is only
    right when no other live process writes this database. The OS drops the
    lock when the process dies. (No lock on Windows.)"""
    if sys.platform == "win32":
        return None
    import fcntl

    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OSError(f"{data_dir} is in use by another server process") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _unlock(lock_fd: int | None) -> None:
    if lock_fd is not None:
        os.close(lock_fd)
