"""The seed scenarios of :mod:`benchmarks.compare` (6 in its docstring):
normal, stop, supersede, rapid and multi-session, each pass or fail."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio

from benchmarks._compare_client import Context, Stream, stream


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
    with trio.move_on_after(ctx.settings.seed_wait):
        record = await ctx.fake.wait_for_request(lambda r: r.session == session)
        await ctx.fake.wait_ended(record)
        return None
    return f"upstream stream still open {ctx.settings.seed_wait} s after the client left"


async def seed_supersede(ctx: Context) -> str | None:
    session = f"{ctx.tag}-sup"
    run = partial(stream, ctx.client, session, within=ctx.settings.seed_timeout)
    a, b, first = Stream(), Stream(), trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(run, "A @tokens=200 @delay=0.02", result=a, first_content=first))
        with trio.move_on_after(ctx.settings.seed_wait):
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
        with trio.move_on_after(ctx.settings.seed_wait):
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
