"""The embedded run store: one SQLite file, ``runs.sqlite3`` in the data directory.

What is asked of it (the queries) lives here; how a call reaches SQLite (one
connection, one worker thread at a time, in order; the data directory's
lock; closing) lives in :mod:`.connection`, whose docstring says how
threads, cancellation and failures are handled.

Resource handling: :meth:`SqliteRunStore.open` opens the connection (see
:meth:`.StoreConnection.open`) and marks runs left ``running`` by a crash as
``interrupted`` / ``crash_recovery``. :meth:`~SqliteRunStore.aclose` runs
the ``before_close`` hooks (the observer's pending writes), then closes the
connection. No store thread outlives ``aclose``.

Error handling: any SQLite failure is logged with its real text and raised
as :class:`StoreWriteError` or :class:`StoreReadError`, whose message is
client-safe; one failed call leaves the store usable for the next.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import TypeVar

import attrs
import trio

from ..core.events import RunStatus
from ..core.result import RunResult
from .connection import DB_FILE as DB_FILE
from .connection import LOCK_FILE as LOCK_FILE
from .connection import THREAD_NAME as THREAD_NAME
from .connection import NoRow, StoreConnection, transaction
from .records import CRASH_RECOVERY, RunRecord
from .recovery import mark_interrupted, recover_at_open
from .rows import COLUMNS, PROBE, to_record, to_row
from .schema import SCHEMA_VERSION

logger = logging.getLogger(__name__)

# Defaults, in one place for both ways of opening the store: seconds a call
# waits on SQLite's lock (keep it below the engine's cleanup budget), and
# seconds aclose lets the calls already made finish.
BUSY_TIMEOUT = 1.0
CLOSE_TIMEOUT = 5.0

T = TypeVar("T")


@attrs.define(eq=False)
class SqliteRunStore:
    """Runs recorded in SQLite. Make one with :meth:`open` (or
    :func:`open_sqlite_store`) and end it with :meth:`aclose`."""

    path: Path
    # Runs found ``running`` at open and marked interrupted.
    recovered: int
    # Wall clock (UNIX seconds) for the timestamps the store fills in.
    clock: Callable[[], float]
    _connection: StoreConnection = attrs.field(alias="connection")
    # Crash recovery found these ``running`` at open but could not write
    # (the disk was full): marked later by recover_deferred.
    _unrecovered: set[str] = attrs.field(factory=set, alias="unrecovered")
    # Wall clock at open: the finished_at crash recovery writes.
    opened_at: float = 0.0
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
        now = clock()
        connection, (recovered, unrecovered) = await StoreConnection.open(
            Path(data_dir),
            partial(recover_at_open, now=now),
            busy_timeout=busy_timeout,
            close_timeout=close_timeout,
        )
        store = cls(
            path=connection.path,
            recovered=recovered,
            clock=clock,
            connection=connection,
            unrecovered=unrecovered,
            opened_at=now,
        )
        logger.info(
            "run_store_open path=%s schema_version=%d migrated=%s recovered=%d",
            store.path,
            SCHEMA_VERSION,
            ",".join(map(str, connection.migrated)) or "none",
            recovered,
        )
        if recovered:
            logger.warning(
                "run_store_crash_recovery interrupted=%d reason=%s", recovered, CRASH_RECOVERY
            )
        if unrecovered:
            logger.warning(
                "run_store_crash_recovery_deferred running=%d: the store refused the write"
                " (retried until it takes it)",
                len(unrecovered),
            )
        return store

    @property
    def unrecovered(self) -> int:
        """Runs a crash left ``running`` that the store could not mark at open."""
        return len(self._unrecovered)

    async def recover_deferred(self) -> int:
        """Mark the runs :attr:`unrecovered` at open as interrupted now (with
        the open's time); the number marked. Raises :class:`StoreWriteError`
        while the store still refuses."""
        if not self._unrecovered:
            return 0
        run_ids = tuple(self._unrecovered)
        recovered = await self._call(
            "recover", partial(mark_interrupted, run_ids=run_ids, now=self.opened_at), write=True
        )
        self._unrecovered.difference_update(run_ids)
        self.recovered += recovered
        logger.warning(
            "run_store_crash_recovery interrupted=%d reason=%s (deferred)",
            recovered,
            CRASH_RECOVERY,
        )
        return recovered

    @property
    def closed(self) -> bool:
        return self._connection.closed

    @property
    def close_timeout(self) -> float:
        return self._connection.close_timeout

    @property
    def write_failures(self) -> int:
        """Writes that failed (the store_write_failures metric)."""
        return self._connection.write_failures

    async def aclose(self) -> None:
        """Run the ``before_close`` hooks, stop taking calls, finish the ones
        already made, close.

        Shielded: completes even when the caller is cancelled. Bounded: the
        hooks by ``close_timeout``; then, after ``close_timeout``, the running
        statement is interrupted and calls still queued fail with a store error."""
        if self._connection.closing:
            await self._connection.wait_closed()
            return
        with trio.move_on_after(self.close_timeout, shield=True):
            for hook in self.before_close:
                try:
                    await hook()
                except Exception:
                    logger.exception("run_store_before_close_failed")
        await self._connection.aclose()

    # --- writes ------------------------------------------------------------

    async def insert_started(self, record: RunRecord, *, if_absent: bool = False) -> None:
        """Record a run that has just started (``status`` must be running).
        A row with the same run id is an error, or with ``if_absent`` left
        as it is (a retry of an insert whose outcome is not known)."""
        if record.ended:
            raise ValueError("insert_started takes a running record")
        values = to_row(record)
        sql = f"INSERT INTO runs ({COLUMNS}) VALUES ({', '.join('?' * len(values))})"
        if if_absent:
            sql += " ON CONFLICT (run_id) DO NOTHING"

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
            PROBE,
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
                raise NoRow(f"run {run_id} " + ("has no row" if found is None else "has ended"))

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
            with transaction(db):
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
                f"SELECT {COLUMNS} FROM runs WHERE principal = ? AND session_id = ?"
                " ORDER BY created_at DESC, rowid DESC LIMIT ?",
                (principal, session_id, limit),
            ).fetchall(),
            write=False,
        )
        return [to_record(row) for row in rows]

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
            lambda db: db.execute(f"SELECT {COLUMNS} FROM runs WHERE {where}", params).fetchone(),
            write=False,
        )
        return None if row is None else to_record(row)

    # --- the one way in ----------------------------------------------------

    async def _call(
        self, operation: str, fn: Callable[[sqlite3.Connection], T], *, write: bool
    ) -> T:
        return await self._connection.call(operation, fn, write=write)


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
