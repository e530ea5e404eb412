"""Cluster tests: a node's id set for the process is reset after each test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from server.core.lifecycle_log import set_process_node


@pytest.fixture(autouse=True)
def no_process_node() -> Iterator[None]:
    yield
    set_process_node(None)
