"""The official openai client against our server while our server proxies a
fake OpenAI-compatible upstream (both real processes on loopback): content
and usage round-trip."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from tests.fakes import token_text

from .harness import FakeUpstreamProcess, ServerProcess, running_server
from .wire import DEV_KEY

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", params=["openai", "openai-asyncio", "ollama"])
def proxy(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    with running_server("--delay", "0.001", kind=FakeUpstreamProcess) as upstream:
        base = upstream.url if request.param == "ollama" else f"{upstream.url}/v1"
        flag = "--ollama-url" if request.param == "ollama" else "--upstream-url"
        with running_server("--agent", request.param, flag, base, "--model", "m") as server:
            yield server
        assert server.proc.returncode == 0, server.log_text(last=40)


@pytest.fixture
def client(proxy: ServerProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=f"{proxy.url}/v1", api_key=DEV_KEY, max_retries=0, timeout=30.0
    ) as client:
        yield client


EXPECTED = "".join(token_text(index) for index in range(7))


def test_streamed_content_and_usage_round_trip(client: openai.OpenAI) -> None:
    with client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "relay this @tokens=7"}],
        stream=True,
        stream_options={"include_usage": True},
    ) as stream:
        chunks = list(stream)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == EXPECTED
    finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices]
    assert finishes[-1] == "stop"
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 7


def test_non_streamed_content_and_usage_round_trip(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "relay this @tokens=7"}]
    )
    assert completion.choices[0].message.content == EXPECTED
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.completion_tokens == 7


def test_upstream_failure_reaches_the_client_as_an_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as failure:
        client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "fail @status=503"}]
        )
    assert failure.value.status_code == 502
    assert failure.value.body["code"] == "upstream_error"  # type: ignore[index]
