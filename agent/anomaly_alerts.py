"""The `latency_anomaly` alert: feeds each registered topology's diffusion latency to the
detector (`anomaly.LatencyDetector`) and raises or clears the alert through `Alerts`.

The baseline is per (graph id, feature width): a wider feature set is slower by design.
While a key is raised every anomalous sample re-offers the condition and every normal one
the recovery, so the alert policy's rules hold (announced once per `alerts.repeat_s`, and
an announcement the rate limit held back goes out with a later sample).
"""

from __future__ import annotations

from typing import Any

from dgdm.agent.alerts import INFO, WARNING, Alert, Alerts
from dgdm.agent.anomaly import Baseline, Decision, LatencyDetector

CODE = "latency_anomaly"
RECOVERY_CODE = "latency_normal"


def watch(
    detector: LatencyDetector, alerts: Alerts, graph_id: str, result: Any, now: float
) -> Decision | None:
    """One finished diffusion of a registered topology."""
    width = int(result.embedding.shape[-1]) if result.embedding.ndim else 0
    latency_s = result.latency_ms / 1000.0
    return watch_sample(
        detector, alerts, graph_id, width, latency_s=latency_s, backend=result.backend, now=now
    )


def watch_sample(
    detector: LatencyDetector,
    alerts: Alerts,
    graph_id: str,
    width: int,
    *,
    latency_s: float,
    backend: str,
    now: float,
) -> Decision | None:
    """One diffusion's latency, of `width` features (a serving process's, replayed)."""
    key = (graph_id, width)
    decision = detector.observe(key, latency_s, now)
    state = detector.baseline(key)
    if state is None or state.samples < detector.params.min_samples:
        return decision
    if state.raised:
        alerts.condition(anomaly_alert(graph_id, width, state, backend, now))
    else:
        alerts.resolved(policy_key(graph_id, width), recovery_alert(graph_id, width, state))
    return decision


def policy_key(graph_id: str, width: int) -> str:
    """What the alert policy tracks one topology's condition by."""
    return f"{CODE}:{graph_id}:f{width}"


def anomaly_alert(graph_id: str, width: int, state: Baseline, backend: str, now: float) -> Alert:
    observed, mean = state.last_s * 1000.0, state.mean_s * 1000.0
    message = (
        f"Diffusion latency of topology {graph_id!r} (F = {width}) is {observed:.3g} ms, "
        f"against a baseline of {mean:.3g} ms (deviation {state.dev_s * 1000.0:.2g} ms)."
    )
    since = 0.0 if state.raised_at is None else max(0.0, now - state.raised_at)
    details = {**_numbers(graph_id, width, state), "backend": backend, "raised_for_s": since}
    return Alert(CODE, WARNING, message, details, key=policy_key(graph_id, width))


def recovery_alert(graph_id: str, width: int, state: Baseline) -> Alert:
    message = (
        f"Diffusion latency of topology {graph_id!r} (F = {width}) is back at its baseline "
        f"({state.mean_s * 1000.0:.3g} ms)."
    )
    return Alert(RECOVERY_CODE, INFO, message, _numbers(graph_id, width, state))


def _numbers(graph_id: str, width: int, state: Baseline) -> dict[str, Any]:
    return {
        "graph_id": graph_id,
        "features": width,
        "observed_ms": round(state.last_s * 1000.0, 4),
        "baseline_ms": round(state.mean_s * 1000.0, 4),
        "deviation_ms": round(state.dev_s * 1000.0, 4),
        "samples": state.samples,
    }
