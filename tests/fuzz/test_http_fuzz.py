"""Schemathesis against the real server, from the document it serves at
``/openapi.json``.

Requests are generated from the document (valid ones and, in negative mode,
ones that break it) and sent to ``python -m server`` on loopback. Every
answer must be as documented: no 5xx, a documented status and content type,
a body of the documented schema, every error the JSON error body; and the
server must still serve afterwards with nothing unexpected in its log.

Not checked: schemathesis' ``positive_data_acceptance``. The schema cannot
say "a prompt, or messages whose last user message is not blank", so a
schema-valid body can still be a 422 ``missing_prompt``.

Bounded and deterministic: ``derandomize=True`` and no example database,
so CI runs the same requests every time; a few hundred requests, a few
seconds on the tiny scripted reply.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import strategies as st
from schemathesis import Case, CheckContext, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from server.wire.sse import SseDecoder
from tests.integration.harness import ServerProcess, running_server

pytestmark = pytest.mark.integration

AUTH = {"Authorization": "Bearer devkey"}
TERMINAL_TYPES = {"run.completed", "run.cancelled", "run.interrupted", "run.failed"}
HTTP_TIMEOUT = 10.0
# Per test: a few seconds each against a three-word reply without pacing.
EXAMPLES_PER_MODE = 150
CHAT_EXAMPLES = 60


def fuzz_settings(max_examples: int) -> hypothesis.settings:
    return hypothesis.settings(
        max_examples=max_examples,
        derandomize=True,
        database=None,
        deadline=None,
        # Each example is a request to another process; the generation-time
        # health checks would only measure that.
        suppress_health_check=list(hypothesis.HealthCheck),
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
        print_blob=False,
    )


def error_body(_ctx: CheckContext, response: schemathesis.Response, _case: Case) -> None:
    """Every error, documented or not, is ``{"error": {"code", "message"}}``."""
    if response.status_code < 400:
        return
    assert media_type(response) == "application/json", response.headers
    body = json.loads(response.content)
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body
    assert all(isinstance(body["error"][key], str) and body["error"][key] for key in body["error"])


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
    ignored_auth,
    error_body,
]


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with running_server(
        "--token-delay", "0", "--reply-words", "3", "--admin-key", "fuzz-admin"
    ) as process:
        yield process
        # The fuzzing left it serving: alive, ready, answering a prompt.
        assert requests.get(f"{process.url}/readyz", timeout=HTTP_TIMEOUT).status_code == 200
        answer = requests.post(
            f"{process.url}/v1/chat/completions",
            json={"prompt": "still there?"},
            headers=AUTH,
            timeout=HTTP_TIMEOUT,
        )
        assert answer.status_code == 200, answer.text
        log = process.log_text()
        assert "Traceback" not in log, log
        assert "unhandled error" not in log, log
    assert process.proc.returncode == 0, process.log_text(last=200)


@pytest.fixture(scope="module")
def schema(server: ServerProcess) -> schemathesis.BaseSchema:
    # Loaded from the server, so the served document is the one fuzzed.
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


@pytest.fixture(scope="module")
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


def call_and_check(
    case: Case, server: ServerProcess, http: requests.Session, headers: dict[str, str]
) -> schemathesis.Response:
    response = case.call(base_url=server.url, session=http, headers=headers, timeout=HTTP_TIMEOUT)
    case.validate_response(response, checks=CHECKS, headers=headers)
    return response


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
def test_every_operation_answers_as_documented(
    server: ServerProcess,
    schema: schemathesis.BaseSchema,
    http: requests.Session,
    mode: GenerationMode,
) -> None:
    @fuzz_settings(EXAMPLES_PER_MODE)
    @hypothesis.given(case=schema.as_strategy(generation_mode=mode))
    def check(case: Case) -> None:
        call_and_check(case, server, http, AUTH)

    check()


def media_type(response: schemathesis.Response) -> str:
    return response.headers.get("content-type", [""])[0].partition(";")[0]


def stream_events(response: schemathesis.Response) -> list[Any]:
    """The payloads of a streamed answer, each parsed as JSON (``[DONE]`` kept
    as a string); fails on a frame that is not JSON."""
    text = response.content.decode()
    if media_type(response) == "application/x-ndjson":
        return [json.loads(line) for line in text.split("\n") if line]
    assert media_type(response) == "text/event-stream", media_type(response)
    decoder = SseDecoder()
    payloads: list[Any] = []
    for line in re.split("\r\n|\r|\n", text):  # SSE's line ends, not str.splitlines
        event = decoder.feed(line)
        if event is not None:
            _, data = event
            payloads.append(data if data == "[DONE]" else json.loads(data))
    return payloads


@hypothesis.strategies.composite
def prompts(draw: st.DrawFn) -> str:
    return draw(st.text(min_size=1, max_size=40).filter(lambda text: text.strip() != ""))


def test_chat_completions_answer_every_format_as_documented(
    server: ServerProcess, schema: schemathesis.BaseSchema, http: requests.Session
) -> None:
    """Valid chat requests with a prompt, each response format: the runs are
    answered, streams end with a terminal event, every frame is JSON."""
    operation = schema["/v1/chat/completions"]["POST"]

    @fuzz_settings(CHAT_EXAMPLES)
    @hypothesis.given(
        case=operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
        prompt=prompts(),
        accept=st.sampled_from(
            [None, "application/json", "text/event-stream", "application/x-ndjson"]
        ),
    )
    def check(case: Case, prompt: str, accept: str | None) -> None:
        case.body = {**case.body, "prompt": prompt}
        headers = AUTH if accept is None else {**AUTH, "Accept": accept}
        response = call_and_check(case, server, http, headers)
        # A busy session may refuse (reject, enqueue); the checks covered that.
        if response.status_code != 200:
            assert response.status_code in {409, 429}, response.content
            return
        if media_type(response) == "application/json":
            return  # response_schema_conformance checked the chat.completion
        payloads = stream_events(response)
        assert payloads, response.content
        if payloads[-1] == "[DONE]":
            assert all(chunk["object"] == "chat.completion.chunk" for chunk in payloads[:-1])
        else:
            assert payloads[-1]["type"] in TERMINAL_TYPES, payloads[-1]
            assert [event["seq"] for event in payloads] == list(range(len(payloads)))

    check()


UNDOCUMENTED_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


def test_undocumented_methods_are_405_with_allow(
    server: ServerProcess, http: requests.Session
) -> None:
    document = requests.get(f"{server.url}/openapi.json", timeout=HTTP_TIMEOUT).json()
    for template, item in document["paths"].items():
        path = template.replace("{run_id}", "run-x").replace("{session_id}", "session-x")
        allowed = {method.upper() for method in item}
        for method in set(UNDOCUMENTED_METHODS) - allowed:
            response = http.request(method, f"{server.url}{path}", headers=AUTH, timeout=10)
            assert response.status_code == 405, (method, path, response.status_code)
            assert allowed <= set(response.headers["Allow"].replace(" ", "").split(","))
            assert response.json()["error"]["code"] == "method_not_allowed"


def test_a_bad_session_id_closes_the_connection(server: ServerProcess) -> None:
    # Regression (found by the negative fuzzing, under CPU load): the 400 went
    # out before the body was read, on a kept-alive connection, and the next
    # request on that connection sometimes got no answer at all.
    with requests.Session() as session:
        refused = session.post(
            f"{server.url}/v1/chat/completions",
            data=b'{"prompt": "hi"}',
            headers={**AUTH, "X-Session-Id": "not valid"},
            timeout=HTTP_TIMEOUT,
        )
        assert refused.status_code == 400
        assert refused.headers["Connection"] == "close"
        answered = session.post(
            f"{server.url}/v1/chat/completions",
            json={"prompt": "hi"},
            headers=AUTH,
            timeout=HTTP_TIMEOUT,
        )
        assert answered.status_code == 200


def test_an_unpaired_surrogate_is_a_400_not_a_broken_stream(
    server: ServerProcess, http: requests.Session
) -> None:
    # Regression: "\ud800" in model or prompt failed the agent, the store
    # write and the SSE encoder (the stream was cut mid-way).
    for body in (b'{"prompt": "hi \\ud800"}', b'{"prompt": "hi", "model": "\\udfff"}'):
        response = http.post(
            f"{server.url}/v1/chat/completions",
            data=body,
            headers={**AUTH, "Content-Type": "application/json"},
            timeout=HTTP_TIMEOUT,
        )
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "invalid_json"
