"""Supersede against a stalled upstream, per agent backend (a report, not a test).

For each backend, a real ``python -m server`` process streams from a fake
upstream (a real HTTP server on loopback, in this process). Each trial, on a
fresh session: prompt A goes to an upstream that stalls before its first
byte; once the upstream holds A's request, prompt B is sent on the same
session. Measured, from the moment B is sent:

* ``first_byte``: until B's first content chunk reaches the client;
* ``old_closed``: until the upstream sees A's connection close (the fake
  notes it from its own side; both clocks are this process's trio clock).

Usage::

    python -m benchmarks.supersede_upstream [--trials 50] [--out benchmarks/results]

Writes ``supersede_upstream.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from functools import partial
from pathlib import Path
from typing import Any

import httpx2
import trio

from benchmarks._compare_proc import running_process
from tests.fakes import FakeUpstream, open_fake_upstream

BACKENDS: dict[str, list[str]] = {
    "ollama": ["--agent", "ollama", "--ollama-url", "{url}"],
    "openai": ["--agent", "openai", "--upstream-url", "{url}/v1"],
    "openai-asyncio": ["--agent", "openai-asyncio", "--upstream-url", "{url}/v1"],
    "blocking": ["--agent", "examples.blocking_openai:make_agent", "--upstream-url", "{url}/v1"],
}
AUTH = {"Authorization": "Bearer devkey"}
STEP_TIMEOUT = 30.0


async def read_stream(
    client: httpx2.AsyncClient,
    session: str,
    prompt: str,
    *,
    first_content: trio.Event | None = None,
) -> None:
    body = {"prompt": prompt, "stream": True}
    headers = {**AUTH, "X-Session-Id": session}
    async with client.stream(
        "POST", "/v1/chat/completions", json=body, headers=headers
    ) as response:
        async for line in response.aiter_lines():
            if first_content is not None and '"content":"tok' in line:
                first_content.set()


async def one_trial(client: httpx2.AsyncClient, fake: FakeUpstream, tag: str) -> dict[str, float]:
    session = f"bench-{tag}"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_stream, client, session, f"A-{tag} @stall_first")
        with trio.fail_after(STEP_TIMEOUT):
            old = await fake.wait_for_request(
                lambda record: record.prompt.startswith(f"A-{tag} ") and record.status is not None
            )
        first_content = trio.Event()
        sent_at = trio.current_time()
        nursery.start_soon(
            partial(read_stream, first_content=first_content),
            client,
            session,
            f"B-{tag} @tokens=3 @delay=0",
        )
        with trio.fail_after(STEP_TIMEOUT):
            await first_content.wait()
            first_byte = trio.current_time() - sent_at
            await fake.wait_ended(old)
    assert old.ended_at is not None
    return {
        "first_byte": first_byte,
        "old_closed": old.ended_at - sent_at,
        "old_outcome": old.outcome,
    }  # type: ignore[dict-item]


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    quantiles = statistics.quantiles(ordered, n=100, method="inclusive")
    return {
        "p50_ms": round(statistics.median(ordered) * 1000, 2),
        "p99_ms": round(quantiles[98] * 1000, 2),
        "max_ms": round(ordered[-1] * 1000, 2),
    }


async def measure(backends: list[str], trials: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    async with open_fake_upstream(default_delay=0.01) as fake:
        for backend in backends:
            args = [arg.format(url=fake.url) for arg in BACKENDS[backend]]
            command = [sys.executable, "-m", "server", "--port", "0", *args]
            async with (
                running_process(backend, command, {}) as server,
                httpx2.AsyncClient(base_url=server.url, timeout=STEP_TIMEOUT) as client,
            ):
                await one_trial(client, fake, f"{backend}-warmup")  # imports, connections
                rows = [
                    await one_trial(client, fake, f"{backend}-{index}") for index in range(trials)
                ]
            outcomes = sorted({str(row["old_outcome"]) for row in rows})
            results[backend] = {
                "trials": trials,
                "first_byte": summary([row["first_byte"] for row in rows]),
                "old_closed": summary([row["old_closed"] for row in rows]),
                "old_upstream_outcomes": outcomes,
            }
            print(f"{backend}: {json.dumps(results[backend])}", file=sys.stderr)
    return results


def markdown(results: dict[str, Any]) -> str:
    def cells(figures: dict[str, float]) -> str:
        return f"{figures['p50_ms']} / {figures['p99_ms']} / {figures['max_ms']}"

    lines = [
        "| backend | trials | B's first byte p50 / p99 / max (ms)"
        " | A's upstream closed p50 / p99 / max (ms) |",
        "| --- | --- | --- | --- |",
    ]
    for backend, row in results.items():
        lines.append(
            f"| {backend} | {row['trials']} | {cells(row['first_byte'])}"
            f" | {cells(row['old_closed'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--backend", action="append", choices=list(BACKENDS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    results = trio.run(measure, args.backend or list(BACKENDS), args.trials)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "supersede_upstream.json").write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
