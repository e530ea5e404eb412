"""Lifecycle log lines, in the vocabulary kept from the old stream tracker.

One line per event on the ``server.lifecycle`` logger, ``name key=value ...``
as text; with ``--log-format json`` the same event as one JSON object (see
:mod:`server.logs`). The events, in supersede order:

* ``stream_cancelled trace=<run_id> reason=<cancel reason>``
* ``stream_end trace=<run_id> status=<status> events=<n> duration_ms=<n>``
* ``prev_stream_finished_cleanly session=<sid> trace=<old run_id> waited_ms=<n>``
* ``stream_start trace=<run_id> session=<sid>``
"""

from __future__ import annotations

import logging

from ..logs import log_event

logger = logging.getLogger("server.lifecycle")


def lifecycle_event(name: str, **fields: object) -> None:
    log_event(logger, name, **fields)
