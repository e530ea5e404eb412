"""The trio task tree, for ``GET /debug/tasks`` and the ``trio_tasks`` gauge.

Call these from the trio thread (inside the trio run)."""

from __future__ import annotations

from typing import Any

import trio


def task_tree(task: trio.lowlevel.Task) -> dict[str, Any]:
    return {
        "name": task.name,
        "children": [
            task_tree(child) for nursery in task.child_nurseries for child in nursery.child_tasks
        ],
    }


def count_tasks(tree: dict[str, Any]) -> int:
    return 1 + sum(count_tasks(child) for child in tree["children"])


def count_live_tasks() -> int:
    """Every task of the current trio run."""
    root = trio.lowlevel.current_root_task()
    assert root is not None  # we are inside the trio run
    pending = [root]
    count = 0
    while pending:
        task = pending.pop()
        count += 1
        pending.extend(child for nursery in task.child_nurseries for child in nursery.child_tasks)
    return count
