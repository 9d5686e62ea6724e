"""What a diffusion served over the Open Inference Protocol counts, wherever it ran.

The agent's own OIP routes record into `AgentTally`: its metrics, its latency window and
the `latency_anomaly` detector. A serving process (`http.processes` > 1, agent/serving.py)
records the same calls into a `ForwardTally`, which it hands to the agent as one JSON
report a second; the agent replays each report into its `AgentTally`, so `/metrics`,
`/status` and the alerts count every process's work. A report is bounded: past
MAX_RECORDS calls in one second, a call counts its feature sets without its duration.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import TYPE_CHECKING, Any, Protocol

from dgdm.agent import anomaly_alerts

if TYPE_CHECKING:
    from dgdm.agent.runtime import Agent

MAX_RECORDS = 50_000


class Tally(Protocol):
    def diffusions(self, backend: str, sets: int, latency_ms: float) -> None:
        """One backend call that served `sets` feature sets."""

    def lone_call(self, graph_id: str, width: int, latency_ms: float, backend: str) -> None:
        """A call that served one request alone: its latency feeds `latency_anomaly`."""

    def refused(self, reason: str) -> None:
        """A connection or body the HTTP limits refused (dgdm_http_refused_total)."""


class AgentTally:
    """Records into the agent. The metric children are looked up once per backend (a label
    lookup costs as much as the rest of the count)."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._children: dict[str, tuple[Any, Any]] = {}

    def diffusions(self, backend: str, sets: int, latency_ms: float) -> None:
        counter, duration = self._of(backend)
        self.agent.latency.record(latency_ms)
        counter.inc(sets)
        duration.observe(latency_ms / 1000.0)

    def lone_call(self, graph_id: str, width: int, latency_ms: float, backend: str) -> None:
        agent = self.agent
        anomaly_alerts.watch_sample(
            agent.anomalies,
            agent.alerts,
            graph_id,
            width,
            latency_s=latency_ms / 1000.0,
            backend=backend,
            now=time.monotonic(),
        )

    def refused(self, reason: str) -> None:
        self.agent.metrics.http_refused.labels(reason).inc()

    def replay(self, report: dict[str, Any]) -> None:
        """A serving process's report (ForwardTally.report); a malformed entry is skipped."""
        for entry in _entries(report, "calls", 3):
            backend, sets, ms = entry
            if isinstance(backend, str) and _count(sets) and _number(ms):
                self.diffusions(backend, sets, float(ms))
        for entry in _entries(report, "uncounted", 2):
            backend, sets = entry
            if isinstance(backend, str) and _count(sets):
                self._of(backend)[0].inc(sets)
        for entry in _entries(report, "lone", 4):
            graph_id, width, ms, backend = entry
            if isinstance(graph_id, str) and _count(width) and _number(ms):
                self.lone_call(graph_id, width, float(ms), str(backend))
        for entry in _entries(report, "refused", 2):
            reason, n = entry
            if isinstance(reason, str) and _count(n):
                self.agent.metrics.http_refused.labels(reason).inc(n)

    def _of(self, backend: str) -> tuple[Any, Any]:
        children = self._children.get(backend)
        if children is None:
            metrics = self.agent.metrics
            children = (metrics.diffusions.labels(backend, "oip"), metrics.duration.labels(backend))
            self._children[backend] = children
        return children


class ForwardTally:
    """A serving process's records, kept until `report()` takes them."""

    def __init__(self, max_records: int = MAX_RECORDS) -> None:
        self.max_records = max_records
        self._reset()

    def _reset(self) -> None:
        self._calls: list[tuple[str, int, float]] = []
        self._uncounted: Counter[str] = Counter()
        self._lone: list[tuple[str, int, float, str]] = []
        self._refused: Counter[str] = Counter()

    def diffusions(self, backend: str, sets: int, latency_ms: float) -> None:
        if len(self._calls) < self.max_records:
            self._calls.append((backend, sets, latency_ms))
        else:
            self._uncounted[backend] += sets

    def lone_call(self, graph_id: str, width: int, latency_ms: float, backend: str) -> None:
        if len(self._lone) < self.max_records:
            self._lone.append((graph_id, width, latency_ms, backend))

    def refused(self, reason: str) -> None:
        self._refused[reason] += 1

    def report(self) -> dict[str, Any] | None:
        """What was recorded since the last report (None: nothing), and start afresh."""
        if not (self._calls or self._uncounted or self._lone or self._refused):
            return None
        report = {
            "calls": self._calls,
            "uncounted": list(self._uncounted.items()),
            "lone": self._lone,
            "refused": list(self._refused.items()),
        }
        self._reset()
        return report


def _entries(report: dict[str, Any], name: str, size: int) -> list[Any]:
    entries = report.get(name)
    if not isinstance(entries, list):
        return []
    return [e for e in entries if isinstance(e, (list, tuple)) and len(e) == size]


def _count(n: Any) -> bool:
    return type(n) is int and n >= 0


def _number(x: Any) -> bool:
    return type(x) in (int, float) and x >= 0
