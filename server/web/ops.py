"""Operational endpoints: liveness, readiness, and the task tree.

* ``GET /healthz``: the process is alive (200).
* ``GET /readyz``: accepting runs (200), or starting/draining, or (cluster
  mode) Redis unreachable: ``coordinator_unavailable`` (503 with ``Retry-After``).
* ``GET /debug/tasks``: the trio task tree, thread count and each session's
  state and current run; only with ``Authorization: Bearer <--admin-key>``,
  and 404 when no admin key is configured (off by default). It names
  sessions and principals, hence the key.

``GET /metrics`` lives in :mod:`server.web.metrics`.
"""

from __future__ import annotations

import hmac
import threading
from typing import Any

import trio
from quart import Response, jsonify, request
from quart_trio import QuartTrio

from ..core.run import Run
from .auth import bearer_token
from .errors import ApiError
from .state import AppState
from .tasktree import count_tasks, task_tree


def run_state(run: Run) -> dict[str, Any]:
    """What a stuck-stream investigation asks of a run."""
    now = trio.current_time()
    return {
        "id": run.run_id,
        "state": run.state.value,
        "status": run.status.value,
        "cancel_reason": None if run.cancel_reason is None else run.cancel_reason.value,
        "supersedes": run.supersedes,
        "events": len(run.log),
        "subscribers": run.subscriber_count,
        "running_s": None if run.started_at is None else round(now - run.started_at, 3),
        "since_last_delta_s": None
        if run.last_delta_at is None
        else round(now - run.last_delta_at, 3),
    }


def lease_json(lease: tuple[str, int] | None) -> dict[str, Any] | None:
    """A session's lease for /debug/tasks (None: not held, e.g. still acquiring)."""
    return None if lease is None else {"node": lease[0], "token": lease[1]}


def install_ops_routes(app: QuartTrio, state: AppState) -> None:
    @app.get("/healthz")
    async def healthz() -> Response:  # noqa: ASYNC124
        return jsonify({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> Response:  # noqa: ASYNC124
        manager = state.manager
        if manager is None or manager.draining:
            status = "starting" if manager is None else "draining"
            raise ApiError(
                503, status, f"Not accepting runs: {status}.", headers={"Retry-After": "5"}
            )
        if state.cluster is not None and not state.cluster.metrics.reachable:
            raise ApiError(
                503,
                "coordinator_unavailable",
                "Not accepting runs: the cluster's shared state cannot be reached.",
                headers={"Retry-After": "2"},
            )
        return jsonify({"status": "ready"})

    @app.get("/debug/tasks")
    async def debug_tasks() -> Response:  # noqa: ASYNC124
        admin_key = state.settings.admin_key
        if not admin_key:
            raise ApiError(404, "not_found", "No such resource.")
        presented = bearer_token(request.headers.get("Authorization"))
        if presented is None or not hmac.compare_digest(presented.encode(), admin_key.encode()):
            raise ApiError(
                401,
                "unauthorized",
                "This endpoint needs 'Authorization: Bearer <admin key>'.",
                headers={"WWW-Authenticate": "Bearer"},
            )
        root = trio.lowlevel.current_root_task()
        assert root is not None  # we are inside the trio run
        tree = task_tree(root)
        manager = state.running_manager()
        # Cluster mode: the node and fencing token of each session's lease.
        leases = {} if state.cluster is None else state.cluster.leases()
        sessions = [
            {
                "principal": key.principal,
                "session_id": key.session_id,
                # Submissions admitted and not yet started (or refused).
                "waiting_submissions": session.users,
                "current_run": None if session.current is None else run_state(session.current),
                **({} if state.cluster is None else {"lease": lease_json(leases.get(key))}),
            }
            for key, session in manager.sessions.items()
        ]
        return jsonify(
            {
                **({} if state.cluster is None else {"node": state.cluster.node}),
                "tasks": count_tasks(tree),
                "threads": threading.active_count(),
                "draining": manager.draining,
                "live_runs": len(manager.live_runs.runs),
                "sessions": sessions,
                "task_tree": tree,
            }
        )
