"""Lifecycle log lines, in the vocabulary kept from the old stream tracker.

One line per event, ``name key=value ...``; the structured fields also ride
on the record (``record.lifecycle``, ``record.fields``) for formatters that
want them.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("server.lifecycle")


def lifecycle_event(name: str, **fields: object) -> None:
    text = " ".join(f"{key}={value}" for key, value in fields.items())
    logger.info("%s %s", name, text, extra={"lifecycle": name, "fields": fields})
