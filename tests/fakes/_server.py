"""The fake served by hypercorn's trio worker on loopback.

Resource handling: :meth:`FakeUpstream.serve` owns the listening socket and
every connection; it returns once all are closed. :meth:`FakeUpstream.close`
cancels the requests in flight (stalled ones included) and then triggers
hypercorn's graceful shutdown, which closes idle keep-alive connections at
once, so closing takes no longer than the slowest cancelled handler.
:func:`open_fake_upstream` does both for you.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import attrs
import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve

from ._app import FakeApp
from ._registry import Registry, RequestRecord

logger = logging.getLogger("tests.fakes.upstream")

# Handlers are cancelled before the shutdown starts, so this only bounds a
# connection that hypercorn itself is still busy with.
GRACEFUL_TIMEOUT = 1.0


@attrs.define(kw_only=True)
class FakeUpstream:
    """A fake LLM upstream (Ollama and OpenAI dialects) and what it saw.

    ``default_delay`` is the pause before each token when the prompt has no
    ``@delay``. ``api_key``, if set, is required on the OpenAI routes.

    The ``wait_*`` methods sleep until the registry changes the way they
    need (see :class:`~tests.fakes._registry.Registry`); they take no
    timeout, so wrap them in ``trio.fail_after``. ``wait_disconnected``
    raises ``AssertionError`` at once if the request ends any other way.
    """

    api_key: str | None = None
    default_delay: float = 0.01
    url: str = attrs.field(default="", init=False)
    registry: Registry = attrs.field(factory=Registry, init=False)
    _app: FakeApp = attrs.field(init=False)
    _shutdown: trio.Event = attrs.field(factory=trio.Event, init=False)

    @_app.default
    def _make_app(self) -> FakeApp:
        return FakeApp(
            registry=self.registry, api_key=self.api_key, default_delay=self.default_delay
        )

    async def serve(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until :meth:`close`; reports the URL (``http://host:port``) when listening."""
        config = Config()
        config.bind = [f"{host}:{port}"]
        config.accesslog = None
        config.errorlog = logger  # a logger of our own: hypercorn's "-" rewires a global one
        config.graceful_timeout = GRACEFUL_TIMEOUT
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(
                partial(hypercorn_serve, self._app, config, shutdown_trigger=self._shutdown.wait)
            )
            self.url = binds[0]
            task_status.started(self.url)

    def close(self) -> None:
        """Cancel every request in flight, then stop serving."""
        self._app.close()
        self._shutdown.set()

    # --- what the fake saw -----------------------------------------------

    @property
    def requests(self) -> list[RequestRecord]:
        return self.registry.requests

    @property
    def active(self) -> int:
        return self.registry.active

    def stats(self) -> dict[str, Any]:
        """The same JSON as ``GET /_fake/stats``."""
        return self.registry.summary()

    def reset(self) -> None:
        self.registry.reset()

    async def wait_for_request(
        self, predicate: Callable[[RequestRecord], bool] = lambda record: True
    ) -> RequestRecord:
        return await self.registry.wait_for_request(predicate)

    async def wait_ended(self, record: RequestRecord) -> RequestRecord:
        return await self.registry.wait_ended(record)

    async def wait_disconnected(self, record: RequestRecord) -> None:
        await self.registry.wait_disconnected(record)

    async def wait_idle(self) -> None:
        await self.registry.wait_idle()


@asynccontextmanager
async def open_fake_upstream(
    *,
    api_key: str | None = None,
    default_delay: float = 0.01,
    host: str = "127.0.0.1",
    port: int = 0,
) -> AsyncIterator[FakeUpstream]:
    """A :class:`FakeUpstream` listening on loopback for the body of the block."""
    fake = FakeUpstream(api_key=api_key, default_delay=default_delay)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(fake.serve, host=host, port=port))
        try:
            yield fake
        finally:
            fake.close()
