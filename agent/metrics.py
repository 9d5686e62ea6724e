"""Prometheus metrics for `/metrics` (SPEC §4), all named `dgdm_...`, in the agent's own registry.

Event counters and the latency histogram are updated where things happen. Values owned by
other components (outbox depth, MQTT connection, TPU temperature) are read at scrape time
from a `Snapshot` the runtime gathers off the loop, so a scrape never touches SQLite on it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Diffusions take tens of microseconds to seconds: buckets cover that range.
_LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


@dataclass
class Snapshot:
    """State read from other components just before a scrape."""

    outbox_messages: dict[str, int] = field(default_factory=dict)
    outbox_bytes: dict[str, int] = field(default_factory=dict)
    outbox_dropped: int = 0
    outbox_max_bytes: int = 0  # sync.max_outbox_bytes: the cap eviction keeps it under
    mqtt_connected: bool | None = None
    last_sync_s: float | None = None
    tpu_present: bool = False
    tpu_temp_c: float | None = None
    tpu_temp_limit_c: float | None = None  # tpu.temperature_limit_c
    queue_depth: int = 0
    backend_failures: dict[str, int] = field(default_factory=dict)  # per backend name
    active_backend: str = "none"
    envelopes_rejected: dict[str, int] = field(default_factory=dict)  # per reason code
    http_connections: int = 0


class _SnapshotCollector(Collector):
    def __init__(self) -> None:
        self.snapshot = Snapshot()

    def collect(self) -> Iterator[Metric]:
        s = self.snapshot
        messages = GaugeMetricFamily(
            "dgdm_outbox_messages", "Messages waiting in the outbox.", labels=["kind"]
        )
        size = GaugeMetricFamily(
            "dgdm_outbox_bytes", "Bytes waiting in the outbox.", labels=["kind"]
        )
        for kind, count in sorted(s.outbox_messages.items()):
            messages.add_metric([kind], count)
            size.add_metric([kind], s.outbox_bytes.get(kind, 0))
        yield messages
        yield size
        yield CounterMetricFamily(
            "dgdm_outbox_dropped", "Messages evicted from a full outbox.", value=s.outbox_dropped
        )
        yield GaugeMetricFamily(
            "dgdm_outbox_max_bytes",
            "The outbox's cap (sync.max_outbox_bytes): beyond it the oldest messages are evicted.",
            value=s.outbox_max_bytes,
        )
        if s.mqtt_connected is not None:
            yield GaugeMetricFamily(
                "dgdm_mqtt_connected",
                "1 while connected to the broker.",
                value=int(s.mqtt_connected),
            )
        if s.last_sync_s is not None:
            yield GaugeMetricFamily(
                "dgdm_last_sync_timestamp_seconds",
                "Unix time of the last receipt from the coordinator.",
                value=s.last_sync_s,
            )
        yield GaugeMetricFamily(
            "dgdm_tpu_present", "1 when an Edge TPU is usable.", value=int(s.tpu_present)
        )
        if s.tpu_temp_c is not None:
            yield GaugeMetricFamily(
                "dgdm_tpu_temperature_celsius", "Edge TPU temperature.", value=s.tpu_temp_c
            )
        if s.tpu_temp_limit_c is not None:
            yield GaugeMetricFamily(
                "dgdm_tpu_temperature_limit_celsius",
                "Above it work is kept off the TPU (tpu.temperature_limit_c).",
                value=s.tpu_temp_limit_c,
            )
        yield GaugeMetricFamily(
            "dgdm_queue_depth", "Diffusions running or waiting.", value=s.queue_depth
        )
        failures = CounterMetricFamily(
            "dgdm_backend_failures",
            "Diffusion runs that failed on a backend (each fell back to the next one).",
            labels=["backend"],
        )
        active = GaugeMetricFamily(
            "dgdm_backend_active",
            "1 for the backend that answered last (or would answer next).",
            labels=["backend"],
        )
        for name, count in s.backend_failures.items():
            failures.add_metric([name], count)
            active.add_metric([name], int(name == s.active_backend))
        yield failures
        yield active
        rejected = CounterMetricFamily(
            "dgdm_envelopes_rejected",
            "Incoming envelopes (commands, receipts) dropped, by reason.",
            labels=["reason"],
        )
        for reason, count in sorted(s.envelopes_rejected.items()):
            rejected.add_metric([reason], count)
        yield rejected
        yield GaugeMetricFamily(
            "dgdm_http_connections", "Open HTTP connections.", value=s.http_connections
        )


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.diffusions = Counter(
            "dgdm_diffusions", "Diffusions computed.", ["backend", "source"], registry=r
        )
        self.diffusion_errors = Counter(
            "dgdm_diffusion_errors", "Diffusion requests refused or failed.", ["reason"], registry=r
        )
        self.duration = Histogram(
            "dgdm_diffusion_duration_seconds",
            "Diffusion compute time.",
            ["backend"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.rejected = Counter(
            "dgdm_queue_rejected", "Requests refused with 503: queue full.", registry=r
        )
        self.commands = Counter("dgdm_commands", "Commands executed.", ["cmd", "ok"], registry=r)
        self.http_refused = Counter(
            "dgdm_http_refused",
            "HTTP connections or requests cut off by a limit (evicted_idle, refused_all_busy, "
            "slow_body, body_budget).",
            ["reason"],
            registry=r,
        )
        self.alerts = Counter("dgdm_alerts", "Alerts queued.", ["code"], registry=r)
        self.spool_files = Counter(
            "dgdm_spool_files", "Spool files processed.", ["result"], registry=r
        )
        self.telemetry_batches = Counter(
            "dgdm_telemetry_batches", "Telemetry messages queued.", registry=r
        )
        self.thermal_throttled = Gauge(
            "dgdm_tpu_thermal_protection",
            "1 while work is kept off an overheating TPU.",
            registry=r,
        )
        self._snapshot = _SnapshotCollector()
        r.register(self._snapshot)
        # labels() costs a lock and a dict lookup per call; a diffusion is counted on every
        # request, so its children are looked up once per (backend, source).
        self._diffusion_children: dict[tuple[str, str], tuple[Any, Any]] = {}

    def count_diffusion(self, backend: str, source: str, seconds: float) -> None:
        children = self._diffusion_children.get((backend, source))
        if children is None:
            children = (self.diffusions.labels(backend, source), self.duration.labels(backend))
            self._diffusion_children[(backend, source)] = children
        children[0].inc()
        children[1].observe(seconds)

    def render(self, snapshot: Snapshot) -> bytes:
        self._snapshot.snapshot = snapshot
        return generate_latest(self.registry)
