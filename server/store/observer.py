"""The engine's :class:`~server.core.run.RunObserver`, backed by the run store.

The engine calls :meth:`StoreObserver.run_started` when a run starts (before
``run.started`` is published) and :meth:`StoreObserver.run_ended`, with the
run's :class:`~server.core.result.RunResult`, inside the run's shielded,
bounded cleanup, before the terminal event is published. A failed write is logged and
re-raised as :class:`StoreWriteError` (client-safe ``error_info``) for the
engine to report on the terminal event; :class:`trio.Cancelled` is never
caught.

A row whose insert did not happen (a store error, or cancelled while
waiting for its turn: a cancelled store call never ran) is inserted by the
retries below while the run goes on, or with its terminal status when it
ends; inserts that are retried leave an existing row as it is.

A terminal write that did not happen (the store was full, locked or
refused the write, or the cleanup budget ran out while it waited its turn,
as under heavy load) is kept and written again by :meth:`StoreObserver.serve`,
the observer's own task: it tries the oldest pending write every
:data:`RETRY_MIN_INTERVAL` seconds, doubling up to :data:`RETRY_MAX_INTERVAL`
while the store refuses, and at once after a run's own terminal write
succeeds (the store takes writes again); then it writes the rest, oldest
first (a write that failed for another reason does not hold up the rest).
:meth:`flush` tries all of them once more before the store closes. So
every run ends up in the store, with its real status, within
:data:`RETRY_MAX_INTERVAL` seconds of the store taking writes again (runs a
crash left ``running`` that the store could not mark at open, too).

A write the store refused for now (:attr:`StoreWriteError.transient`: disk
full, I/O error, locked) is kept until it lands; at most
:data:`MAX_PENDING_WRITES` writes and :data:`MAX_PENDING_CHARS` characters
of output are kept (beyond that the oldest is given up, logged).
A write that failed otherwise (no row to finish, a constraint, an
unexpected error) :data:`TERMINAL_WRITE_ATTEMPTS` times is given up
(logged; crash recovery marks the row at the next open). A write that was
cancelled before its turn never ran and does not count as an attempt.
"""

from __future__ import annotations

import logging

import attrs
import trio

from ..core.result import RunResult
from ..core.run import Run
from .records import RunRecord, StoreWriteError
from .sqlite import SqliteRunStore

logger = logging.getLogger(__name__)

# Failures of one terminal write, other than the store refusing for now,
# before it is given up (logged).
TERMINAL_WRITE_ATTEMPTS = 5
# Terminal writes kept while the store refuses them, and their output: a
# bound on memory.
MAX_PENDING_WRITES = 10_000
MAX_PENDING_CHARS = 64 * 1024 * 1024
# Seconds between retries while the store refuses (doubling from min to max).
RETRY_MIN_INTERVAL = 0.5
RETRY_MAX_INTERVAL = 10.0


