"""One bad intent or an unexpected error in one of a node's loops ends
nothing: it is logged and the node goes on."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from server.cluster.backend import Intent, IntentKind, ReplyStatus, SessionRef
from server.cluster.coordinator import ClusterCoordinator
from server.cluster.memory import MemoryBackend
from server.cluster.redis_backend import RedisBackend
from server.core import RunStatus
from tests.cluster.nodes import start_node
from tests.cluster.test_failures import scripted

from .redis_process import RedisProcess

S = SessionRef(principal="key-a", session_id="s")


async def test_malformed_intents_are_skipped(
    redis_server: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    async with RedisBackend.from_url(redis_server.url) as backend:
        coordinator = ClusterCoordinator(backend=backend, node="n1")
        async with trio.open_nursery() as nursery:
            await nursery.start(coordinator.serve)
            inbox = backend.keys.inbox("n1")
            commands: Any = backend._commands
            await commands.xadd(inbox, {"i": "not json"})
            await commands.xadd(inbox, {"i": '{"kind": "bogus"}'})
            await commands.xadd(inbox, {"x": "no intent field"})
            intent = Intent(
                kind=IntentKind.STOP,
                session=S,
                from_node="n2",
                reply_to="n2:1",
                run_id="run_" + "0" * 32,
            )
            await backend.send_intent("n1", intent)
            with trio.fail_after(10):
                reply = await backend.wait_reply("n2:1", block=5.0)
            assert reply is not None and reply.status is ReplyStatus.NO_SUCH_RUN
            nursery.cancel_scope.cancel()
    assert caplog.text.count("a malformed intent") == 3


async def test_an_unexpected_error_while_renewing_ends_nothing(
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    renew = MemoryBackend.renew
    failures = [RuntimeError("a bug")]

    async def renew_with_a_bug(self: MemoryBackend, *args: Any, **kwargs: Any) -> bool:
        if failures:
            raise failures.pop()
        return await renew(self, *args, **kwargs)

    monkeypatch.setattr(MemoryBackend, "renew", renew_with_a_bug)
    backend = MemoryBackend()
    async with trio.open_nursery() as nursery:
        a = await start_node(nursery, backend, "a", scripted(8))
        run = await a.prompt("first")
        await run.wait_ended()
        assert run.status is RunStatus.COMPLETED  # renewed after the failure
        nursery.cancel_scope.cancel()
    assert "renewing the lease" in caplog.text
