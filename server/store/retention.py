"""Retention of ended runs: a loop that prunes the store now and then.

Start it with ``nursery.start(Retention(store=store).serve)`` in a nursery
that ends before the store is closed; it reports started after its first
prune and ends only when cancelled. A failed prune is logged and tried again
next interval: retention is housekeeping, never a reason to stop serving.
"""

from __future__ import annotations

import logging

import attrs
import trio

from .records import StoreError
from .sqlite import SqliteRunStore

logger = logging.getLogger(__name__)


def _non_negative(instance: object, attribute: object, value: float | None) -> None:
    if value is not None and value < 0:
        raise ValueError("max_age must be >= 0")


@attrs.define(kw_only=True)
class Retention:
    store: SqliteRunStore
    # Ended runs kept, most recently finished first.
    keep_last: int = attrs.field(default=10_000, validator=attrs.validators.ge(0))
    # Seconds an ended run is kept; None: no age limit.
    max_age: float | None = attrs.field(default=7 * 24 * 3600.0, validator=_non_negative)
    # Seconds between prunes.
    interval: float = attrs.field(default=600.0, validator=attrs.validators.gt(0))
    _scope: trio.CancelScope = attrs.field(factory=trio.CancelScope, init=False)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Prune now and every ``interval`` until :meth:`stop`."""
        started = False
        with self._scope:
            while True:
                try:
                    await self.store.prune(keep_last=self.keep_last, older_than=self.max_age)
                except StoreError:
                    logger.warning("run_store_retention_failed: trying again in %ss", self.interval)
                if not started:
                    task_status.started()
                    started = True
                await trio.sleep(self.interval)

    def stop(self) -> None:
        self._scope.cancel()
