"""Operational endpoints: liveness, readiness, and the task tree.

* ``GET /healthz``: the process is alive (200).
* ``GET /readyz``: accepting runs (200), or starting/draining (503 with
  ``Retry-After``).
* ``GET /debug/tasks``: the trio task tree, thread count and each session's
  current run; only with ``Authorization: Bearer <--admin-key>``, and 404
  when no admin key is configured (off by default).
"""

from __future__ import annotations

import hmac
import threading
from typing import Any

import trio
from quart import Response, jsonify, request
from quart_trio import QuartTrio

from .errors import ApiError
from .state import AppState


def task_tree(task: trio.lowlevel.Task) -> dict[str, Any]:
    return {
        "name": task.name,
        "children": [
            task_tree(child) for nursery in task.child_nurseries for child in nursery.child_tasks
        ],
    }


def count_tasks(tree: dict[str, Any]) -> int:
    return 1 + sum(count_tasks(child) for child in tree["children"])


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
        return jsonify({"status": "ready"})

    @app.get("/debug/tasks")
    async def debug_tasks() -> Response:  # noqa: ASYNC124
        admin_key = state.settings.admin_key
        if not admin_key:
            raise ApiError(404, "not_found", "No such resource.")
        _, _, presented = request.headers.get("Authorization", "").partition(" ")
        if not hmac.compare_digest(presented.strip().encode(), admin_key.encode()):
            raise ApiError(401, "unauthorized", "This endpoint needs the admin key.")
        root = trio.lowlevel.current_root_task()
        assert root is not None  # we are inside the trio run
        tree = task_tree(root)
        manager = state.running_manager()
        sessions = [
            {
                "principal": key.principal,
                "session_id": key.session_id,
                "current_run": None
                if session.current is None
                else {
                    "id": session.current.run_id,
                    "state": session.current.state.value,
                    "status": session.current.status.value,
                },
            }
            for key, session in manager.sessions.items()
        ]
        return jsonify(
            {
                "tasks": count_tasks(tree),
                "threads": threading.active_count(),
                "live_runs": len(manager.live_runs.runs),
                "sessions": sessions,
                "task_tree": tree,
            }
        )
