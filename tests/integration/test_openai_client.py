"""The official ``openai`` client works against the server unchanged.

The client is synchronous, so these are plain (non-async) tests."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from .harness import REPLY_WORDS, ServerProcess
from .wire import DEV_KEY

pytestmark = pytest.mark.integration

PROMPT = "what does the openai client see"


@pytest.fixture
def openai_client(server: ServerProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=f"{server.url}/v1", api_key=DEV_KEY, max_retries=0, timeout=30.0
    ) as client:
        yield client


def test_openai_streaming_collects_deltas_and_stops(openai_client: openai.OpenAI) -> None:
    with openai_client.chat.completions.create(
        model="scripted", messages=[{"role": "user", "content": PROMPT}], stream=True
    ) as stream:
        chunks = list(stream)

    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert text.startswith(f"You said: {PROMPT}")
    assert len(text.split()) == REPLY_WORDS
    assert len({chunk.id for chunk in chunks}) == 1
    assert [chunk.choices[0].finish_reason for chunk in chunks][-2:] == [None, "stop"]
    assert all(chunk.usage is None for chunk in chunks)


def test_openai_streaming_with_include_usage_ends_with_usage_chunk(
    openai_client: openai.OpenAI,
) -> None:
    with openai_client.chat.completions.create(
        model="scripted",
        messages=[{"role": "user", "content": PROMPT}],
        stream=True,
        stream_options={"include_usage": True},
    ) as stream:
        chunks = list(stream)

    *answer, usage_chunk = chunks
    assert answer[-1].choices[0].finish_reason == "stop"
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == REPLY_WORDS
    assert usage_chunk.usage.prompt_tokens == len(PROMPT.split())
    assert usage_chunk.usage.total_tokens == REPLY_WORDS + len(PROMPT.split())


def test_openai_non_streaming_returns_one_completion(openai_client: openai.OpenAI) -> None:
    response = openai_client.chat.completions.with_raw_response.create(
        model="scripted", messages=[{"role": "user", "content": PROMPT}]
    )
    completion = response.parse()

    assert completion.id == f"chatcmpl-{response.headers['X-Run-Id']}"
    assert completion.object == "chat.completion"
    assert completion.model == "scripted"
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.message.content.startswith(f"You said: {PROMPT}")
    assert completion.usage is not None
    assert completion.usage.completion_tokens == REPLY_WORDS
