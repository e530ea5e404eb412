"""The run store's schema and its migrations.

Rule 1: the schema version is SQLite's ``PRAGMA user_version``; version N is
the database after ``MIGRATIONS[:N]``.

Rule 2: a migration is only ever appended, never edited: a database at
version N must reach N+1 the same way on every machine.

Rule 3: each migration runs in one transaction together with its
``user_version`` bump, so a crash leaves the database at the old version or
the new one, never in between.

Rule 4: a database newer than this code is refused, not guessed at.

Synchronous on purpose: the store calls :func:`migrate` from its worker
thread, never from the trio thread.
"""

from __future__ import annotations

import sqlite3

_STATUSES = "'running', 'completed', 'cancelled', 'interrupted', 'failed'"
_REASONS_V1 = (
    "'superseded', 'client_stop', 'client_disconnect', 'shutdown', 'deadline', 'crash_recovery'"
)
# Version 3 adds cluster mode's reason (a node that lost a session's lease).
_REASONS = f"{_REASONS_V1}, 'owner_lost'"


def _runs_table(name: str, reasons: str) -> str:
    """The runs table as of version 3 (prompt nullable), with ``reasons`` allowed."""
    return f"""
    CREATE TABLE {name} (
        run_id            TEXT PRIMARY KEY NOT NULL,
        principal         TEXT NOT NULL,
        session_id        TEXT NOT NULL,
        prompt            TEXT,
        agent             TEXT NOT NULL,
        status            TEXT NOT NULL CHECK (status IN ({_STATUSES})),
        cancel_reason     TEXT CHECK (cancel_reason IN ({reasons})),
        output_text       TEXT NOT NULL DEFAULT '',
        prompt_tokens     INTEGER CHECK (prompt_tokens >= 0),
        completion_tokens INTEGER CHECK (completion_tokens >= 0),
        created_at        REAL NOT NULL,
        finished_at       REAL,
        error_code        TEXT,
        error_message     TEXT,
        CHECK ((status = 'running') = (finished_at IS NULL)),
        CHECK (cancel_reason IS NULL OR status IN ('cancelled', 'interrupted')),
        CHECK ((prompt_tokens IS NULL) = (completion_tokens IS NULL)),
        CHECK ((error_code IS NULL) = (error_message IS NULL))
    )
    """


# Version 1: the runs table. The CHECKs mirror RunRecord's validation.
_V1 = (
    f"""
    CREATE TABLE runs (
        run_id            TEXT PRIMARY KEY NOT NULL,
        principal         TEXT NOT NULL,
        session_id        TEXT NOT NULL,
        prompt            TEXT NOT NULL,
        agent             TEXT NOT NULL,
        status            TEXT NOT NULL CHECK (status IN ({_STATUSES})),
        cancel_reason     TEXT CHECK (cancel_reason IN ({_REASONS_V1})),
        output_text       TEXT NOT NULL DEFAULT '',
        prompt_tokens     INTEGER CHECK (prompt_tokens >= 0),
        completion_tokens INTEGER CHECK (completion_tokens >= 0),
        created_at        REAL NOT NULL,
        finished_at       REAL,
        error_code        TEXT,
        error_message     TEXT,
        CHECK ((status = 'running') = (finished_at IS NULL)),
        CHECK (cancel_reason IS NULL OR status IN ('cancelled', 'interrupted')),
        CHECK ((prompt_tokens IS NULL) = (completion_tokens IS NULL)),
        CHECK ((error_code IS NULL) = (error_message IS NULL))
    )
    """,
    # GET /v1/sessions/{sid}: a principal's session, newest first.
    "CREATE INDEX runs_by_session ON runs (principal, session_id, created_at)",
    # Crash recovery (finished_at IS NULL) and retention (oldest ended first).
    "CREATE INDEX runs_by_finish ON runs (finished_at)",
)

# Version 2: ``prompt`` may be NULL: prompts are not stored unless the
# operator asks (--store-prompts). SQLite cannot drop a NOT NULL, so the
# table is rebuilt (the documented ALTER TABLE procedure); prompts already
# stored are kept as they are (docs/operations.md says how to clear them).
_V2 = (
    f"""
    CREATE TABLE runs_v2 (
        run_id            TEXT PRIMARY KEY NOT NULL,
        principal         TEXT NOT NULL,
        session_id        TEXT NOT NULL,
        prompt            TEXT,
        agent             TEXT NOT NULL,
        status            TEXT NOT NULL CHECK (status IN ({_STATUSES})),
        cancel_reason     TEXT CHECK (cancel_reason IN ({_REASONS_V1})),
        output_text       TEXT NOT NULL DEFAULT '',
        prompt_tokens     INTEGER CHECK (prompt_tokens >= 0),
        completion_tokens INTEGER CHECK (completion_tokens >= 0),
        created_at        REAL NOT NULL,
        finished_at       REAL,
        error_code        TEXT,
        error_message     TEXT,
        CHECK ((status = 'running') = (finished_at IS NULL)),
        CHECK (cancel_reason IS NULL OR status IN ('cancelled', 'interrupted')),
        CHECK ((prompt_tokens IS NULL) = (completion_tokens IS NULL)),
        CHECK ((error_code IS NULL) = (error_message IS NULL))
    )
    """,
    "INSERT INTO runs_v2 SELECT * FROM runs",
    "DROP TABLE runs",
    "ALTER TABLE runs_v2 RENAME TO runs",
    *_V1[1:],
)

# Version 3: ``cancel_reason`` may be ``owner_lost`` (cluster mode, issue 12):
# without it a node could not record a run it stopped because it lost the
# session's lease, and the run stayed ``running`` in its archive. The CHECK
# is part of the table, so the table is rebuilt as in version 2.
_V3 = (
    _runs_table("runs_v3", _REASONS),
    "INSERT INTO runs_v3 SELECT * FROM runs",
    "DROP TABLE runs",
    "ALTER TABLE runs_v3 RENAME TO runs",
    *_V1[1:],
)

MIGRATIONS: tuple[tuple[str, ...], ...] = (_V1, _V2, _V3)
SCHEMA_VERSION = len(MIGRATIONS)


class SchemaTooNew(Exception):
    def __init__(self, found: int) -> None:
        super().__init__(f"database schema version {found} is newer than {SCHEMA_VERSION}")
        self.found = found


def schema_version(connection: sqlite3.Connection) -> int:
    version: int = connection.execute("PRAGMA user_version").fetchone()[0]
    return version


def migrate(connection: sqlite3.Connection) -> list[int]:
    """Bring the database to :data:`SCHEMA_VERSION`; return the versions
    applied (empty when it was current). The connection must be in autocommit
    mode (``isolation_level=None``): transactions here are explicit."""
    applied: list[int] = []
    while True:
        # BEGIN IMMEDIATE takes the write lock before reading the version,
        # so two openers cannot both apply the same step.
        connection.execute("BEGIN IMMEDIATE")
        try:
            current = schema_version(connection)
            if current > SCHEMA_VERSION:
                raise SchemaTooNew(current)
            if current == SCHEMA_VERSION:
                connection.execute("COMMIT")
                return applied
            for statement in MIGRATIONS[current]:
                connection.execute(statement)
            # PRAGMA takes no parameters; the value is our own int.
            connection.execute(f"PRAGMA user_version = {current + 1:d}")
            connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise
        applied.append(current + 1)
