"""The throughput scenario of :mod:`benchmarks.compare` (5 in its
docstring): bare-socket clients, the lean upstream, py-spy on request."""

from __future__ import annotations

import json
import re
import time
from functools import partial
from pathlib import Path
from typing import Any

import trio

from benchmarks import _profile
from benchmarks._compare_client import AUTH, CHAT, Context, Stream, body, hangs, quantiles_ms
from benchmarks._compare_proc import cpu_seconds, tree_cpu_seconds, tree_rss

TOKEN = re.compile(rb"tok\d")  # the fake upstreams' token text


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
    """K sessions at once, one answer each at 50 tokens/s (100 tokens at the
    quick and full scales), from the
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
        # The server's whole process tree: with --workers, its workers.
        peak = tree_rss(pid)
        rss_before = peak
        cpu_before = tree_cpu_seconds(pid)
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
            problem = await _profile.record(pid, settings.profile_seconds, raw_path)
            profile = {"error": problem} if problem else _profile.summarize(raw_path)
            profile["raw"] = str(raw_path)

        async def sample_rss() -> None:
            nonlocal peak
            while True:
                peak = max(peak, tree_rss(pid))
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
                                f"T @tokens={settings.throughput_tokens} @delay=0.02 {index}",
                                within=settings.throughput_timeout,
                                result=result,
                            )
                        )
                nursery.cancel_scope.cancel()
            wall = trio.current_time() - started
            cpu = tree_cpu_seconds(pid) - cpu_before
            upstream_cpu = (cpu_seconds(ctx.upstream_pid) if ctx.upstream_pid else 0.0) - (
                upstream_cpu_before
            )
            client_cpu = time.process_time() - client_cpu_before
        tokens = sum(s.tokens for s in streams)
        ttft = [s.first_content_at - s.sent_at for s in streams if s.first_content_at is not None]
        rows[str(k)] = {
            "sessions": k,
            "tokens": tokens,
            "expected_tokens": settings.throughput_tokens * k,
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
