"""What :mod:`benchmarks.compare` drives its servers with: the settings of
a run (its scale), what a client saw of one streamed request, and the
context a scenario gets."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import attrs
import httpx2
import trio

from benchmarks._compare_proc import ServerProcess, proc_status
from tests.fakes import FakeUpstream

AUTH = {"Authorization": "Bearer devkey"}
# The harness's clients: no cap on connections, a pool of 100 idle ones.
LIMITS = httpx2.Limits(max_connections=None, max_keepalive_connections=100)
CHAT = "/v1/chat/completions"


@attrs.define(kw_only=True)
class Settings:
    scale: str  # one of SCALES
    trials: int  # supersede trials per mode
    trial_timeout: float  # wait for B's first content
    supersede_budget: float  # stop starting trials after this long
    rapid: int  # supersedes in the leak scenario
    storm: int  # supersedes in the storm scenario
    storm_probes: int  # other-session probes, quiet and during the storm
    ks: list[int]  # throughput concurrencies
    throughput_tokens: int  # tokens per throughput answer (at 50 tokens/s)
    throughput_timeout: float  # per K
    # Wall seconds py-spy samples the server during the largest throughput
    # K, from the moment half the streams answer.
    profile_seconds: float
    hang_timeout: float  # a request without [DONE] by then is a hang
    seed_timeout: float  # per request of a seed scenario
    seed_wait: float  # per wait inside a seed scenario (first content, upstream closed)
    settle_timeout: float  # wait for live runs to reach 0 before a reading
    settle_pause: float  # then this long before the reading
    servers_at_once: bool  # measure the servers side by side instead of in turn
    share_server: bool  # one server process for every scenario on the fake, not one each

    @classmethod
    def make(cls, scale: str) -> Settings:
        return cls(scale=scale, **SCALES[scale])


# ``full`` is the measurement (tox -e bench, docs/comparison.md); ``quick``
# runs every scenario small, for orientation by hand (~90 s); ``smoke`` runs
# one tiny case of each, which is what the test suite runs to keep the
# harness working (tests/baselines/test_compare_smoke.py): its figures mean
# nothing, only that every server x scenario produced one.
SCALES: dict[str, dict[str, Any]] = {
    "full": dict(
        trials=100,
        trial_timeout=10.0,
        supersede_budget=60.0,
        rapid=1000,
        storm=50,
        storm_probes=20,
        ks=[1, 100, 1000],
        throughput_tokens=100,
        throughput_timeout=60.0,
        profile_seconds=3.0,
        hang_timeout=30.0,
        seed_timeout=10.0,
        seed_wait=5.0,
        settle_timeout=5.0,
        settle_pause=0.5,
        servers_at_once=False,
        share_server=False,
    ),
    "quick": dict(
        trials=10,
        trial_timeout=2.5,
        supersede_budget=8.0,
        rapid=50,
        storm=20,
        storm_probes=5,
        ks=[1, 10],
        throughput_tokens=100,
        throughput_timeout=15.0,
        profile_seconds=3.0,
        hang_timeout=5.0,
        seed_timeout=5.0,
        seed_wait=5.0,
        settle_timeout=5.0,
        settle_pause=0.5,
        servers_at_once=False,
        share_server=False,
    ),
    "smoke": dict(
        trials=1,
        trial_timeout=1.0,
        supersede_budget=2.0,
        rapid=3,
        storm=3,
        storm_probes=1,
        ks=[1, 2],
        throughput_tokens=10,
        throughput_timeout=5.0,
        profile_seconds=0.5,
        hang_timeout=1.0,
        seed_timeout=1.0,
        seed_wait=1.0,
        settle_timeout=0.5,
        settle_pause=0.1,
        servers_at_once=True,
        share_server=True,
    ),
}


@attrs.define(kw_only=True)
class Stream:
    """What the client saw of one streamed request."""

    sent_at: float = 0.0
    status: int | None = None
    first_content_at: float | None = None
    tokens: int = 0
    finish_reason: str | None = None
    done: bool = False
    timed_out: bool = False
    error: str | None = None
    ended_at: float | None = None


@attrs.define(kw_only=True)
class Context:
    server: ServerProcess
    client: httpx2.AsyncClient
    fake: FakeUpstream
    settings: Settings
    tag: str  # unique per server x scenario, for session names
    upstream_pid: int | None = None  # the lean upstream's, when the scenario uses it
    profile_dir: Path | None = None  # py-spy profiles go here when --profile is given
    # Where the supersede scenario sends prompt B (another node of a
    # cluster); by default ``client``, like A.
    b_client: httpx2.AsyncClient | None = None

    async def debug(self) -> dict[str, Any]:
        response = await self.client.get("/debug/tasks", headers=self.server.debug_headers)
        response.raise_for_status()
        data = response.json()
        status = proc_status(self.server.pid)
        return {
            "tasks": data.get("tasks", data.get("asyncio_tasks")),
            "threads": data.get("threads"),
            "live_runs": data.get("live_runs", data.get("streams")),
            "rss_bytes": status.get("VmRSS"),
        }


def body(prompt: str) -> dict[str, Any]:
    return {
        "model": "fake-model",
        "stream": True,
        "messages": [{"role": "user", "content": prompt}],
    }


async def stream(
    client: httpx2.AsyncClient,
    session: str,
    prompt: str,
    *,
    within: float,
    result: Stream | None = None,
    first_content: trio.Event | None = None,
    leave_after_first: bool = False,
) -> Stream:
    """POST one streaming chat request and read it to ``[DONE]``, at most ``timeout`` s."""
    result = Stream() if result is None else result
    result.sent_at = trio.current_time()
    headers = {**AUTH, "X-Session-Id": session}
    with trio.move_on_after(within) as scope:
        try:
            async with client.stream("POST", CHAT, json=body(prompt), headers=headers) as response:
                result.status = response.status_code
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        result.done = True
                        break
                    chunk = json.loads(data)
                    for choice in chunk.get("choices") or []:
                        content = (choice.get("delta") or {}).get("content")
                        if content:
                            result.tokens += content.count("tok")
                            if result.first_content_at is None:
                                result.first_content_at = trio.current_time()
                                if first_content is not None:
                                    first_content.set()
                                if leave_after_first:
                                    break
                        if choice.get("finish_reason"):
                            result.finish_reason = choice["finish_reason"]
                    if leave_after_first and result.first_content_at is not None:
                        break
        except (httpx2.HTTPError, ValueError) as exc:
            result.error = f"{type(exc).__name__}: {exc}"[:200]
    result.timed_out = scope.cancelled_caught
    result.ended_at = trio.current_time()
    return result


def quantiles_ms(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "max_ms": None}
    ordered = sorted(values)
    if len(ordered) > 1:
        cuts = statistics.quantiles(ordered, n=100, method="inclusive")
        p95, p99 = cuts[94], cuts[98]
    else:
        p95 = p99 = ordered[0]
    return {
        "p50_ms": round(statistics.median(ordered) * 1000, 1),
        "p95_ms": round(p95 * 1000, 1),
        "p99_ms": round(p99 * 1000, 1),
        "max_ms": round(ordered[-1] * 1000, 1),
    }


def hangs(streams: list[Stream]) -> int:
    return sum(not s.done for s in streams)