@attrs.define(eq=False)
class StoreObserver:
    store: SqliteRunStore
    # Keep each run's prompt in its row (--store-prompts); off by default.
    store_prompts: bool = attrs.field(default=False, kw_only=True)
    # Started runs whose row is not in the store yet, by run id.
    _unrecorded: dict[str, RunRecord] = attrs.field(factory=dict, init=False)
    # Ended runs whose result is not in the store yet, oldest first ...
    _unfinished: dict[str, RunResult] = attrs.field(factory=dict, init=False)
    # ... how often a write of each failed (other than refused for now) ...
    _attempts: dict[str, int] = attrs.field(factory=dict, init=False)
    # ... and the characters of output they hold.
    _unfinished_chars: int = attrs.field(default=0, init=False)
    # Set when there is something to retry (renewed once there is not).
    _pending: trio.Event = attrs.field(factory=trio.Event, init=False)
    # Set when the store took a run's terminal write: retry now.
    _store_took_write: trio.Event = attrs.field(factory=trio.Event, init=False)
    _scope: trio.CancelScope = attrs.field(factory=trio.CancelScope, init=False)
    # Set when serve has returned (None: it never started).
    _served: trio.Event | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        self.store.before_close.append(self.flush)
        if self.store.unrecovered:
            self._pending.set()

    @property
    def unfinished(self) -> int:
        """Terminal writes waiting for the store to recover."""
        return len(self._unfinished)

    async def run_started(self, run: Run) -> None:
        record = RunRecord.started(
            run.result, prompt=run.request.prompt if self.store_prompts else None
        )
        try:
            await self.store.insert_started(record)
            self._unrecorded.pop(run.run_id, None)  # recorded after an earlier failure
        except StoreWriteError:
            logger.warning("run %s: start not recorded (retried)", run.run_id)
            self._unrecorded[run.run_id] = record
            self._wake_retries()
            raise
        except BaseException:
            # Cancelled before its turn: the insert did not run.
            self._unrecorded[run.run_id] = record
            self._wake_retries()
            raise

    async def run_ended(self, run: Run, result: RunResult) -> None:
        try:
            await self._write(result)
        except StoreWriteError as exc:
            logger.warning(
                "run %s: terminal status %s not recorded (retried later)",
                result.run_id,
                result.status.value,
            )
            self._keep(result, exc)
            raise
        except BaseException:
            # Cancelled (the cleanup budget ran out) before the write's turn.
            self._keep(result)
            raise
        self._attempts.pop(result.run_id, None)
        self._store_took_write.set()

    async def _write(self, result: RunResult) -> None:
        run_id = result.run_id
        try:
            start = self._unrecorded.get(run_id)
            if start is not None:
                # (The retry task may have inserted it meanwhile.)
                await self.store.insert_started(start, if_absent=True)
                if self._unrecorded.get(run_id) is start:
                    del self._unrecorded[run_id]  # done
            await self.store.finish(result)
        except Exception:
            # Any failure counts towards giving up (only a cancel before
            # the write's turn does not), so nothing is retried forever.
            self._attempts[run_id] = self._attempts.get(run_id, 0) + 1
            raise

    def _keep(self, result: RunResult, error: BaseException | None = None) -> None:
        refused_for_now = isinstance(error, StoreWriteError) and error.transient
        if not refused_for_now and self._attempts.get(result.run_id, 0) >= TERMINAL_WRITE_ATTEMPTS:
            self._give_up(result, "attempts")
            return
        self._unfinished[result.run_id] = result
        self._unfinished_chars += len(result.text)
        self._wake_retries()
        while (
            len(self._unfinished) > MAX_PENDING_WRITES or self._unfinished_chars > MAX_PENDING_CHARS
        ):
            self._give_up(self._take(next(iter(self._unfinished))), "too_many_pending")

    def _take(self, run_id: str) -> RunResult:
        result = self._unfinished.pop(run_id)
        self._unfinished_chars -= len(result.text)
        return result

    def _wake_retries(self) -> None:
        if not self._pending.is_set():
            # A success from before this refusal is no reason to retry at once.
            self._store_took_write = trio.Event()
            self._pending.set()

    def _give_up(self, result: RunResult, reason: str) -> None:
        attempts = self._attempts.get(result.run_id, 0)
        self._forget(result.run_id)
        logger.error(
            "run_store_gave_up run=%s status=%s attempts=%d reason=%s",
            result.run_id,
            result.status.value,
            attempts,
            reason,
        )

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Retry pending writes until :meth:`stop` or the store closes (see
        the module docstring). Start it with ``nursery.start(observer.serve)``."""
        interval = RETRY_MIN_INTERVAL
        self._served = served = trio.Event()
        try:
            with self._scope:
                task_status.started()
                while True:
                    await self._pending.wait()
                    with trio.move_on_after(interval):
                        await self._store_took_write.wait()
                    self._store_took_write = trio.Event()
                    if await self._retry_pending():
                        interval = RETRY_MIN_INTERVAL
                    else:
                        interval = min(2 * interval, RETRY_MAX_INTERVAL)
        finally:
            served.set()

    def stop(self) -> None:
        self._scope.cancel()

    def _forget(self, run_id: str) -> None:
        self._unrecorded.pop(run_id, None)
        if run_id in self._unfinished:
            self._take(run_id)
        self._attempts.pop(run_id, None)

    async def flush(self) -> None:
        """Land every pending write (the store calls this before it closes,
        after the runs have ended); :meth:`serve` ends here first, so one
        task at a time writes them. Bounded by the store's close timeout."""
        self.stop()
        if self._served is not None:
            await self._served.wait()  # its store call in flight, at most
        await self._retry_pending()
        if self._unfinished:
            logger.error("run_store_unfinished count=%d", len(self._unfinished))

    async def _retry_pending(self) -> bool:
        """Deferred crash recovery, starts of live runs, then terminal
        writes kept earlier, oldest first; each once, stopping at the first
        the store refuses for now. True if nothing is left pending."""
        if self.store.unrecovered:
            try:
                await self.store.recover_deferred()
            except StoreWriteError as exc:
                logger.warning("run_store_recovery_pending: %r", exc)
                return False
        for run_id, record in list(self._unrecorded.items()):
            if self._unrecorded.get(run_id) is not record:
                continue  # ended or discarded meanwhile
            try:
                await self.store.insert_started(record, if_absent=True)
            except StoreWriteError as exc:
                if exc.transient:
                    return False
                # It never will; its run's end finds no row and gives up.
                logger.error("run_store_gave_up run=%s status=running reason=%r", run_id, exc)
            if self._unrecorded.get(run_id) is record:
                del self._unrecorded[run_id]
        for run_id in list(self._unfinished):
            if run_id not in self._unfinished:
                continue  # discarded meanwhile
            result = self._take(run_id)
            try:
                await self._write(result)
            except Exception as exc:
                # Not a run's own write: its failure stays with its own run.
                logger.warning("run %s: terminal status still not recorded: %r", result.run_id, exc)
                self._keep(result, exc)
                if isinstance(exc, StoreWriteError) and exc.transient:
                    return False
                continue
            except BaseException:
                self._keep(result)
                raise
            logger.info(
                "run_store_recovered run=%s status=%s attempts=%d",
                result.run_id,
                result.status.value,
                self._attempts.pop(result.run_id, 0),
            )
        if self._unfinished or self._unrecorded or self.store.unrecovered:
            return False
        self._pending = trio.Event()
        return True

    async def run_discarded(self, run: Run) -> None:
        """``rollback``: the superseded run's record and output go."""
        self._forget(run.run_id)
        await self.store.delete(run.run_id)
