"""Why a connection broke reaches the reader that used it
(server/web/connections.py), and a reader the kernel cut off for taking no
data is dropped, not gone (RunStream's rule)."""

from __future__ import annotations

import errno
import hashlib
import inspect

import pytest
import trio
import trio.testing
from hypercorn.trio import run as hypercorn_run

from server.agents.scripted import ScriptedAgent
from server.core import EngineConfig, SessionManager
from server.core.agent import AgentRequest
from server.core.events import CancelReason, RunStatus
from server.web.connections import ConnectionLedger, TracedStream
from server.web.streaming import RunStream
from server.wire import NativeNdjsonEncoder

ALICE = "key-alice"


async def broken_pair(error: int) -> tuple[TracedStream, ConnectionLedger, trio.SocketStream]:
    """A traced server side of a loopback connection whose next receive
    fails with ``error``, its ledger, and the client side."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    async with listener:
        port = listener.socket.getsockname()[1]
        client = await trio.open_tcp_stream("127.0.0.1", port)
        server = await listener.accept()
    ledger = ConnectionLedger()
    traced = TracedStream(server, ledger)

    async def fail(max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        raise trio.BrokenResourceError("socket connection broken") from OSError(error, "broken")

    traced._stream.receive_some = fail  # type: ignore[method-assign]
    return traced, ledger, client


@pytest.mark.parametrize(
    ("error", "timed_out"), [(errno.ETIMEDOUT, True), (errno.ECONNRESET, False)]
)
async def test_traced_stream_notes_only_the_kernels_timeout(error: int, timed_out: bool) -> None:
    traced, ledger, client = await broken_pair(error)
    assert traced.addresses is not None
    client_address, server_address = traced.addresses
    assert client_address == client.socket.getsockname()
    assert server_address == client.socket.getpeername()
    with pytest.raises(trio.BrokenResourceError):
        await traced.receive_some()
    assert ledger.timed_out(traced.addresses) is timed_out
    traced.forget()
    assert not ledger.timed_out(traced.addresses)
    await traced.aclose()
    await client.aclose()


async def open_manager(nursery: trio.Nursery) -> SessionManager:
    manager = SessionManager(
        agent=ScriptedAgent(token_delay=0.1, reply_words=100), config=EngineConfig()
    )
    started: SessionManager = await nursery.start(manager.serve)
    return started


async def test_reader_the_kernel_cut_off_is_dropped_and_its_run_completes(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    manager = await open_manager(nursery)
    run = await manager.submit(ALICE, "s1", AgentRequest(prompt="hello"))
    stream = RunStream(
        run,
        NativeNdjsonEncoder(),
        heartbeat_interval=15,
        send_timeout=2.0,
        connection_timed_out=lambda: True,
    )
    frames = aiter(stream)
    await frames.__anext__()
    await frames.__anext__()  # the last write was just handed over: none overdue
    await frames.aclose()  # and then the connection breaks
    assert stream.dropped
    await run.wait_ended()
    assert run.status is RunStatus.COMPLETED


async def test_reader_whose_client_hung_up_cancels_its_run(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    manager = await open_manager(nursery)
    run = await manager.submit(ALICE, "s1", AgentRequest(prompt="hello"))
    stream = RunStream(
        run,
        NativeNdjsonEncoder(),
        heartbeat_interval=15,
        send_timeout=2.0,
        connection_timed_out=lambda: False,
    )
    frames = aiter(stream)
    await frames.__anext__()
    await frames.__anext__()
    await frames.aclose()
    assert not stream.dropped
    await run.wait_ended()
    assert run.cancel_reason is CancelReason.CLIENT_DISCONNECT


# sha256 of hypercorn.trio.run.worker_serve's source, as server/worker.py copies it.
COPIED_WORKER_SERVE = "8dc8347a9fc357ca334f8c3e4bcf0368176510a96d434f21a5eb4c9ec4103726"


def test_the_worker_copy_is_of_the_installed_hypercorn() -> None:
    # Fails when Hypercorn's worker_serve changes: bring server/worker.py in
    # line, or drop the copy if Hypercorn now passes the accepted stream (or
    # the socket error) on, and update the hash.
    source = inspect.getsource(hypercorn_run.worker_serve)
    assert hashlib.sha256(source.encode()).hexdigest() == COPIED_WORKER_SERVE
