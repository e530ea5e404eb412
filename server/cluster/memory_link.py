"""One node's connection to a shared in-memory backend, with the faults the
tests need (see :mod:`server.cluster.memory`)."""

from __future__ import annotations

from typing import Any

import attrs
import trio

from .backend import BackendUnavailable
from .memory import MemoryBackend


@attrs.define(eq=False)
class MemoryLink:
    """One node's connection to a shared :class:`MemoryBackend`.

    ``pause()``: its calls block until ``resume()`` (the node cannot reach
    the shared state, or is itself stopped); ``cut = True``: they fail."""

    backend: MemoryBackend
    cut: bool = False
    _open: trio.Event = attrs.field(factory=trio.Event, init=False)

    def __attrs_post_init__(self) -> None:
        self._open.set()

    def pause(self) -> None:
        if self._open.is_set():
            self._open = trio.Event()

    def resume(self) -> None:
        self._open.set()

    async def _gate(self) -> None:
        await self._open.wait()
        if self.cut:
            raise BackendUnavailable("this node is cut off from the shared state")

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.backend, name)
        if not callable(method) or name.startswith("_") or name == "stream":
            return method

        async def gated(*args: Any, **kwargs: Any) -> Any:
            await self._gate()
            result = await method(*args, **kwargs)
            # A node paused mid-call learns the answer only once it resumes.
            await self._gate()
            return result

        return gated
