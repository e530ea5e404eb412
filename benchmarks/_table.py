"""The Markdown table of :mod:`benchmarks.compare`: one row per figure, one
column per server."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from benchmarks._compare_client import Settings
from benchmarks._seeds import SEEDS


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
