"""The supersede, leak and storm scenarios of :mod:`benchmarks.compare`
(numbered 1 to 4 in its docstring), against the fake upstream."""

from __future__ import annotations

from functools import partial
from typing import Any

import httpx2
import trio

from benchmarks._compare_client import LIMITS, Context, Stream, hangs, quantiles_ms, stream


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
    run_b = partial(stream, ctx.b_client or ctx.client, within=settings.hang_timeout)
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
                    run_b,
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


async def settle(ctx: Context) -> dict[str, Any]:
    """/debug/tasks once live runs reached 0 (or after the settle timeout),
    plus a short pause."""
    with trio.move_on_after(ctx.settings.settle_timeout):
        while (await ctx.debug())["live_runs"]:  # noqa: ASYNC110 -- polls another process
            await trio.sleep(0.1)
    await trio.sleep(ctx.settings.settle_pause)
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
    # A client of its own, closed before the "after" reading: its idle
    # kept-alive connections would otherwise still be open on the server
    # (each a reader and an idle timer there until --keep-alive-timeout),
    # counted as tasks that are not left over from the runs.
    async with (
        httpx2.AsyncClient(
            base_url=str(ctx.client.base_url), timeout=ctx.client.timeout, limits=LIMITS
        ) as client,
        trio.open_nursery() as nursery,
    ):
        for index in range(settings.rapid):
            last = index == settings.rapid - 1
            directives = "@tokens=5 @delay=0" if last else "@tokens=200 @delay=0.02"
            result = Stream()
            streams.append(result)
            nursery.start_soon(
                partial(
                    stream,
                    client,
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
