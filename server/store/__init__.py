"""The run store: every run recorded (who, what, how it ended, what it said).

Embedded default: SQLite in the data directory (:mod:`.sqlite`), written
from worker threads, one call at a time. The engine reaches it through
:class:`StoreObserver`; the HTTP edge reads it for ``GET /v1/runs/{id}`` and
``GET /v1/sessions/{sid}``.
"""

from .observer import StoreObserver as StoreObserver
from .records import CRASH_RECOVERY as CRASH_RECOVERY
from .records import STORED_CANCEL_REASONS as STORED_CANCEL_REASONS
from .records import RunRecord as RunRecord
from .records import StoreError as StoreError
from .records import StoreOpenError as StoreOpenError
from .records import StoreReadError as StoreReadError
from .records import StoreWriteError as StoreWriteError
from .retention import Retention as Retention
from .schema import SCHEMA_VERSION as SCHEMA_VERSION
from .sqlite import SqliteRunStore as SqliteRunStore
from .sqlite import open_sqlite_store as open_sqlite_store
