"""Lifecycle log lines, in the vocabulary kept from the old stream tracker.

One line per event on the ``server.lifecycle`` logger, ``name key=value ...``
as text; with ``--log-format json`` the same event as one JSON object (see
:mod:`server.logs`). The events, in supersede order:

* ``stream_cancelled trace=<run_id> reason=<cancel reason>``
* ``stream_end trace=<run_id> status=<status> events=<n> duration_ms=<n>``
* ``prev_stream_finished_cleanly session=<sid> trace=<old run_id> waited_ms=<n>``
* ``stream_start trace=<run_id> session=<sid>``

Cluster mode adds ``lease_handed_over session=<sid> to=<node> token=<n>``
(the owner's side of a cross-node supersede, after its
``prev_stream_finished_cleanly``) and ``lease_lost session=<sid>
token=<n> cause=<why>`` (its runs are then cancelled ``owner_lost``).

In cluster mode every line also names the node (``node=<id>``): the node
of the task that logs it (set by the session manager for its tasks), else
the process's (set once at start-up).
"""

from __future__ import annotations

import contextvars
import logging

from ..logs import log_event

logger = logging.getLogger("server.lifecycle")

# The node a task works for (several nodes share one process in tests).
current_node: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "current_node", default=None
)
_process_node: str | None = None


def set_process_node(node: str | None) -> None:
    """The node id of this process, for lines logged outside a node's tasks."""
    global _process_node
    _process_node = node


def lifecycle_event(name: str, **fields: object) -> None:
    node = current_node.get() or _process_node
    if node is not None:
        fields["node"] = node
    log_event(logger, name, **fields)
