"""Connections end when HTTP says they do (issue 11, findings 1 and 7), and a
reader the kernel cuts off for taking no data is dropped, not gone (4).

Raw sockets against a real server on loopback: the server closes after
``Connection: close``, after HTTP/1.0, after a 401 (which says ``close``)
and once a kept-alive connection was idle for ``--keep-alive-timeout``. A
request pipelined behind an error that was answered before its body was
read gets no answer, but the error always arrives whole, then EOF; behind
an error answered after the body was read, the connection goes on. A
streaming client that takes no data is cut off by the kernel after
``--send-timeout`` and its run completes; one that hangs up has its run
cancelled.

What upstream still gets wrong, and so when our workarounds can go, is in
``test_upstream_workarounds.py``.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx2
import pytest
import trio

from .harness import FAST_REPLY, ServerProcess, running_server
from .wire import CHAT_PATH, DEV_KEY, auth

KEEP_ALIVE = 1.0
# A close that works comes within milliseconds (or the keep-alive timeout):
# this only bounds a test that would otherwise wait forever.
EOF_WAIT = 10.0
TRIES = 20
PIPELINED = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"


# A run of a few seconds at a model's pace: its frames fit in the kernel's
# buffers, so a reader that takes nothing is never one the server waits on.
PACED_REPLY = ("--token-delay", "0.002", "--reply-words", "2000")
SEND_TIMEOUT = 1.0
ADMIN_KEY = "connections-admin"
# Kept-alive connections the client closes; before the fix each held its
# socket and two tasks until the keep-alive timeout.
CLOSED_CONNECTIONS = 20
# Far below the keep-alive timeout of that test's server (60 s).
LET_GO_WAIT = 15.0
SMALL_RECEIVE_BUFFER = 4096


@pytest.fixture(scope="module")
def connection_server() -> Iterator[ServerProcess]:
    with running_server(
        *FAST_REPLY,
        *PACED_REPLY,
        "--keep-alive-timeout",
        str(KEEP_ALIVE),
        "--send-timeout",
        str(SEND_TIMEOUT),
    ) as server:
        yield server


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass
class Exchange:
    """What came back on one connection: the whole responses, any bytes
    after them, and whether the server closed the connection."""

    responses: list[Response] = field(default_factory=list)
    rest: bytes = b""
    eof: bool = False

    @property
    def statuses(self) -> list[int]:
        return [response.status for response in self.responses]


def parse_responses(data: bytes) -> tuple[list[Response], bytes]:
    """Whole HTTP/1.x responses (each with a ``Content-Length``) at the start
    of ``data``, and what follows them."""
    responses: list[Response] = []
    while True:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            return responses, data
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in lines)
        }
        length = int(headers["content-length"])
        if len(rest) < length:
            return responses, data
        responses.append(Response(int(status_line.split()[1]), headers, rest[:length]))
        data = rest[length:]


def address(server: ServerProcess) -> tuple[str, int]:
    host, _, port = server.url.removeprefix("http://").rpartition(":")
    return host, int(port)


async def read_until_eof(
    stream: trio.SocketStream, exchange: Exchange, responses: int | None, wait: float
) -> None:
    """Read into ``exchange`` until EOF, or (with ``responses``) until that
    many whole responses came; give up after ``wait`` seconds."""
    received = exchange.rest
    with trio.move_on_after(wait):
        while responses is None or len(exchange.responses) < responses:
            data = await stream.receive_some()
            if not data:
                exchange.eof = True
                break
            received += data
            found, received = parse_responses(received)
            exchange.responses.extend(found)
    exchange.rest = received


async def exchange_on(
    target: tuple[str, int], *writes: bytes, wait: float = EOF_WAIT, until: int | None = None
) -> Exchange:
    """Open a connection, send each of ``writes`` in one write (waiting for
    one more whole response between writes), then read until EOF (or until
    ``until`` whole responses came)."""
    exchange = Exchange()
    async with await trio.open_tcp_stream(*target) as stream:
        for index, payload in enumerate(writes):
            await stream.send_all(payload)
            if index < len(writes) - 1:
                await read_until_eof(stream, exchange, len(exchange.responses) + 1, wait)
        await read_until_eof(stream, exchange, until, wait)
    return exchange


def post(path: str, body: bytes, *, key: str = DEV_KEY, **headers: str) -> bytes:
    head = [
        f"POST {path} HTTP/1.1",
        "Host: t",
        f"Authorization: Bearer {key}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        *(f"{name.replace('_', '-')}: {value}" for name, value in headers.items()),
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


CHAT = json.dumps({"messages": [{"role": "user", "content": "hello"}]}).encode()


# --- finding 1: the server closes ---------------------------------------------


async def test_server_closes_after_a_connection_close_request(
    connection_server: ServerProcess,
) -> None:
    request = b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    exchange = await exchange_on(address(connection_server), request)
    assert (exchange.statuses, exchange.rest, exchange.eof) == ([200], b"", True)


async def test_server_closes_after_an_http_1_0_request(connection_server: ServerProcess) -> None:
    exchange = await exchange_on(address(connection_server), b"GET /healthz HTTP/1.0\r\n\r\n")
    assert (exchange.statuses, exchange.rest, exchange.eof) == ([200], b"", True)


async def test_server_closes_after_a_401(connection_server: ServerProcess) -> None:
    request = b"GET /v1/runs/run_x HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer nope\r\n\r\n"
    exchange = await exchange_on(address(connection_server), request)
    assert (exchange.statuses, exchange.rest, exchange.eof) == ([401], b"", True)
    assert exchange.responses[0].headers["connection"] == "close"


async def test_server_closes_a_kept_alive_connection_once_idle(
    connection_server: ServerProcess,
) -> None:
    # Kept alive between the two requests, closed once idle.
    exchange = await exchange_on(address(connection_server), PIPELINED, PIPELINED)
    assert (exchange.statuses, exchange.rest, exchange.eof) == ([200, 200], b"", True)
    assert "connection" not in exchange.responses[0].headers


async def debug_tasks(server: ServerProcess) -> int:
    async with httpx2.AsyncClient(base_url=server.url, timeout=10) as client:
        response = await client.get(
            "/debug/tasks", headers={**auth(ADMIN_KEY), "Connection": "close"}
        )
    assert response.status_code == 200, response.text
    tasks: int = response.json()["tasks"]
    return tasks


async def test_connections_the_client_closed_are_let_go_before_the_keep_alive_timeout() -> None:
    """A client that closes its kept-alive connections leaves nothing behind
    on the server: not until --keep-alive-timeout (60 s here), at once."""
    with running_server(
        "--token-delay",
        "0",
        "--reply-words",
        "3",
        "--keep-alive-timeout",
        "60",
        "--admin-key",
        ADMIN_KEY,
    ) as server:
        baseline = await debug_tasks(server)
        for _ in range(CLOSED_CONNECTIONS):
            exchange = await exchange_on(address(server), post(CHAT_PATH, CHAT), until=1)
            assert exchange.statuses == [200]  # kept alive, then closed by us
        with trio.move_on_after(LET_GO_WAIT):
            while await debug_tasks(server) > baseline:  # noqa: ASYNC110 -- another process
                await trio.sleep(0.1)
        assert await debug_tasks(server) <= baseline


# --- finding 7: pipelining behind an early error --------------------------------


@pytest.mark.parametrize(
    ("request_head", "status", "code"),
    [
        (post(CHAT_PATH, CHAT, key="nope"), 401, "unauthorized"),
        (post(CHAT_PATH, CHAT, X_Session_Id="no spaces"), 400, "invalid_session_id"),
    ],
    ids=["401", "400"],
)
async def test_pipelined_request_behind_an_error_before_the_body_gets_eof_after_it(
    connection_server: ServerProcess, request_head: bytes, status: int, code: str
) -> None:
    # The error says Connection: close, so the request behind it is not
    # answered; the error itself always arrives whole.
    outcomes = []
    for _ in range(TRIES):
        exchange = await exchange_on(address(connection_server), request_head + PIPELINED)
        codes = [json.loads(response.body)["error"]["code"] for response in exchange.responses]
        outcomes.append((exchange.statuses, codes, exchange.rest, exchange.eof))
    assert outcomes == [([status], [code], b"", True)] * TRIES


async def test_pipelined_request_behind_an_error_after_the_body_is_answered(
    connection_server: ServerProcess,
) -> None:
    outcomes = []
    for _ in range(TRIES):
        exchange = await exchange_on(
            address(connection_server),
            post(CHAT_PATH, b"{not json") + PIPELINED,
            PIPELINED,
            until=3,
        )
        outcomes.append((exchange.statuses, exchange.rest, exchange.eof))
    # Kept alive: both answered, and a third request on the same connection.
    assert outcomes == [([400, 200, 200], b"", False)] * TRIES


# --- finding 4: a reader that takes nothing --------------------------------------


async def start_unread_stream(
    target: tuple[str, int], session_id: str
) -> tuple[trio.SocketStream, str]:
    """A streaming chat request from a socket with a small receive buffer;
    the response head is read, nothing after it. The stream and the run id."""
    sock = trio.socket.socket()
    # Before connecting, so the advertised window is small from the start.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_RECEIVE_BUFFER)
    await sock.connect(target)
    stream = trio.SocketStream(sock)
    body = json.dumps({"messages": [{"role": "user", "content": "go"}], "stream": True})
    await stream.send_all(
        post(CHAT_PATH, body.encode(), Accept="application/x-ndjson", X_Session_Id=session_id)
    )
    head = b""
    while b"\r\n\r\n" not in head:
        data = await stream.receive_some(1)
        assert data, head
        head += data
    (run_id,) = [
        line.partition(":")[2].strip()
        for line in head.decode().split("\r\n")
        if line.lower().startswith("x-run-id:")
    ]
    return stream, run_id


async def ended_record(server: ServerProcess, run_id: str) -> dict[str, object]:
    """The run's record once it ended, read over other connections."""
    with server.deadline(30, f"run {run_id} to end"):
        async with httpx2.AsyncClient(base_url=server.url, timeout=10) as client:
            while True:
                record: dict[str, object] = (
                    await client.get(f"/v1/runs/{run_id}", headers=auth())
                ).json()
                if record["status"] != "running":
                    return record
                await trio.sleep(0.05)


