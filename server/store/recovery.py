"""Crash recovery: runs a dead process left ``running`` become
``interrupted`` / ``crash_recovery``. Only right while no other live
process writes the database (the store holds the data directory's lock).

Synchronous: these run in the store's worker thread.
"""

from __future__ import annotations

import logging
import sqlite3

from .connection import transaction
from .records import CRASH_RECOVERY

logger = logging.getLogger("server.store.sqlite")


def recover_at_open(db: sqlite3.Connection, *, now: float) -> tuple[int, set[str]]:
    """Mark the runs a crash left ``running`` as interrupted; if the store
    refuses the write (a full disk), read which they are instead, so the
    store still opens (reads work) and marks them once it takes writes."""
    try:
        rowcount: int = db.execute(
            "UPDATE runs SET status = 'interrupted', cancel_reason = ?, finished_at = ?"
            " WHERE finished_at IS NULL AND status = 'running'",
            (CRASH_RECOVERY, now),
        ).rowcount
    except sqlite3.OperationalError as exc:
        logger.error("run_store_failed op=recover error=%r", exc)
        rows = db.execute("SELECT run_id FROM runs WHERE status = 'running'").fetchall()
        return 0, {run_id for (run_id,) in rows}
    return rowcount, set()


def mark_interrupted(db: sqlite3.Connection, *, run_ids: tuple[str, ...], now: float) -> int:
    marked = 0
    with transaction(db):
        for run_id in run_ids:
            marked += db.execute(
                "UPDATE runs SET status = 'interrupted', cancel_reason = ?, finished_at = ?"
                " WHERE run_id = ? AND status = 'running'",
                (CRASH_RECOVERY, now, run_id),
            ).rowcount
    return marked
