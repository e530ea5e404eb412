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
"""

from __future__ import annotations

import logging

import attrs

from ..core.events import RunStatus
from ..core.run import Run
from .records import RunRecord, StoreWriteError
from .sqlite import SqliteRunStore

logger = logging.getLogger(__name__)


@attrs.define(eq=False)
class StoreObserver:
    store: SqliteRunStore
    # Started runs whose row is not in the store yet, by run id.
    _unrecorded: dict[str, RunRecord] = attrs.field(factory=dict, init=False)

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
        record = self._unrecorded.pop(run.run_id, None)
        try:
            if record is not None:
                await self.store.insert_started(record)
            error = run.error
            await self.store.finish(
                run.run_id,
                status=status,
                cancel_reason=(
                    run.cancel_reason
                    if status in (RunStatus.CANCELLED, RunStatus.INTERRUPTED)
                    else None
                ),
                text=run.text,
                usage=run.usage,
                error_code=None if error is None else error.code,
                error_message=None if error is None else error.message,
            )
        except StoreWriteError:
            logger.warning("run %s: terminal status %s not recorded", run.run_id, status.value)
            raise

    async def run_discarded(self, run: Run) -> None:
        """``rollback``: the superseded run's record and output go."""
        self._unrecorded.pop(run.run_id, None)
        await self.store.delete(run.run_id)
