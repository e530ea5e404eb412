"""``GET /metrics`` in cluster mode: the coordinator's counters (read when
scraped) and the histogram of waits for another node's cleanup."""

from __future__ import annotations

from collections.abc import Iterator

import attrs
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..cluster.held import ClusterMetrics
from .metrics import PREFIX, SUPERSEDE_WAIT_BUCKETS

_COUNTERS = (
    ("lease_acquisitions", "Session leases taken fresh (nobody held the session)."),
    ("handovers_received", "Session leases another node handed to this one."),
    ("handovers_given", "Session leases this node handed to another after its run's cleanup."),
    ("orphans_ended", "Runs of an owner whose lease expired, ended owner_lost by this node."),
    ("owner_lost", "Session leases this node lost (its runs ended owner_lost)."),
    ("cancels_sent", "Intents (supersede, rollback, enqueue, stop) sent to another node."),
    ("cancels_handled", "Intents this node answered."),
    ("fenced_writes_refused", "Writes Redis refused because the lease had moved on."),
    ("backend_errors", "Redis calls that failed or timed out."),
)


@attrs.define(eq=False)
class ClusterCollector(Collector):
    metrics: ClusterMetrics

    def collect(self) -> Iterator[Metric]:
        for name, documentation in _COUNTERS:
            yield CounterMetricFamily(
                f"{PREFIX}_cluster_{name}", documentation, value=getattr(self.metrics, name)
            )
        yield GaugeMetricFamily(
            f"{PREFIX}_cluster_reachable",
            "1 while the latest Redis call worked.",
            value=int(self.metrics.reachable),
        )


def install_cluster_metrics(registry: CollectorRegistry, metrics: ClusterMetrics) -> None:
    registry.register(ClusterCollector(metrics))
    remote_wait = Histogram(
        f"{PREFIX}_cluster_remote_cleanup_wait_seconds",
        "From sending an intent to another node until it handed the session over "
        "(its run's cleanup, or a dead owner's lease running out).",
        buckets=SUPERSEDE_WAIT_BUCKETS,
        registry=registry,
    )
    metrics.on_remote_wait = remote_wait.observe