async def test_reader_that_never_reads_is_dropped_and_its_run_completes(
    connection_server: ServerProcess,
) -> None:
    stream, run_id = await start_unread_stream(address(connection_server), "never-reads")
    async with stream:
        record = await ended_record(connection_server, run_id)
    # The run (on_disconnect: cancel) outlived the connection the kernel cut
    # off after the send timeout.
    assert (record["status"], record["cancel_reason"]) == ("completed", None)
    lines = connection_server.lines
    dropped = first_index(
        lines, f"subscriber_dropped trace={run_id} reason=slow_reader", "by=tcp_user_timeout"
    )
    ended = first_index(lines, f"stream_end trace={run_id} status=completed")
    assert dropped is not None and ended is not None and dropped < ended, "\n".join(lines)


def first_index(lines: list[str], *parts: str) -> int | None:
    return next((i for i, line in enumerate(lines) if all(p in line for p in parts)), None)


async def test_client_that_hangs_up_without_reading_cancels_its_run(
    connection_server: ServerProcess,
) -> None:
    stream, run_id = await start_unread_stream(address(connection_server), "hangs-up")
    await stream.aclose()
    record = await ended_record(connection_server, run_id)
    assert (record["status"], record["cancel_reason"]) == ("cancelled", "client_disconnect")
    assert f"subscriber_dropped trace={run_id}" not in connection_server.log_text()
