"""The run store's machinery: one SQLite connection, the worker thread its
calls run in, and the lock on the data directory. What the calls do (the
SQL, rows and records) is :mod:`.sqlite`'s business.

Threading: the trio thread never touches SQLite. There is ONE connection
(``check_same_thread=False``) and ONE :class:`trio.CapacityLimiter` of 1;
every call is ``trio.to_thread.run_sync(..., limiter=that limiter)``. So
calls run one at a time, in the order they were made: the limiter is taken
without a schedule point when free and handed over first-in, first-out when
not, and nothing awaits before it in :meth:`StoreConnection.call`.

Cancellation: a call still waiting for its turn is cancelled at once. A
call that is running in its thread is waited for (``abandon_on_cancel``
stays False), so its outcome is always known and no thread outlives the
call; SQLite's ``busy_timeout`` bounds how long it can wait on a lock, so
keep it below the cleanup budget.

Resource handling: :meth:`StoreConnection.open` creates the data directory,
takes an exclusive lock on it (crash recovery is only right if no other
live process writes this database), opens the connection in WAL mode and
migrates the schema. :meth:`~StoreConnection.aclose` stops taking calls,
lets the ones already made finish (for up to ``close_timeout``; after that
the running statement is interrupted, a lock wait ends within
``busy_timeout`` and the queued calls fail), closes the connection and
releases the lock. No store thread outlives ``aclose``.

Error handling: any SQLite failure is logged with its real text and raised
as :class:`StoreWriteError` or :class:`StoreReadError`, whose message is
client-safe. The connection runs in autocommit mode; multi-statement writes
are explicit :func:`transaction` blocks that roll back on failure, so one
failed call leaves the store usable for the next.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import TypeVar

import attrs
import trio

from .records import StoreError, StoreOpenError, StoreReadError, StoreWriteError
from .schema import SchemaTooNew, migrate

# One logger name for all of the store's lines, as before the split.
logger = logging.getLogger("server.store.sqlite")

DB_FILE = "runs.sqlite3"
LOCK_FILE = "runs.sqlite3.lock"
# The name a worker thread carries while it runs a store call.
THREAD_NAME = "run-store"

T = TypeVar("T")


class NoRow(Exception):
    """A write found no row to change (raised in a call, caught by
    :meth:`StoreConnection.call`)."""


class _Closing(Exception):
    """The store gave up on queued calls while closing."""


@attrs.define(eq=False)
class StoreConnection:
    """The one connection and the one way in. Make it with :meth:`open`."""

    path: Path
    close_timeout: float
    _connection: sqlite3.Connection = attrs.field(alias="connection")
    _lock_fd: int | None = attrs.field(alias="lock_fd")
    # Migrations applied at open.
    migrated: list[int] = attrs.field(factory=list)
    _limiter: trio.CapacityLimiter = attrs.field(
        factory=lambda: trio.CapacityLimiter(1), init=False
    )
    closing: bool = attrs.field(default=False, init=False)
    # Read from worker threads: queued calls fail instead of running.
    _abandon_queue: bool = attrs.field(default=False, init=False)
    _closed: trio.Event = attrs.field(factory=trio.Event, init=False)
    # Writes that failed (the store_write_failures metric).
    write_failures: int = attrs.field(default=0, init=False)

    @classmethod
    async def open(
        cls,
        data_dir: Path,
        prepare: Callable[[sqlite3.Connection], T],
        *,
        busy_timeout: float,
        close_timeout: float,
    ) -> tuple[StoreConnection, T]:
        """Directory, lock, connection, pragmas, migrations, then
        ``prepare(connection)`` (all in a worker thread); the connection and
        what ``prepare`` returned. Raises :class:`StoreOpenError` with an
        operator-readable reason, having released everything it took."""
        connection, lock_fd, applied, prepared = await trio.to_thread.run_sync(
            partial(_open_sync, data_dir, prepare, busy_timeout=busy_timeout),
            thread_name=THREAD_NAME,
        )
        store = cls(
            path=data_dir / DB_FILE,
            close_timeout=close_timeout,
            connection=connection,
            lock_fd=lock_fd,
            migrated=applied,
        )
        return store, prepared

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def call(
        self, operation: str, fn: Callable[[sqlite3.Connection], T], *, write: bool
    ) -> T:
        """Run ``fn(connection)`` in the store's thread, in turn."""
        # No await before to_thread.run_sync: the order of calls is the
        # order they reach the limiter.
        failure: type[StoreError] = StoreWriteError if write else StoreReadError
        if self.closing:
            logger.error("run_store_failed op=%s error=store closed", operation)
            self.write_failures += write
            raise failure(operation)
        try:
            return await trio.to_thread.run_sync(
                self._in_thread, fn, limiter=self._limiter, thread_name=THREAD_NAME
            )
        except (sqlite3.Error, NoRow, _Closing) as exc:
            logger.error("run_store_failed op=%s error=%r", operation, exc)
            self.write_failures += write
            # OperationalError: full, I/O, locked, busy; worth another try.
            transient = isinstance(exc, sqlite3.OperationalError) and not self.closing
            raise failure(operation, transient=transient) from exc

    def _in_thread(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._abandon_queue:
            raise _Closing("store closed before this call ran")
        return fn(self._connection)

    async def aclose(self) -> None:
        """Stop taking calls, finish the ones already made, close.

        Shielded: completes even when the caller is cancelled. Bounded: after
        ``close_timeout`` the running statement is interrupted and calls still
        queued fail with a store error."""
        if self.closing:
            await self._closed.wait()
            return
        self.closing = True
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
            _unlock(self._lock_fd)
            self._lock_fd = None


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[None]:
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _open_sync(
    data_dir: Path, prepare: Callable[[sqlite3.Connection], T], *, busy_timeout: float
) -> tuple[sqlite3.Connection, int | None, list[int], T]:
    """On any failure, release what was taken and raise :class:`StoreOpenError`."""
    database = data_dir / DB_FILE
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        lock_fd = _lock_data_dir(data_dir)
    except OSError as exc:
        reason = f"cannot use data directory {data_dir}{_full_disk_hint(data_dir)}: {exc}"
        raise StoreOpenError("open", reason) from exc
    try:
        connection = sqlite3.connect(database, check_same_thread=False, isolation_level=None)
        try:
            connection.execute(f"PRAGMA busy_timeout = {round(busy_timeout * 1000):d}")
            mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                logger.warning("run_store_journal_mode mode=%s (WAL not available here)", mode)
            connection.execute("PRAGMA synchronous = NORMAL")
            applied = migrate(connection)
            prepared = prepare(connection)
        except BaseException:
            connection.close()
            raise
    except SchemaTooNew as exc:
        _unlock(lock_fd)
        raise StoreOpenError("open", f"{database} was written by a newer server ({exc})") from exc
    except sqlite3.Error as exc:
        _unlock(lock_fd)
        reason = f"cannot open {database}{_full_disk_hint(data_dir)}: {exc}"
        raise StoreOpenError("open", reason) from exc
    except BaseException:
        _unlock(lock_fd)
        raise
    return connection, lock_fd, applied, prepared


def _full_disk_hint(data_dir: Path) -> str:
    """Say so when the disk is full: SQLite reports it as "database or disk
    is full" or, for the WAL index, as an I/O error."""
    try:
        stats = os.statvfs(data_dir)
    except (OSError, AttributeError):  # (no statvfs on Windows)
        return ""
    return " (the disk is full)" if stats.f_bavail == 0 else ""


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
