"""The engine's :class:`~server.core.run.RunObserver`, backed by the run store.

The engine calls :meth:`StoreObserver.run_started` when a run starts (before
``run.started`` is published) and :meth:`StoreObserver.run_ended`, with the
run's :class:`~server.core.result.RunResult`, inside the run's shielded,
bounded cleanup, before the terminal event is published. A failed write is logged and
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

from ..core.result import RunResult
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
class StoreObserver:
    store: SqliteRunStore
    # Started runs whose row is not in the store yet, by run id.
    _unrecorded: dict[str, RunRecord] = attrs.field(factory=dict, init=False)
    # Ended runs whose result is not in the store yet, oldest first ...
    _unfinished: dict[str, RunResult] = attrs.field(factory=dict, init=False)
    # ... and how often the store refused each terminal write.
    _attempts: dict[str, int] = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        self.store.before_close.append(self.flush)

    @property
    def unfinished(self) -> int:
        """Terminal writes waiting for the store to recover."""
        return len(self._unfinished)

    async def run_started(self, run: Run) -> None:
        record = RunRecord.started(run.result, prompt=run.request.prompt)
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

    async def run_ended(self, run: Run, result: RunResult) -> None:
        try:
            await self._write(result)
        except StoreWriteError:
            logger.warning(
                "run %s: terminal status %s not recorded (retried later)",
                result.run_id,
                result.status.value,
            )
            self._keep(result)
            raise
        except BaseException:
            # Cancelled (the cleanup budget ran out) before the write's turn.
            self._keep(result)
            raise
        self._attempts.pop(result.run_id, None)
        await self._retry_unfinished()

    async def _write(self, result: RunResult) -> None:
        run_id = result.run_id
        try:
            start = self._unrecorded.get(run_id)
            if start is not None:
                await self.store.insert_started(start)
                del self._unrecorded[run_id]  # done: a retry must not insert it twice
            await self.store.finish(result)
        except Exception:
            # Any failure counts towards giving up (only a cancel before
            # the write's turn does not), so nothing is retried forever.
            self._attempts[run_id] = self._attempts.get(run_id, 0) + 1
            raise

    def _keep(self, result: RunResult) -> None:
        attempts = self._attempts.get(result.run_id, 0)
        if attempts < TERMINAL_WRITE_ATTEMPTS:
            self._unfinished[result.run_id] = result
        else:
            self._forget(result.run_id)
            logger.error(
                "run_store_gave_up run=%s status=%s attempts=%d",
                result.run_id,
                result.status.value,
                attempts,
            )

    def _forget(self, run_id: str) -> None:
        self._unrecorded.pop(run_id, None)
        self._unfinished.pop(run_id, None)
        self._attempts.pop(run_id, None)

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
            result = self._unfinished.pop(next(iter(self._unfinished)))
            try:
                await self._write(result)
            except Exception as exc:
                # Not this run's write: its failure stays with its own run.
                logger.warning("run %s: terminal status still not recorded: %r", result.run_id, exc)
                self._keep(result)
                return
            except BaseException:
                self._keep(result)
                raise
            logger.info(
                "run_store_recovered run=%s status=%s attempts=%d",
                result.run_id,
                result.status.value,
                self._attempts.pop(result.run_id, 0),
            )

    async def run_discarded(self, run: Run) -> None:
        """``rollback``: the superseded run's record and output go."""
        self._forget(run.run_id)
        await self.store.delete(run.run_id)
