"""agent/tally.py: a serving process's records, reported and replayed into the agent's
metrics, latency window and anomaly detector as if the agent had served them; a report is
bounded, and a malformed one (it crosses a process boundary) is skipped, never raised."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import generate_latest

from dgdm.agent.alerts import AlertPolicy, Alerts
from dgdm.agent.anomaly import LatencyDetector
from dgdm.agent.metrics import AgentMetrics
from dgdm.agent.tally import AgentTally, ForwardTally
from dgdm.agent.telemetry import LatencyWindow


class _Agent:
    """The parts of an agent a tally records into."""

    def __init__(self) -> None:
        self.metrics = AgentMetrics()
        self.latency = LatencyWindow()
        self.anomalies = LatencyDetector()
        self.alerts = Alerts(AlertPolicy(60.0, 10), lambda alert: None)


def _sample(agent: _Agent, name: str, labels: dict[str, str]) -> float:
    value = agent.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_a_replayed_report_counts_as_the_agents_own() -> None:
    forward, here = ForwardTally(), _Agent()
    forward.diffusions("sparse", 3, 0.5)
    forward.diffusions("sparse", 1, 0.25)
    forward.lone_call("ring", 16, 0.25, "sparse")
    forward.refused("slow_body")
    report = forward.report()
    assert report is not None
    assert forward.report() is None  # taken: the next one starts afresh
    AgentTally(here).replay(json.loads(json.dumps(report)))  # as it crosses the pipe
    labels = {"backend": "sparse", "source": "oip"}
    assert _sample(here, "dgdm_diffusions_total", labels) == 4
    assert here.latency.count == 2
    assert here.anomalies.baseline(("ring", 16)) is not None
    assert _sample(here, "dgdm_http_refused_total", {"reason": "slow_body"}) == 1


def test_a_report_is_bounded_and_keeps_the_counts() -> None:
    forward, here = ForwardTally(max_records=10), _Agent()
    for _ in range(25):
        forward.diffusions("numpy", 2, 0.1)
        forward.lone_call("g", 1, 0.1, "numpy")
    report = forward.report()
    assert report is not None
    assert len(report["calls"]) == 10
    assert len(report["lone"]) == 10
    AgentTally(here).replay(report)
    assert _sample(here, "dgdm_diffusions_total", {"backend": "numpy", "source": "oip"}) == 50
    assert here.latency.count == 10  # durations of the first max_records calls only


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=30,
)


@given(
    st.dictionaries(
        st.sampled_from(["calls", "uncounted", "lone", "refused", "event"]), _JSON, max_size=5
    )
)
def test_a_malformed_report_is_skipped(report: dict[str, Any]) -> None:
    here = _Agent()
    AgentTally(here).replay(report)
    generate_latest(here.metrics.registry)  # still renders
