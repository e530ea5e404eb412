"""Side by side: trio-stream-server against the two asyncio baselines.

For each server (ours, ``asyncio_registry``, ``asyncio_taskgroup``) a fake
OpenAI-compatible upstream runs in this process (trio, loopback), and for
each scenario a fresh server subprocess is started against it on loopback
(``--smoke``: one for all of them), driven over real HTTP, and stopped.
Scenarios:

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

    python -m benchmarks.compare [--quick | --smoke] [--out benchmarks/results]

``--quick`` runs every scenario small (orientation, ~90 s); ``--smoke`` one
tiny case of each (a few seconds; the test suite runs it with ``--profile
--doc`` to keep the harness working). The modules beside this one hold the
client and settings (``_compare_client``), the scenarios (``_scenarios``,
``_throughput``, ``_seeds``), the table (``_table``), the processes
(``_compare_proc``) and the rest of the report (``_report``).

Writes ``comparison.json`` and ``comparison.md`` under ``--out`` and prints
the Markdown table.
"""

from __future__ import annotations

import argparse
import json
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

from benchmarks import _report
from benchmarks._compare_client import LIMITS, SCALES, Context, Settings
from benchmarks._compare_proc import (
    SERVERS,
    ServerProcess,
    raise_fd_limit,
    running_process,
    running_server,
)
from benchmarks._scenarios import leaks, storm, supersede
from benchmarks._seeds import SEEDS, seeds
from benchmarks._table import markdown
from benchmarks._throughput import throughput
from tests.fakes import FakeUpstream, open_fake_upstream

__all__ = ["SCALES", "SCENARIOS", "SEEDS", "main"]

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
    name: str,
    server: str,
    fake: FakeUpstream,
    settings: Settings,
    profile_dir: Path | None,
    shared: ServerProcess | None = None,
) -> dict[str, Any]:
    """One scenario against a fresh server process, or against ``shared``
    (already running against ``fake``) where the scenario uses the fake."""
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
                    shared = None
                if shared is not None:
                    process = shared
                else:
                    process = await stack.enter_async_context(running_server(server, upstream_url))
                tail = process.log_tail
                async with httpx2.AsyncClient(
                    base_url=process.url, timeout=settings.hang_timeout + 10, limits=LIMITS
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
    results: dict[str, Any] = {server: {} for server in servers}

    async def measure_server(server: str) -> None:
        started = time.monotonic()
        # One fake per server: what one server leaves stalled cannot touch the next.
        async with open_fake_upstream(default_delay=0.01) as fake, AsyncExitStack() as stack:
            shared = None
            if settings.share_server:
                # The smoke: one process for every scenario on the fake
                # (each scenario uses sessions of its own).
                shared = await stack.enter_async_context(running_server(server, fake.url))
            for name in scenarios:
                results[server][name] = await run_scenario(
                    name, server, fake, settings, profile_dir, shared
                )
        print(f"{server}: {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)

    if settings.servers_at_once:
        # Only where no figure means anything (the smoke): the servers
        # would share the CPU and disturb each other's readings.
        async with trio.open_nursery() as nursery:
            for server in servers:
                nursery.start_soon(measure_server, server)
    else:
        for server in servers:
            await measure_server(server)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    scale = parser.add_mutually_exclusive_group()
    scale.add_argument(
        "--quick", action="store_const", const="quick", dest="scale", help="every scenario small"
    )
    scale.add_argument(
        "--smoke",
        action="store_const",
        const="smoke",
        dest="scale",
        help="one tiny case of each scenario: checks the harness, measures nothing",
    )
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
    settings = Settings.make(args.scale or "full")
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
        + ([f"--{args.scale}"] if args.scale else [])
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
    section = _report.generated_section(document, table, settings.ks, scale=settings.scale)
    (args.out / "comparison.md").write_text(section + "\n")
    if args.doc:
        _report.update_document(args.doc, section)
    print(section)


if __name__ == "__main__":
    main()
