"""Bad input gets the right status and a JSON error body, never a traceback,
and the server keeps serving afterwards."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import httpx2
import pytest

from .harness import ServerProcess
from .wire import CHAT_PATH, auth, stream_chat

pytestmark = pytest.mark.integration

MiB = 1024 * 1024  # the server's default --max-body-bytes is 1 MiB


@dataclass(frozen=True)
class BadRequest:
    name: str
    status: int
    code: str
    body: bytes = b'{"prompt": "hello"}'
    headers: dict[str, str] = field(default_factory=auth)
    method: str = "POST"
    path: str = CHAT_PATH


def body(value: object) -> bytes:
    return json.dumps(value).encode()


BAD_REQUESTS = [
    BadRequest("malformed-json", 400, "invalid_json", body=b'{"prompt": "hello"'),
    BadRequest("not-utf8", 400, "invalid_json", body=b'{"prompt": "\xff"}'),
    BadRequest("not-an-object", 422, "invalid_request", body=body(["hello"])),
    BadRequest(
        "stream-not-bool", 422, "invalid_request", body=body({"prompt": "hi", "stream": "yes"})
    ),
    BadRequest("prompt-not-str", 422, "invalid_request", body=body({"prompt": 42})),
    BadRequest("messages-not-list", 422, "invalid_request", body=body({"messages": {"a": 1}})),
    BadRequest(
        "stream-options-not-object",
        422,
        "invalid_request",
        body=body({"prompt": "hi", "stream_options": "usage"}),
    ),
    BadRequest("empty-object", 422, "missing_prompt", body=body({})),
    BadRequest(
        "no-user-message",
        422,
        "missing_prompt",
        body=body({"messages": [{"role": "system", "content": "be brief"}]}),
    ),
    BadRequest("blank-prompt", 422, "missing_prompt", body=body({"prompt": "   "})),
    BadRequest("missing-key", 401, "unauthorized", headers={}),
    BadRequest("wrong-key", 401, "unauthorized", headers=auth("not-the-key")),
    BadRequest("not-bearer", 401, "unauthorized", headers={"Authorization": "Basic devkey"}),
    BadRequest(
        "session-id-with-space",
        400,
        "invalid_session_id",
        headers={**auth(), "X-Session-Id": "a b"},
    ),
    BadRequest(
        "session-id-129-chars",
        400,
        "invalid_session_id",
        headers={**auth(), "X-Session-Id": "s" * 129},
    ),
    BadRequest(
        "body-over-limit",
        413,
        "payload_too_large",
        body=b'{"prompt": "' + b"a" * (2 * MiB) + b'"}',
    ),
    BadRequest("unknown-path", 404, "not_found", method="GET", path="/v1/nothing-here"),
    BadRequest("wrong-method", 405, "method_not_allowed", method="GET"),
]


async def send(server: ServerProcess, case: BadRequest) -> httpx2.Response:
    # A client (so a connection) per request: after an early 413 the server
    # leaves a kept-alive connection unusable (see the suite's report).
    async with httpx2.AsyncClient(base_url=server.url, timeout=30.0) as client:
        return await client.request(
            case.method,
            case.path,
            content=case.body,
            headers={"Content-Type": "application/json", **case.headers},
        )


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=lambda case: case.name)
async def test_bad_request_gets_json_error(server: ServerProcess, case: BadRequest) -> None:
    response = await send(server, case)

    assert "Traceback" not in response.text
    assert response.status_code == case.status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == case.code
    assert isinstance(error["message"], str) and error["message"]
    assert "X-Run-Id" not in response.headers


async def test_server_keeps_serving_after_bad_requests(
    server: ServerProcess, client: httpx2.AsyncClient
) -> None:
    log_start = len(server.lines)
    for case in BAD_REQUESTS:
        response = await send(server, case)
        assert response.status_code == case.status, (case.name, response.text)

    stream = await stream_chat(client, "still there?")
    assert stream.finish_reason == "stop"
    assert stream.done
    assert "Traceback" not in server.log_text(since=log_start)


async def test_deeply_nested_json_is_a_client_error(server: ServerProcess) -> None:
    depth = 100_000  # 200 kB, well under the body limit
    case = BadRequest("deep", 400, "invalid_json", body=b"[" * depth + b"]" * depth)

    response = await send(server, case)

    assert "Traceback" not in response.text
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_json"


@pytest.mark.parametrize(
    "first",
    [
        BadRequest("too-large", 413, "payload_too_large", body=b"x" * (2 * MiB)),
        BadRequest("wrong-key", 401, "unauthorized", body=b"x" * (2 * MiB), headers=auth("no")),
        # Routing refuses these before anything reads the body.
        BadRequest("unknown-path", 404, "not_found", body=b"x" * 100_000, path="/v1/nothing"),
        BadRequest(
            "unknown-run", 404, "run_not_found", body=b"x" * 100_000, path="/v1/runs/x/cancel"
        ),
    ],
    ids=lambda case: case.name,
)
async def test_client_reusing_its_connection_after_an_unread_body_is_answered(
    client: httpx2.AsyncClient, first: BadRequest
) -> None:
    """The server answers these before reading the body; it closes the
    connection, so the client's next request goes on a fresh one instead of
    hanging behind the unread bytes."""
    refused = await client.post(first.path, content=first.body, headers=first.headers)
    assert refused.status_code == first.status
    assert refused.json()["error"]["code"] == first.code
    assert refused.headers["Connection"] == "close"
    again = await client.post(CHAT_PATH, json={"prompt": "hi"}, headers=auth())
    assert again.status_code == 200


async def test_an_error_after_the_body_was_read_keeps_the_connection(
    client: httpx2.AsyncClient,
) -> None:
    refused = await client.post(CHAT_PATH, content=b"{not json", headers=auth())
    assert refused.status_code == 400
    assert refused.headers.get("Connection") != "close"
    again = await client.post(CHAT_PATH, json={"prompt": "hi"}, headers=auth())
    assert again.status_code == 200
