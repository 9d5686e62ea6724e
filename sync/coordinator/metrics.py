"""Prometheus metrics of one coordinator (its own registry, so several can run in a test)."""

from __future__ import annotations

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
            "dgdm_rejects", "Input dropped, by reason", ["reason"], registry=self.registry
        )
        self.quarantined = Counter(
            "dgdm_quarantined",
            "Authenticated envelopes refused, recorded in quarantine and receipted, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.receipts = Counter("dgdm_receipts_sent", "Receipts published", registry=self.registry)
        self.commands = Counter("dgdm_commands_sent", "Commands published", registry=self.registry)
        self.devices_online = Gauge(
            "dgdm_devices_online", "Devices whose status is online", registry=self.registry
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def value(self, name: str, **labels: str) -> float:
        """A sample's current value (0 when absent), for tests and the CLI."""
        found = self.registry.get_sample_value(name, labels or None)
        return float(found or 0.0)
