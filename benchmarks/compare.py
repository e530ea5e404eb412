"""Side by side: trio-stream-server against the two asyncio baselines.

For each server (ours, ``asyncio_registry``, ``asyncio_taskgroup``) a fake
OpenAI-compatible upstream runs in this process (trio, loopback), and for
each scenario a fresh server subprocess is started against it on loopback,
driven over real HTTP, and stopped. Scenarios:

1. ``supersede_streaming`` / ``supersede_stalled``: on a fresh session send
   prompt A, 100 ms later prompt B; time from sending B to B's first content
   chunk (p50/p95/p99/max). A streams (``@tokens=200 @delay=0.02``) or
   stalls before its first token (``@stall_first``).
2. overlap (in both supersede scenarios): sessions where the fake saw two
   upstream streams open at once.
3. ``leaks``: GET /debug/tasks and /proc before and after N rapid
   supersedes on one session, once every request ended.
4. hangs: requests of scenarios 1 and 3 without ``[DONE]`` within the hang
   timeout (each is cut there, so the harness never hangs).
5. ``throughput``: K concurrent sessions, each one answer of 100 tokens at
   50 tokens/s: tokens/s delivered, server CPU s per 1,000 tokens, peak RSS.
6. ``seeds``: normal, stop, supersede, rapid, multi-session pass/fail.

A scenario that fails for one server records an ``error`` string and the
run goes on. Usage::

    python -m benchmarks.compare [--quick] [--out benchmarks/results]

Writes ``comparison.json`` and ``comparison.md`` under ``--out`` and prints
the Markdown table.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import httpx2
import trio

from benchmarks import _profile, _report
from benchmarks._compare_proc import (
    SERVERS,
    ServerProcess,
    cpu_seconds,
    proc_status,
    raise_fd_limit,
    running_process,
    running_server,
)
from tests.fakes import FakeUpstream, open_fake_upstream

AUTH = {"Authorization": "Bearer devkey"}
CHAT = "/v1/chat/completions"
# Wall seconds py-spy samples the server during the largest throughput K,
# from the moment half the streams answer (one answer takes 2 s at 50
# tokens/s; the K=1000 batch longer).
PROFILE_SECONDS = 3.0
TOKEN = re.compile(rb"tok\d")  # the fake upstreams' token text


@attrs.define(kw_only=True)
class Settings:
    quick: bool
    trials: int  # supersede trials per mode
    trial_timeout: float  # wait for B's first content
    supersede_budget: float  # stop starting trials after this long
    rapid: int  # supersedes in the leak scenario
    storm: int  # supersedes in the storm scenario
    storm_probes: int  # other-session probes, quiet and during the storm
    ks: list[int]  # throughput concurrencies
    throughput_timeout: float  # per K
    hang_timeout: float  # a request without [DONE] by then is a hang
    seed_timeout: float  # per request of a seed scenario

    @classmethod
    def make(cls, quick: bool) -> Settings:
        if quick:
            return cls(
                quick=True,
                trials=10,
                trial_timeout=2.5,
                supersede_budget=8.0,
                rapid=50,
                storm=20,
                storm_probes=5,
                ks=[1, 10],
                throughput_timeout=15.0,
                hang_timeout=5.0,
                seed_timeout=5.0,
            )
        return cls(
            quick=False,
            trials=100,
            trial_timeout=10.0,
            supersede_budget=60.0,
            rapid=1000,
            storm=50,
            storm_probes=20,
            ks=[1, 100, 1000],
            throughput_timeout=60.0,
            hang_timeout=30.0,
            seed_timeout=10.0,
        )


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


# --- scenarios -------------------------------------------------------------


async def supersede(ctx: Context, mode: str) -> dict[str, Any]:
    settings = ctx.settings
    a_directives = "@tokens=200 @delay=0.02" if mode == "streaming" else "@stall_first"
    latencies: list[float] = []
    missed = 0
    streams: list[Stream] = []
    sessions: list[str] = []
    superseding: list[tuple[str, Stream]] = []
    stop_at = trio.current_time() + settings.supersede_budget
    run = partial(stream, ctx.client, within=settings.hang_timeout)
    async with trio.open_nursery() as nursery:
        for index in range(settings.trials):
            if trio.current_time() > stop_at:
                break
            session = f"{ctx.tag}-{index}"
            sessions.append(session)
            a, b, first = Stream(), Stream(), trio.Event()
            streams += [a, b]
            nursery.start_soon(
                partial(run, session, f"A {session} @session={session} {a_directives}", result=a)
            )
            await trio.sleep(0.1)
            nursery.start_soon(
                partial(
                    run,
                    session,
                    f"B {session} @session={session} @tokens=5 @delay=0",
                    result=b,
                    first_content=first,
                )
            )
            with trio.move_on_after(settings.trial_timeout):
                await first.wait()
            if b.first_content_at is None:
                missed += 1
            else:
                latencies.append(b.first_content_at - b.sent_at)
            superseding.append((session, b))
    stats = [ctx.fake.registry.sessions.get(name) for name in sessions]
    closed_after, ran_to_end, still_open = [], 0, 0
    for session, b in superseding:
        a_record = next(
            (
                r
                for r in ctx.fake.registry.requests
                if r.session == session and r.prompt.startswith("A ")
            ),
            None,
        )
        if a_record is None or a_record.ended_at is None:
            still_open += 1
        elif a_record.disconnected:
            closed_after.append(max(0.0, a_record.ended_at - b.sent_at))
        else:
            ran_to_end += 1
    return {
        "trials": len(sessions),
        "first_content": quantiles_ms(latencies),
        "no_first_content": missed,
        # From sending B until the upstream saw A's connection close.
        "old_upstream_closed": quantiles_ms(closed_after),
        "old_upstream_ran_to_end": ran_to_end,
        "old_upstream_still_open": still_open,
        "overlap_sessions": sum(1 for s in stats if s is not None and s.max_concurrency > 1),
        "overlaps": sum(s.overlaps for s in stats if s is not None),
        "requests": len(streams),
        "hangs": hangs(streams),
        "errors": sum(s.error is not None for s in streams),
        "hang_timeout_s": settings.hang_timeout,
    }


async def settle(ctx: Context, seconds: float = 5.0) -> dict[str, Any]:
    """/debug/tasks once live runs reached 0 (or after ``seconds``), plus a short pause."""
    with trio.move_on_after(seconds):
        while (await ctx.debug())["live_runs"]:  # noqa: ASYNC110 -- polls another process
            await trio.sleep(0.1)
    await trio.sleep(0.5)
    return await ctx.debug()


async def leaks(ctx: Context) -> dict[str, Any]:
    settings = ctx.settings
    session = ctx.tag
    # Warm up (imports, pools, first connections, the session itself, which
    # lives on until its idle timeout) before the "before" reading.
    await stream(
        ctx.client,
        session,
        f"warm @session={session} @tokens=3 @delay=0",
        within=ctx.settings.seed_timeout,
    )
    before = await settle(ctx)
    streams: list[Stream] = []
    async with trio.open_nursery() as nursery:
        for index in range(settings.rapid):
            last = index == settings.rapid - 1
            directives = "@tokens=5 @delay=0" if last else "@tokens=200 @delay=0.02"
            result = Stream()
            streams.append(result)
            nursery.start_soon(
                partial(
                    stream,
                    ctx.client,
                    session,
                    f"L{index} @session={session} {directives}",
                    within=settings.hang_timeout,
                    result=result,
                )
            )
            await trio.sleep(0.01)
    after = await settle(ctx)
    return {
        "supersedes": settings.rapid,
        "before": before,
        "after": after,
        "hangs": hangs(streams),
        "errors": sum(s.error is not None for s in streams),
        "last_finish_reason": streams[-1].finish_reason,
        "hang_timeout_s": settings.hang_timeout,
    }


async def storm(ctx: Context) -> dict[str, Any]:
    """Another session's first token, quiet and during a supersede storm.

    The storm: ``storm`` prompts on one session 20 ms apart, each a slow
    model call (one token after 5 s), every one superseding the last.
    Probes on fresh sessions (3 tokens, no delay) run one after another,
    first with the server quiet, then while the storm goes on.
    """
    settings = ctx.settings
    probe = partial(stream, ctx.client, within=settings.hang_timeout)

    async def probes(label: str, count: int) -> list[Stream]:
        done = []
        for index in range(count):
            name = f"{ctx.tag}-{label}-{index}"
            done.append(await probe(name, f"P @session={name} @tokens=3 @delay=0"))
            await trio.sleep(0.05)
        return done

    await probe(f"{ctx.tag}-warm", "warm @tokens=3 @delay=0")
    quiet = await probes("quiet", settings.storm_probes)
    storm_streams: list[Stream] = []
    during: list[Stream] = []
    target = f"{ctx.tag}-storm"
    async with trio.open_nursery() as nursery:
        for index in range(settings.storm):
            last = index == settings.storm - 1
            directives = "@tokens=3 @delay=0" if last else "@tokens=1 @delay=5"
            result = Stream()
            storm_streams.append(result)
            nursery.start_soon(
                partial(probe, target, f"S{index} @session={target} {directives}", result=result)
            )
            await trio.sleep(0.02)
            if index == settings.storm // 2:
                # Probes start mid-storm and go on after the last supersede.
                async def probe_during() -> None:
                    during.extend(await probes("during", settings.storm_probes))

                nursery.start_soon(probe_during)

    def latencies(streams: list[Stream]) -> list[float]:
        return [s.first_content_at - s.sent_at for s in streams if s.first_content_at is not None]

    return {
        "storm_supersedes": settings.storm,
        "probes": settings.storm_probes,
        "quiet_first_content": quantiles_ms(latencies(quiet)),
        "storm_first_content": quantiles_ms(latencies(during)),
        "probe_hangs": hangs(quiet) + hangs(during),
        "storm_hangs": hangs(storm_streams),
        "last_finish_reason": storm_streams[-1].finish_reason,
        "hang_timeout_s": settings.hang_timeout,
    }


async def raw_stream(
    address: tuple[str, int], session: str, prompt: str, *, within: float, result: Stream
) -> None:
    """One streaming request over a bare socket, counting tokens in the raw bytes.

    The throughput scenario drives up to 1,000 streams from this process;
    parsing them with an HTTP client would make the client, not the server,
    the bottleneck. Every server answers with SSE lines whose content holds
    ``tokN`` words and ends with ``data: [DONE]``.
    """
    payload = json.dumps(body(prompt)).encode()
    request = (
        f"POST {CHAT} HTTP/1.1\r\nhost: {address[0]}:{address[1]}\r\n"
        f"authorization: {AUTH['Authorization']}\r\nx-session-id: {session}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(payload)}\r\n"
        "connection: close\r\n\r\n"
    ).encode() + payload
    result.sent_at = trio.current_time()
    with trio.move_on_after(within) as scope:
        try:
            stream = await trio.open_tcp_stream(*address)
            async with stream:
                await stream.send_all(request)
                carry = b""
                while data := await stream.receive_some(65536):
                    data = carry + data
                    if result.status is None and data.startswith(b"HTTP/1.1 "):
                        result.status = int(data[9:12])
                    # A token split across reads is found in carry + data;
                    # one wholly inside the carried tail was counted last time.
                    found = sum(1 for match in TOKEN.finditer(data) if match.end() > len(carry))
                    if found and result.first_content_at is None:
                        result.first_content_at = trio.current_time()
                    result.tokens += found
                    if b"data: [DONE]" in data:
                        result.done = True
                        break
                    carry = data[-12:]
        except (OSError, trio.BrokenResourceError) as exc:
            result.error = f"{type(exc).__name__}: {exc}"[:200]
    result.timed_out = scope.cancelled_caught
    result.ended_at = trio.current_time()


async def throughput(ctx: Context) -> dict[str, Any]:
    """K sessions at once, one 100-token answer each at 50 tokens/s, from the
    lean upstream in its own process (the server's CPU, the upstream's and
    this process's are reported apart). With ``--profile`` the server is
    sampled by py-spy during the largest K."""
    settings = ctx.settings
    pid = ctx.server.pid
    host, _, port = ctx.server.url.removeprefix("http://").partition(":")
    address = (host, int(port))
    warm = Stream()
    await raw_stream(address, f"{ctx.tag}-warm", "warm @tokens=3 @delay=0", within=10, result=warm)
    rows: dict[str, Any] = {}
    for k in settings.ks:
        streams = [Stream() for _ in range(k)]
        peak = proc_status(pid).get("VmRSS", 0)
        rss_before = peak
        cpu_before = cpu_seconds(pid)
        upstream_cpu_before = cpu_seconds(ctx.upstream_pid) if ctx.upstream_pid else 0.0
        client_cpu_before = time.process_time()
        started = trio.current_time()
        profile: dict[str, Any] | None = None

        async def sample_cpu(raw_path: Path, streams: list[Stream] = streams) -> None:
            nonlocal profile
            # Steady state: once half the streams are answering (connection
            # setup would otherwise dominate the samples at K=1000).
            with trio.move_on_after(settings.throughput_timeout) as waiting:
                while 2 * sum(s.first_content_at is not None for s in streams) < len(streams):  # noqa: ASYNC110
                    await trio.sleep(0.05)
            if waiting.cancelled_caught:
                profile = {"error": "fewer than half the streams answered"}
                return
            problem = await _profile.record(pid, PROFILE_SECONDS, raw_path)
            profile = {"error": problem} if problem else _profile.summarize(raw_path)
            profile["raw"] = str(raw_path)

        async def sample_rss() -> None:
            nonlocal peak
            while True:
                peak = max(peak, proc_status(pid).get("VmRSS", 0))
                await trio.sleep(0.05)

        async with trio.open_nursery() as profiler:
            if ctx.profile_dir is not None and k == max(settings.ks):
                raw_path = ctx.profile_dir / f"profile-{ctx.server.name}-K{k}.txt"
                profiler.start_soon(sample_cpu, raw_path)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sample_rss)
                async with trio.open_nursery() as requests:
                    for index, result in enumerate(streams):
                        session = f"{ctx.tag}-{k}-{index}"
                        requests.start_soon(
                            partial(
                                raw_stream,
                                address,
                                session,
                                f"T @tokens=100 @delay=0.02 {index}",
                                within=settings.throughput_timeout,
                                result=result,
                            )
                        )
                nursery.cancel_scope.cancel()
            wall = trio.current_time() - started
            cpu = cpu_seconds(pid) - cpu_before
            upstream_cpu = (cpu_seconds(ctx.upstream_pid) if ctx.upstream_pid else 0.0) - (
                upstream_cpu_before
            )
            client_cpu = time.process_time() - client_cpu_before
        tokens = sum(s.tokens for s in streams)
        ttft = [s.first_content_at - s.sent_at for s in streams if s.first_content_at is not None]
        rows[str(k)] = {
            "sessions": k,
            "tokens": tokens,
            "expected_tokens": 100 * k,
            "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 1) if wall else None,
            "server_cpu_s": round(cpu, 2),
            "cpu_s_per_1k_tokens": round(cpu / tokens * 1000, 4) if tokens else None,
            "upstream_cpu_s": round(upstream_cpu, 2),
            "client_cpu_s": round(client_cpu, 2),
            "peak_rss_bytes": peak,
            "peak_rss_per_stream_bytes": round((peak - rss_before) / k),
            "ttft": quantiles_ms(ttft),
            "incomplete": hangs(streams),
            "errors": sum(s.error is not None for s in streams),
            **({"profile": profile} if profile is not None else {}),
        }
    return rows


async def seed_normal(ctx: Context) -> str | None:
    s = await stream(
        ctx.client, f"{ctx.tag}-n", "normal @tokens=5 @delay=0", within=ctx.settings.seed_timeout
    )
    return None if s.done and s.finish_reason == "stop" and s.tokens == 5 else f"got {describe(s)}"


async def seed_stop(ctx: Context) -> str | None:
    session = f"{ctx.tag}-stop"
    s = await stream(
        ctx.client,
        session,
        f"stop @session={session} @tokens=200 @delay=0.02",
        within=ctx.settings.seed_timeout,
        leave_after_first=True,
    )
    if s.first_content_at is None:
        return f"no content: {describe(s)}"
    with trio.move_on_after(5):
        record = await ctx.fake.wait_for_request(lambda r: r.session == session)
        await ctx.fake.wait_ended(record)
        return None
    return "upstream stream still open 5 s after the client left"


async def seed_supersede(ctx: Context) -> str | None:
    session = f"{ctx.tag}-sup"
    run = partial(stream, ctx.client, session, within=ctx.settings.seed_timeout)
    a, b, first = Stream(), Stream(), trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(run, "A @tokens=200 @delay=0.02", result=a, first_content=first))
        with trio.move_on_after(5):
            await first.wait()
        await run("B @tokens=5 @delay=0", result=b)
    ok = a.done and a.finish_reason not in (None, "stop") and b.done and b.finish_reason == "stop"
    return None if ok else f"A {describe(a)}; B {describe(b)}"


async def seed_rapid(ctx: Context) -> str | None:
    session = f"{ctx.tag}-rapid"
    streams = [Stream() for _ in range(5)]
    async with trio.open_nursery() as nursery:
        for index, result in enumerate(streams):
            directives = "@tokens=5 @delay=0" if index == 4 else "@tokens=200 @delay=0.02"
            nursery.start_soon(
                partial(
                    stream,
                    ctx.client,
                    session,
                    f"R{index} {directives}",
                    within=ctx.settings.seed_timeout,
                    result=result,
                )
            )
            await trio.sleep(0.05)
    last = streams[-1]
    ok = last.done and last.finish_reason == "stop" and all(s.done for s in streams)
    return None if ok else "; ".join(describe(s) for s in streams)


async def seed_multi(ctx: Context) -> str | None:
    one, two = f"{ctx.tag}-m1", f"{ctx.tag}-m2"
    other, a, b, first = Stream(), Stream(), Stream(), trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            partial(
                stream,
                ctx.client,
                two,
                "other @tokens=30 @delay=0.02",
                within=ctx.settings.seed_timeout,
                result=other,
            )
        )
        nursery.start_soon(
            partial(
                stream,
                ctx.client,
                one,
                "A @tokens=200 @delay=0.02",
                within=ctx.settings.seed_timeout,
                result=a,
                first_content=first,
            )
        )
        with trio.move_on_after(5):
            await first.wait()
        await stream(
            ctx.client, one, "B @tokens=5 @delay=0", within=ctx.settings.seed_timeout, result=b
        )
    ok = (
        other.done
        and other.finish_reason == "stop"
        and other.tokens == 30
        and b.finish_reason == "stop"
    )
    return None if ok else f"session 2 {describe(other)}; B {describe(b)}"


def describe(s: Stream) -> str:
    return (
        f"status={s.status} tokens={s.tokens} finish={s.finish_reason} done={s.done}"
        f" timed_out={s.timed_out} error={s.error}"
    )


SEEDS: dict[str, Callable[[Context], Awaitable[str | None]]] = {
    "normal": seed_normal,
    "stop": seed_stop,
    "supersede": seed_supersede,
    "rapid": seed_rapid,
    "multi_session": seed_multi,
}


async def seeds(ctx: Context) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name, check in SEEDS.items():
        try:
            with trio.fail_after(30):
                problem = await check(ctx)
        except Exception as exc:  # one seed failing must not stop the others
            problem = f"{type(exc).__name__}: {exc}"[:300]
        results[name] = {"pass": problem is None, **({"detail": problem} if problem else {})}
    return results


SCENARIOS: dict[str, Callable[[Context], Awaitable[dict[str, Any]]]] = {
    "seeds": seeds,
    "supersede_streaming": partial(supersede, mode="streaming"),
    "supersede_stalled": partial(supersede, mode="stalled"),
    "leaks": leaks,
    "storm": storm,
    "throughput": throughput,
}


# Scenarios whose load would make the in-process test fake the bottleneck:
# they get the lean upstream in a process of its own.
LEAN_UPSTREAM_SCENARIOS = {"throughput"}
LEAN_UPSTREAM = [sys.executable, "-m", "benchmarks.lean_upstream", "--port", "0"]


def scenario_deadline(settings: Settings) -> float:
    """Outer bound on one scenario (its own bounds should end it well before)."""
    return (
        settings.supersede_budget
        + settings.trial_timeout
        + settings.rapid * 0.02
        + len(settings.ks) * settings.throughput_timeout
        + settings.hang_timeout
        + 60
    )


def leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, or ``exc`` itself."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in leaves(inner)]
    return [exc]


async def run_scenario(
    name: str, server: str, fake: FakeUpstream, settings: Settings, profile_dir: Path | None
) -> dict[str, Any]:
    started = time.monotonic()
    tail: list[str] = []
    try:
        with trio.fail_after(scenario_deadline(settings)):
            async with AsyncExitStack() as stack:
                upstream_url, upstream_pid = fake.url, None
                if name in LEAN_UPSTREAM_SCENARIOS:
                    lean = await stack.enter_async_context(
                        running_process("lean_upstream", LEAN_UPSTREAM, {})
                    )
                    upstream_url, upstream_pid = lean.url, lean.pid
                process = await stack.enter_async_context(running_server(server, upstream_url))
                tail = process.log_tail
                limits = httpx2.Limits(max_connections=None, max_keepalive_connections=100)
                async with httpx2.AsyncClient(
                    base_url=process.url, timeout=settings.hang_timeout + 10, limits=limits
                ) as client:
                    ctx = Context(
                        server=process,
                        client=client,
                        fake=fake,
                        settings=settings,
                        tag=f"{server}-{name}",
                        upstream_pid=upstream_pid,
                        profile_dir=profile_dir,
                    )
                    result = await SCENARIOS[name](ctx)
                    tail = process.log_tail
    except Exception as exc:  # recorded, the run goes on
        detail = " | ".join(
            "".join(traceback.format_exception_only(leaf)).strip() for leaf in leaves(exc)
        )
        result = {"error": detail[:500], "server_log_tail": tail[-5:]}
    result["elapsed_s"] = round(time.monotonic() - started, 2)
    print(f"{server} {name}: {json.dumps(result)[:300]}", file=sys.stderr, flush=True)
    return result


async def measure(
    settings: Settings, servers: list[str], scenarios: list[str], profile_dir: Path | None
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for server in servers:
        results[server] = {}
        started = time.monotonic()
        # One fake per server: what one server leaves stalled cannot touch the next.
        async with open_fake_upstream(default_delay=0.01) as fake:
            for name in scenarios:
                results[server][name] = await run_scenario(
                    name, server, fake, settings, profile_dir
                )
        print(f"{server}: {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)
    return results


# --- report ----------------------------------------------------------------


def cell(result: dict[str, Any], render: Callable[[dict[str, Any]], str]) -> str:
    if "error" in result:
        return "error: " + result["error"].splitlines()[-1][:80].replace("|", "/")
    try:
        return render(result)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        return f"error: {type(exc).__name__}"


def mb(value: int | None) -> str:
    return "?" if value is None else f"{value / 2**20:.1f}"


def fmt(value: Any) -> str:
    return "-" if value is None else str(value)


def quantile_cell(q: dict[str, Any]) -> str:
    return " / ".join(fmt(q[key]) for key in ("p50_ms", "p99_ms", "max_ms"))


def rows(settings: Settings) -> list[tuple[str, str, Callable[[dict[str, Any]], str]]]:
    def lat(r: dict[str, Any]) -> str:
        q = r["first_content"]
        text = " / ".join(fmt(q[key]) for key in ("p50_ms", "p95_ms", "p99_ms", "max_ms"))
        return f"{text} (n={r['trials'] - r['no_first_content']}/{r['trials']})"

    def closed(r: dict[str, Any]) -> str:
        text = quantile_cell(r["old_upstream_closed"])
        left = r["old_upstream_ran_to_end"] + r["old_upstream_still_open"]
        return text + (f"; {left}/{r['trials']} never closed early" if left else "")

    out: list[tuple[str, str, Callable[[dict[str, Any]], str]]] = [
        (
            "supersede_streaming",
            "supersede, upstream streaming: B first token p50/p95/p99/max ms",
            lat,
        ),
        ("supersede_stalled", "supersede, upstream stalled: B first token p50/p95/p99/max ms", lat),
        (
            "supersede_streaming",
            "supersede, streaming: A's upstream closed after B sent, p50/p99/max ms",
            closed,
        ),
        (
            "supersede_stalled",
            "supersede, stalled: A's upstream closed after B sent, p50/p99/max ms",
            closed,
        ),
        (
            "storm",
            "other session's first token, quiet: p50/p99/max ms",
            lambda r: quantile_cell(r["quiet_first_content"]),
        ),
        (
            "storm",
            "other session's first token during a supersede storm: p50/p99/max ms",
            lambda r: (
                f"{quantile_cell(r['storm_first_content'])} ({r['storm_supersedes']} supersedes)"
            ),
        ),
        (
            "storm",
            "hangs, storm (storm requests / probes)",
            lambda r: f"{r['storm_hangs']}/{r['storm_supersedes']} / {r['probe_hangs']}",
        ),
        (
            "supersede_streaming",
            "overlap, streaming: sessions with 2 upstream streams at once",
            lambda r: f"{r['overlap_sessions']}/{r['trials']}",
        ),
        (
            "supersede_stalled",
            "overlap, stalled: sessions with 2 upstream streams at once",
            lambda r: f"{r['overlap_sessions']}/{r['trials']}",
        ),
        (
            "leaks",
            "leaks: tasks before → after",
            lambda r: (
                f"{r['before']['tasks']} → {r['after']['tasks']} ({r['supersedes']} supersedes)"
            ),
        ),
        (
            "leaks",
            "leaks: threads before → after",
            lambda r: f"{r['before']['threads']} → {r['after']['threads']}",
        ),
        (
            "leaks",
            "leaks: RSS MB before → after",
            lambda r: f"{mb(r['before']['rss_bytes'])} → {mb(r['after']['rss_bytes'])}",
        ),
        (
            "supersede_streaming",
            "hangs, supersede streaming",
            lambda r: f"{r['hangs']}/{r['requests']}",
        ),
        (
            "supersede_stalled",
            "hangs, supersede stalled",
            lambda r: f"{r['hangs']}/{r['requests']}",
        ),
        ("leaks", "hangs, rapid supersedes", lambda r: f"{r['hangs']}/{r['supersedes']}"),
    ]
    for k in settings.ks:
        key = str(k)
        out += [
            (
                "throughput",
                f"throughput K={k}: tokens/s (delivered/expected)",
                lambda r, key=key: (
                    f"{r[key]['tokens_per_s']} ({r[key]['tokens']}/{r[key]['expected_tokens']})"
                ),
            ),
            (
                "throughput",
                f"throughput K={k}: CPU s / 1k tokens",
                lambda r, key=key: fmt(r[key]["cpu_s_per_1k_tokens"]),
            ),
            (
                "throughput",
                f"throughput K={k}: CPU s of server / upstream / this client",
                lambda r, key=key: (
                    f"{r[key]['server_cpu_s']} / {r[key]['upstream_cpu_s']}"
                    f" / {r[key]['client_cpu_s']} in {r[key]['wall_s']} s"
                ),
            ),
            (
                "throughput",
                f"throughput K={k}: peak RSS MB (per stream KB)",
                lambda r, key=key: (
                    f"{mb(r[key]['peak_rss_bytes'])}"
                    f" ({r[key]['peak_rss_per_stream_bytes'] / 1024:.0f})"
                ),
            ),
            (
                "throughput",
                f"throughput K={k}: first token p50/p99 ms",
                lambda r, key=key: (
                    f"{fmt(r[key]['ttft']['p50_ms'])} / {fmt(r[key]['ttft']['p99_ms'])}"
                ),
            ),
        ]
    for seed in SEEDS:
        out.append(
            ("seeds", f"seed: {seed}", lambda r, seed=seed: "pass" if r[seed]["pass"] else "FAIL")
        )
    return out


def markdown(results: dict[str, Any], settings: Settings) -> str:
    servers = list(results)
    lines = [
        "| scenario | " + " | ".join(servers) + " |",
        "| --- |" + " --- |" * len(servers),
    ]
    for scenario, label, render in rows(settings):
        cells = [
            cell(results[server][scenario], render) if scenario in results[server] else "not run"
            for server in servers
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small trial counts, for CI")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--server", action="append", choices=list(SERVERS))
    parser.add_argument("--scenario", action="append", choices=list(SCENARIOS))
    parser.add_argument(
        "--profile", action="store_true", help="sample each server with py-spy at the largest K"
    )
    parser.add_argument(
        "--doc",
        type=Path,
        help="also rewrite the generated section of this Markdown file (docs/comparison.md)",
    )
    parser.add_argument(
        "--ks", type=int, nargs="+", help="throughput concurrencies (default 1 100 1000)"
    )
    args = parser.parse_args()
    settings = Settings.make(args.quick)
    if args.ks:
        settings.ks = args.ks
    raise_fd_limit()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results = trio.run(
        measure,
        settings,
        args.server or list(SERVERS),
        args.scenario or list(SCENARIOS),
        args.out if args.profile else None,
    )
    wall = time.monotonic() - started
    table = markdown(results, settings)
    command = " ".join(
        ["python -m benchmarks.compare"]
        + (["--quick"] if args.quick else [])
        + (["--profile"] if args.profile else [])
        + ([f"--doc {args.doc}"] if args.doc else [])
    )
    document = {
        "command": command,
        "date": _report.today(),
        "settings": attrs.asdict(settings),
        "wall_s": round(wall, 1),
        "machine": _report.machine(),
        "versions": _report.versions(),
        "results": results,
    }
    (args.out / "comparison.json").write_text(json.dumps(document, indent=2) + "\n")
    section = _report.generated_section(document, table, settings.ks, quick=settings.quick)
    (args.out / "comparison.md").write_text(section + "\n")
    if args.doc:
        _report.update_document(args.doc, section)
    print(section)


if __name__ == "__main__":
    main()
