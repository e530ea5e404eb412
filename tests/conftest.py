"""Shared test set-up. pytest-trio runs in trio_mode; pytest-timeout (see
pyproject) is the hang guard for every test.

Test files run in parallel (pytest-xdist) unless asked otherwise: ``python
-m pytest`` with no ``-n`` gets :func:`default_workers` workers and
``--dist loadfile``, so a file's tests stay on one worker and a module- or
session-scoped fixture (a shared server) is set up once per worker, never
shared between processes. Files must not depend on each other; tests that
share a server use unique session ids. Files that start real processes
(marker ``integration``) are handed out first, most tests first, so the
long ones start early and the short in-process files fill the end.

Serial, for debugging: ``-n0`` or ``-p no:xdist``. ``--pdb``, ``-s`` (whose
output xdist would swallow), listing (``--co``, ``--fixtures``) and a
single test file (it would go to one worker anyway, after every worker paid
its start-up) run serially by themselves. This lives here rather than in
``addopts`` so that ``-p no:xdist`` keeps working (an ``-n`` in addopts
would then be an unknown option).
"""

from __future__ import annotations

import os
import sys
from collections import Counter

import pytest

# Compiled modules are cached for the suite even where the environment says
# PYTHONDONTWRITEBYTECODE (this machine's does): every server process the
# tests start, and every parallel worker, would otherwise compile the
# project's modules from source again (~0.1 s of CPU a process, some hundred
# processes a run). Set before any worker or server process is started, so
# they inherit it; __pycache__ is git-ignored.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False

# Two per core: about half of the suite's wall time is spent waiting on real
# server processes (token pacing, drains, the browser), not on the CPU. More
# is not free: each worker collects the whole suite (~5 s of CPU) and brings
# its own shared servers.
WORKERS_PER_CORE = 2
MAX_WORKERS = 8


def default_workers() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(MAX_WORKERS, WORKERS_PER_CORE * (cores or 1)))


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    """Turn on distribution by file, before xdist reads its options."""
    if not config.pluginmanager.has_plugin("xdist") or hasattr(config, "workerinput"):
        return
    option = config.option
    listing = option.collectonly or option.showfixtures or option.show_fixtures_per_test
    asked_serial = option.usepdb or option.capture == "no" or listing
    if option.numprocesses is None and option.dist == "no" and not asked_serial:
        if one_file(config.args):
            return
        option.numprocesses = default_workers()
        option.dist = "loadfile"
        # Keep the order pytest_collection_modifyitems gives the workers.
        option.loadscopereorder = False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On a parallel worker: files marked slow first (a long file handed
    out last would be the run's tail), then files with real processes, then
    by number of tests (stable, so a file's tests keep their order). Every
    worker sorts the same collection the same way, as xdist requires."""
    if not hasattr(config, "workerinput"):
        return
    per_file = Counter(item.path for item in items)
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    real = {item.path for item in items if item.get_closest_marker("integration")}
    items.sort(
        key=lambda item: (item.path not in slow, item.path not in real, -per_file[item.path])
    )


def one_file(args: list[str]) -> bool:
    """Whether the command line names tests of a single file only."""
    files = {arg.split("::")[0] for arg in args}
    return len(files) == 1 and next(iter(files)).endswith(".py")
