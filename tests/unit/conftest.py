"""Fixtures shared by the engine's unit tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio


@pytest.fixture
async def nursery() -> AsyncIterator[trio.Nursery]:
    """A nursery for the test's engine; cancelled when the test is done."""
    async with trio.open_nursery() as nursery:
        yield nursery
        nursery.cancel_scope.cancel()
