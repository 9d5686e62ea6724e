"""Prometheus metrics of one coordinator (its own registry, so several can run in a test)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.messages_in = Counter(
            "dgdm_messages_in", "Envelopes stored, by kind", ["kind"], registry=self.registry
        )
        self.duplicates = Counter(
            "dgdm_duplicates", "Envelopes received again and ignored", registry=self.registry
        )
        self.rejects = Counter(
            "dgdm_coordinator_rejects",
            "Input dropped, by reason (rate_limited, device_queue_full, queue_full, bad_tag, ...)",
            ["reason"],
            registry=self.registry,
        )
        # Fair share (no per-device series: the top talkers are in GET /ingest).
        self.queue_messages = Gauge(
            "dgdm_coordinator_ingest_queue_messages",
            "Messages received and waiting for a store transaction",
            registry=self.registry,
        )
        self.queue_bytes = Gauge(
            "dgdm_coordinator_ingest_queue_bytes",
            "Bytes of envelopes waiting for a store transaction",
            registry=self.registry,
        )
        self.reading_paused = Gauge(
            "dgdm_coordinator_reading_paused",
            "1 while the ingest queue is full and the broker socket is not read",
            registry=self.registry,
        )
        self.flooding_alerts = Counter(
            "dgdm_coordinator_flooding_alerts",
            "device_flooding alerts raised (once per device per ingest.flooding_alert_s)",
            registry=self.registry,
        )
        self.quarantined = Counter(
            "dgdm_coordinator_quarantined",
            "Authenticated envelopes refused, recorded in quarantine and receipted, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.receipts = Counter("dgdm_receipts_sent", "Receipts published", registry=self.registry)
        self.commands = Counter("dgdm_commands_sent", "Commands published", registry=self.registry)
        self.commands_resent = Counter(
            "dgdm_coordinator_commands_resent",
            "Unreplied commands published again (a lost publish; the device runs a seq once)",
            registry=self.registry,
        )
        self.http_refused = Counter(
            "dgdm_coordinator_http_refused",
            "API connections or requests cut off by a limit (evicted_idle, refused_all_busy, "
            "slow_body, body_budget)",
            ["reason"],
            registry=self.registry,
        )
        self.jobs_aborted = Counter(
            "dgdm_coordinator_jobs_aborted",
            "Jobs stopped by their failure gate (by this replica's job runner)",
            registry=self.registry,
        )
        self.job_targets = Gauge(
            "dgdm_coordinator_job_targets",
            "Devices of running jobs, by their job state (queued, sent, succeeded, ...)",
            ["state"],
            registry=self.registry,
        )
        self.jobs_active = Gauge(
            "dgdm_coordinator_jobs_active", "Jobs running (fleet-wide)", registry=self.registry
        )
        self.devices_online = Gauge(
            "dgdm_devices_online", "Devices whose status is online", registry=self.registry
        )
        # Health for the alert rules (ansible/roles/dgdm_monitoring): read at scrape time.
        self.store_up = Gauge(
            "dgdm_coordinator_store_up",
            "0 while the store refuses ingest transactions (nothing is receipted), else 1",
            registry=self.registry,
        )
        self.broker_connected = Gauge(
            "dgdm_coordinator_mqtt_connected",
            "1 while connected to the broker",
            registry=self.registry,
        )
        self.devices_enrolled = Gauge(
            "dgdm_devices_enrolled",
            "Devices enrolled (as last read from the store); minus dgdm_devices_online: offline",
            registry=self.registry,
        )
        self.ingest_batches = Counter(
            "dgdm_coordinator_ingest_batches",
            "Ingest transactions committed (its rate is zero while ingest is stalled)",
            registry=self.registry,
        )

    def follow(
        self,
        *,
        store_up: Callable[[], bool],
        broker_connected: Callable[[], bool],
        devices_enrolled: Callable[[], int],
    ) -> None:
        """The gauges whose values the coordinator knows: read on each scrape."""
        self.store_up.set_function(lambda: float(store_up()))
        self.broker_connected.set_function(lambda: float(broker_connected()))
        self.devices_enrolled.set_function(lambda: float(devices_enrolled()))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def value(self, name: str, **labels: str) -> float:
        """A sample's current value (0 when absent), for tests and the CLI."""
        found = self.registry.get_sample_value(name, labels or None)
        return float(found or 0.0)
