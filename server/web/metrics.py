"""``GET /metrics``: Prometheus text format, from a registry of this app's own.

Each app has its own :class:`~prometheus_client.CollectorRegistry` (never the
global one), so several apps in one process (tests) count separately.

Where the numbers come from, without parsing a log line:

* events counted as they happen: runs started and ended (by status and
  reason), supersede waits, time to first token and coalesced deltas, through
  :class:`MeteredObserver`, which wraps the run store's observer (the engine's
  :class:`~server.core.run.RunObserver` seam); frames, events and bytes
  written to clients through the response body's
  :class:`~server.web.streaming.StreamMeter`;
* values read when scraped: active sessions and runs from the engine, live
  trio tasks by walking the task tree, threads, abandoned worker threads from
  the blocking adapter's accounting, failed store writes from the store.

Served without the admin key: it carries aggregates only (no run, session or
principal ids, no labels a client controls), and a scraper needs no secret.
Keep it off the public internet at the proxy (see docs/operations.md).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Protocol

import attrs
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector
from quart import Response
from quart_trio import QuartTrio

from ..core.result import RunResult
from ..core.run import Run, RunObserver
from .tasktree import count_live_tasks

PREFIX = "stream_server"
# Supersede waits are cleanup times: milliseconds normally, up to the
# cleanup budget (5 s by default) when an agent is slow to stop.
SUPERSEDE_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
FIRST_TOKEN_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)


def end_reason(result: RunResult) -> str:
    """The ``reason`` label: the cancel reason of a cancelled or interrupted
    run, the error code of a failed one, ``none`` for a completed one."""
    return result.end_reason


@attrs.define(eq=False)
class Metrics:
    """The app's registry and the counters the engine and the edge move."""

    registry: CollectorRegistry = attrs.field(factory=CollectorRegistry)
    runs_started: Counter = attrs.field(init=False)
    runs_ended: Counter = attrs.field(init=False)
    supersede_wait: Histogram = attrs.field(init=False)
    first_token: Histogram = attrs.field(init=False)
    coalesced_deltas: Counter = attrs.field(init=False)
    # Plain ints on the per-frame path (a prometheus_client Counter takes a
    # lock per inc: ~1 µs, against ~40 µs for Hypercorn to write a frame),
    # exposed by StreamCollector when scraped.
    streamed_frames: int = attrs.field(default=0, init=False)
    streamed_events: int = attrs.field(default=0, init=False)
    streamed_bytes: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        registry = self.registry
        self.runs_started = Counter(f"{PREFIX}_runs_started", "Runs started.", registry=registry)
        self.runs_ended = Counter(
            f"{PREFIX}_runs_ended",
            "Runs ended, by terminal status and reason "
            "(cancel reason, error code, or none when completed).",
            ["status", "reason"],
            registry=registry,
        )
        self.supersede_wait = Histogram(
            f"{PREFIX}_supersede_wait_seconds",
            "From a superseding prompt's admission until the previous run's cleanup "
            "finished and the new run started.",
            buckets=SUPERSEDE_WAIT_BUCKETS,
            registry=registry,
        )
        self.first_token = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "From run.started to the first run.delta, observed when the run ends.",
            buckets=FIRST_TOKEN_BUCKETS,
            registry=registry,
        )
        self.coalesced_deltas = Counter(
            f"{PREFIX}_coalesced_deltas",
            "Agent deltas merged into another one's run.delta by the coalescing window, "
            "counted when the run ends.",
            registry=registry,
        )
        registry.register(StreamCollector(self))
        ProcessCollector(registry=registry)

    # --- the engine (through MeteredObserver) --------------------------------

    def run_started(self, run: Run) -> None:
        self.runs_started.inc()
        if run.supersedes is not None and run.admitted_at is not None:
            assert run.started_at is not None
            self.supersede_wait.observe(run.started_at - run.admitted_at)

    def run_ended(self, run: Run, result: RunResult) -> None:
        self.runs_ended.labels(status=result.status.value, reason=end_reason(result)).inc()
        if run.first_delta_at is not None and run.started_at is not None:
            self.first_token.observe(run.first_delta_at - run.started_at)
        self.coalesced_deltas.inc(run.coalesced_deltas)

    # --- the edge (StreamMeter) ---------------------------------------------

    def frame_sent(self, *, events: int, nbytes: int) -> None:
        self.streamed_frames += 1
        self.streamed_events += events
        self.streamed_bytes += nbytes

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


@attrs.define(eq=False)
class MeteredObserver:
    """Counts runs for :class:`Metrics`, then passes each call on to the
    observer it wraps (the run store's). Counting is synchronous and comes
    first, so it happens even when the wrapped call fails or is cancelled."""

    inner: RunObserver
    metrics: Metrics

    async def run_started(self, run: Run) -> None:
        self.metrics.run_started(run)
        await self.inner.run_started(run)

    async def run_ended(self, run: Run, result: RunResult) -> None:
        self.metrics.run_ended(run, result)
        await self.inner.run_ended(run, result)

    async def run_discarded(self, run: Run) -> None:
        await self.inner.run_discarded(run)


@attrs.define(eq=False)
class StreamCollector(Collector):
    """What streaming responses wrote (counted in :meth:`Metrics.frame_sent`)."""

    metrics: Metrics

    def collect(self) -> Iterator[Metric]:
        yield _counter(
            "streamed_frames",
            "Frames written to streaming clients (heartbeats included).",
            self.metrics.streamed_frames,
        )
        yield _counter(
            "streamed_events",
            "Run events written to streaming clients.",
            self.metrics.streamed_events,
        )
        yield _counter(
            "streamed_bytes",
            "Body bytes written to streaming clients (heartbeats included).",
            self.metrics.streamed_bytes,
        )


@attrs.frozen(kw_only=True)
class EngineGauges:
    """What the engine and the process report when scraped."""

    sessions: int
    runs: int
    draining: bool
    store_write_failures: int
    abandoned_threads: int


class MetricsSource(Protocol):
    """What ``GET /metrics`` reads: the app's counters, and the engine's
    gauges when scraped (:class:`~server.web.state.AppState` is one)."""

    metrics: Metrics

    def engine_gauges(self) -> EngineGauges: ...


@attrs.define(eq=False)
class EngineCollector(Collector):
    """Values read from the engine and the process when scraped (in the trio
    thread: the scrape is a request handler)."""

    gauges: Callable[[], EngineGauges]

    def collect(self) -> Iterator[Metric]:
        engine = self.gauges()
        yield _gauge("sessions_active", "Sessions in the session table.", engine.sessions)
        yield _gauge("runs_active", "Runs producing or cleaning up.", engine.runs)
        yield _gauge(
            "draining", "1 while shutting down (not admitting runs).", int(engine.draining)
        )
        yield _gauge("trio_tasks", "Live trio tasks (the whole task tree).", count_live_tasks())
        yield _gauge("threads", "Live Python threads.", threading.active_count())
        yield _counter(
            "abandoned_threads",
            "Worker threads the blocking adapter gave up waiting for.",
            engine.abandoned_threads,
        )
        yield _counter(
            "store_write_failures", "Run store writes that failed.", engine.store_write_failures
        )


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"{PREFIX}_{name}", documentation, value=value)


def install_metrics_route(app: QuartTrio, source: MetricsSource) -> None:
    source.metrics.registry.register(EngineCollector(source.engine_gauges))

    @app.get("/metrics")
    async def metrics() -> Response:  # noqa: ASYNC124
        return Response(source.metrics.exposition(), content_type=CONTENT_TYPE_PLAIN_0_0_4)
