"""What a pathological request body costs (issue 11, finding 2).

Every body is within the default limits (1 MiB, 1000 messages) and goes
through the real route. While the app answers it, a ticker task measures the
longest the trio thread went without scheduling it. This is real time: a
MockClock cannot see CPU. The bound is a generous regression bound, not a
speed target: before the fix the ``[1, 1, ...]`` body held the trio thread
for 6 s (``{}`` items: 14 s); after, each answer takes well under 50 ms of it.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import trio

from server.web.errors import ApiError
from server.web.requests import (
    INLINE_BODY_BYTES,
    MAX_JSON_CONTAINERS,
    MAX_PROBLEMS,
    parse_chat_request,
    parse_limiter,
    read_chat_request,
)

from .test_http import AUTH, PATH, serving

MiB = 1 << 20
LONGEST_HOLD = 0.5  # seconds; see the module docstring


def fill(head: bytes, item: bytes, tail: bytes, size: int = MiB) -> bytes:
    """``head item,item,... tail`` of about ``size`` bytes."""
    count = (size - len(head) - len(tail)) // (len(item) + 1)
    return head + b",".join([item] * count) + tail


PATHOLOGICAL = {
    "ints": (fill(b'{"messages": [', b"1", b"]}"), 413, "too_many_messages"),
    "empty-objects": (fill(b'{"messages": [', b"{}", b"]}"), 413, "too_many_values"),
    "bad-roles": (fill(b'{"messages": [', b'{"role":1}', b"]}"), 413, "too_many_values"),
    "floats": (fill(b'{"messages": [', b"1e300", b"]}"), 413, "too_many_messages"),
    "nesting": (b"[" * MiB, 400, "invalid_json"),
    "many-keys": (fill(b"{", b'"k":1', b',"prompt":"x"}'), 200, ""),
    "surrogate-escapes": (
        b'{"prompt": "' + b"\\ud800" * (MiB // 6 - 4) + b'"}',
        400,
        "invalid_json",
    ),
    "content-parts": (
        fill(b'{"messages": [{"role":"user","content":[', b'{"type":"text"}', b"]}]}"),
        413,
        "too_many_values",
    ),
    "bad-content-parts": (
        fill(b'{"messages": [{"role":"user","content":[', b"1", b"]}]}"),
        422,
        "invalid_request",
    ),
}


async def longest_hold(work: Any) -> float:
    """The longest the trio thread was busy (seconds) while ``work()`` ran."""
    longest = 0.0

    async def tick() -> None:
        nonlocal longest
        while True:
            before = time.perf_counter()
            await trio.sleep(0.001)
            longest = max(longest, time.perf_counter() - before - 0.001)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(tick)
        await trio.sleep(0.01)  # the ticker is ticking
        await work()
        nursery.cancel_scope.cancel()
    return longest


@pytest.mark.parametrize("name", PATHOLOGICAL)
async def test_pathological_body_holds_the_trio_thread_briefly(name: str) -> None:
    body, status, code = PATHOLOGICAL[name]
    assert len(body) <= MiB
    async with serving(max_messages=1000, token_delay=0.0, reply_words=1) as app:
        client = app.test_client()
        answers = []

        async def post() -> None:
            answers.append(await client.post(PATH, headers=AUTH, data=body))

        hold = await longest_hold(post)
        (response,) = answers
        assert response.status_code == status, await response.get_data()
        if code:
            assert (await response.get_json())["error"]["code"] == code
        assert hold < LONGEST_HOLD, f"{name}: the trio thread was held {hold:.3f}s"


def test_validation_stops_at_the_first_problems() -> None:
    body = json.dumps({"messages": [{"role": index} for index in range(500)]}).encode()
    with pytest.raises(ApiError) as raised:
        parse_chat_request(body)
    assert raised.value.status == 422
    assert raised.value.message.count("expected a string") == MAX_PROBLEMS
    assert "$.messages[4].role" in raised.value.message
    assert "$.messages[5]" not in raised.value.message


def test_messages_are_counted_before_they_are_validated() -> None:
    body = json.dumps({"messages": [1] * 1001}).encode()
    with pytest.raises(ApiError) as raised:
        parse_chat_request(body, max_messages=1000)
    assert (raised.value.status, raised.value.code) == (413, "too_many_messages")


def test_a_number_past_the_digit_limit_is_a_400() -> None:
    # int() refuses over 4300 digits with a ValueError that is no JSONDecodeError.
    with pytest.raises(ApiError) as raised:
        parse_chat_request(b'{"prompt": "x", "n": ' + b"9" * 5000 + b"}")
    assert (raised.value.status, raised.value.code) == (400, "invalid_json")


def test_an_inline_body_cannot_reach_the_container_limit() -> None:
    # Only the worker's parser counts; the inline one must never need to.
    assert INLINE_BODY_BYTES // len(b"[],") < MAX_JSON_CONTAINERS


@pytest.mark.parametrize(
    "body",
    [
        b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}',
        b'{"prompt": "x", "stream_format": "foo", "stream": 1}',
        b'{"prompt": "\\ud800"}',
        b'{"prompt": "\\ud83d\\ude00"}',
        b'{"prompt": [',
        b"[1]",
    ],
)
async def test_both_parsers_answer_alike(body: bytes) -> None:
    # The same body padded past INLINE_BODY_BYTES goes to the worker thread.
    padded = body[:1] + b'"pad": "' + b" " * INLINE_BODY_BYTES + b'", ' + body[1:]
    if body.startswith(b"["):
        padded = b"[" + b" " * INLINE_BODY_BYTES + body[1:]
    limiter = parse_limiter()
    outcomes = []
    for each in (body, padded):
        try:
            outcomes.append(await read_chat_request(each, max_messages=10, limiter=limiter))
        except ApiError as error:
            outcomes.append((error.status, error.code, error.message))
    assert outcomes[0] == outcomes[1]


async def test_a_cancelled_request_waits_for_its_parse_thread() -> None:
    """Never abandoned: when the request's scope is gone, so is its thread."""
    limiter = parse_limiter()
    body = fill(b'{"prompt": "x", "pad": [', b"1", b"]}")  # ~0.5 s to parse
    with trio.move_on_after(0.01) as scope:
        await read_chat_request(body, max_messages=1000, limiter=limiter)
    assert scope.cancel_called
    assert limiter.borrowed_tokens == 0
