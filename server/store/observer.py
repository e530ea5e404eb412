"""The engine's :class:`~server.core.run.RunObserver`, backed by the run store.

The engine calls :meth:`StoreObserver.run_started` when a run starts and
:meth:`StoreObserver.run_ended` inside the run's shielded, bounded cleanup,
before the terminal event is published. A failed write is logged and
re-raised as :class:`StoreWriteError` (client-safe ``error_info``) for the
engine to report on the terminal event; :class:`trio.Cancelled` is never
caught.

A row whose insert did not happen (a store error, or cancelled while
waiting for its turn: a cancelled store call never ran) is inserted when
the run ends, so the terminal status still lands if the store recovered.

A terminal write that did not happen (the store was locked or refused the
write, or the cleanup budget ran out while it waited its turn, as under
heavy load) is kept and written again after a later run's terminal write
succeeds, a few at a time, and all of them before the store closes, so a
run does not stay ``running`` in the store once the store has recovered. A
write the store refuses :data:`TERMINAL_WRITE_ATTEMPTS` times is given up
(logged; crash recovery marks the row at the next open); a write that was
cancelled before its turn never ran and does not count as an attempt.
"""

from __future__ import annotations

import logging

import attrs

from ..core.events import CancelReason, ErrorInfo, RunStatus, Usage
from ..core.run import Run
from .records import RunRecord, StoreWriteError
from .sqlite import SqliteRunStore

logger = logging.getLogger(__name__)

# Refusals of one terminal write by the store before it is given up (logged).
TERMINAL_WRITE_ATTEMPTS = 5
# Earlier failed terminal writes retried after each successful one: a bound
# on the extra work one run's cleanup takes on.
RETRIES_PER_RUN_END = 8


@attrs.define(eq=False)
class _TerminalWrite:
    """A run's terminal status, as it is to be written."""

    run_id: str
    # The row to insert first, while its start is not in the store.
    start: RunRecord | None
    status: RunStatus
    cancel_reason: CancelReason | None
    text: str
    usage: Usage | None
    error: ErrorInfo | None
    finished_at: float
    attempts: int = 0


@attrs.define(eq=False)
class StoreObserver:
    store: SqliteRunStore
    # Started runs whose row is not in the store yet, by run id.
    _unrecorded: dict[str, RunRecord] = attrs.field(factory=dict, init=False)
    # Ended runs whose terminal status is not in the store yet, oldest first.
    _unfinished: dict[str, _TerminalWrite] = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        self.store.before_close.append(self.flush)

    @property
    def unfinished(self) -> int:
        """Terminal writes waiting for the store to recover."""
        return len(self._unfinished)

    async def run_started(self, run: Run) -> None:
        record = RunRecord(
            run_id=run.run_id,
            principal=run.principal,
            session_id=run.session_id,
            prompt=run.request.prompt,
            agent=run.agent.name,
            status=RunStatus.RUNNING,
            created_at=self.store.clock(),
        )
        try:
            await self.store.insert_started(record)
            self._unrecorded.pop(run.run_id, None)  # recorded after an earlier failure
        except StoreWriteError:
            logger.warning("run %s: start not recorded (retried when it ends)", run.run_id)
            self._unrecorded[run.run_id] = record
            raise
        except BaseException:
            # Cancelled before its turn: the insert did not run.
            self._unrecorded[run.run_id] = record
            raise

    async def run_ended(self, run: Run, status: RunStatus) -> None:
        write = _TerminalWrite(
            run_id=run.run_id,
            start=self._unrecorded.pop(run.run_id, None),
            status=status,
            cancel_reason=(
                run.cancel_reason
                if status in (RunStatus.CANCELLED, RunStatus.INTERRUPTED)
                else None
            ),
            text=run.text,
            usage=run.usage,
            error=run.error,
            finished_at=self.store.clock(),
        )
        try:
            await self._write(write)
        except StoreWriteError:
            logger.warning(
                "run %s: terminal status %s not recorded (retried later)", run.run_id, status.value
            )
            self._keep(write)
            raise
        except BaseException:
            # Cancelled (the cleanup budget ran out) before the write's turn.
            self._keep(write)
            raise
        await self._retry_unfinished()

    async def _write(self, write: _TerminalWrite) -> None:
        try:
            if write.start is not None:
                await self.store.insert_started(write.start)
                write.start = None  # done: a retry must not insert it twice
            await self._finish(write)
        except Exception:
            # Any failure counts towards giving up (only a cancel before
            # the write's turn does not), so nothing is retried forever.
            write.attempts += 1
            raise

    async def _finish(self, write: _TerminalWrite) -> None:
        await self.store.finish(
            write.run_id,
            status=write.status,
            cancel_reason=write.cancel_reason,
            text=write.text,
            usage=write.usage,
            error_code=None if write.error is None else write.error.code,
            error_message=None if write.error is None else write.error.message,
            finished_at=write.finished_at,
        )

    def _keep(self, write: _TerminalWrite) -> None:
        if write.attempts < TERMINAL_WRITE_ATTEMPTS:
            self._unfinished[write.run_id] = write
        else:
            logger.error(
                "run_store_gave_up run=%s status=%s attempts=%d",
                write.run_id,
                write.status.value,
                write.attempts,
            )

    async def flush(self) -> None:
        """Land every pending terminal write (the store calls this before it
        closes, after the runs have ended)."""
        await self._retry_unfinished(len(self._unfinished))
        if self._unfinished:
            logger.error("run_store_unfinished count=%d", len(self._unfinished))

    async def _retry_unfinished(self, limit: int = RETRIES_PER_RUN_END) -> None:
        """The store has just taken a write: land terminal writes it refused
        earlier, oldest first, up to ``limit``; stop at the first that fails."""
        for _ in range(limit):
            if not self._unfinished:  # (other run ends retry concurrently)
                return
            write = self._unfinished.pop(next(iter(self._unfinished)))
            try:
                await self._write(write)
            except Exception as exc:
                # Not this run's write: its failure stays with its own run.
                logger.warning("run %s: terminal status still not recorded: %r", write.run_id, exc)
                self._keep(write)
                return
            except BaseException:
                self._keep(write)
                raise
            logger.info(
                "run_store_recovered run=%s status=%s attempts=%d",
                write.run_id,
                write.status.value,
                write.attempts,
            )

    async def run_discarded(self, run: Run) -> None:
        """``rollback``: the superseded run's record and output go."""
        self._unrecorded.pop(run.run_id, None)
        self._unfinished.pop(run.run_id, None)
        await self.store.delete(run.run_id)
