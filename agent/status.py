"""The agent's state as the outside sees it: /status, /healthz (also the watchdog's check),
/metrics and the TPU and broker views. Reads only; anything blocking runs in a thread."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dgdm.agent import __version__
from dgdm.agent.answers import outbox_json
from dgdm.agent.metrics import Snapshot
from dgdm.common.errors import DgdmError

if TYPE_CHECKING:
    from dgdm.agent.alerts import Alerts
    from dgdm.agent.config import AgentConfig
    from dgdm.agent.metrics import AgentMetrics
    from dgdm.agent.telemetry import LatencyWindow
    from dgdm.agent.tpu import TpuMonitor
    from dgdm.agent.work import WorkQueue
    from dgdm.kernels.engine import Engine
    from dgdm.sync.link import DeviceLink
    from dgdm.sync.outbox import Outbox, OutboxStats

log = logging.getLogger("dgdm.agent")
LOOP_LAG_UNHEALTHY_S = 5.0


@dataclass(frozen=True)
class AgentView:
    """The parts of a running agent that its views read, as of one request
    (`Agent.view()`): the config as reloaded last, the link and TPU once started."""

    config: AgentConfig
    engine: Engine
    work: WorkQueue
    outbox: Outbox | None
    link: DeviceLink | None
    tpu: TpuMonitor | None
    latency: LatencyWindow
    alerts: Alerts
    loop_lag_s: float
    uptime_s: float
    started_wall: float
    active_backend: str
    http_connections: int
    http_serving: int  # processes listening on the port: the agent and its serving ones

    async def outbox_stats(self) -> OutboxStats | None:
        if self.outbox is None:
            return None
        return await asyncio.to_thread(self.outbox.stats)


async def status(view: AgentView) -> dict[str, Any]:
    from dgdm.sync.settings import summary

    stats = await view.outbox_stats()
    latency = view.latency
    return {
        "device_id": view.config.device.id,
        "agent_version": __version__,
        "uptime_s": round(view.uptime_s, 3),
        "loop_lag_ms": round(view.loop_lag_s * 1000, 1),
        "started_ms": int(view.started_wall * 1000),
        "active_backend": view.active_backend,
        "backends": view.engine.backends_status(),
        "tpu": tpu_json(view.tpu, view.config.tpu.temperature_limit_c),
        "broker": broker_json(view.link, bool(view.config.sync.broker_url)),
        "outbox": outbox_json(stats),
        "queue": {"in_flight": view.work.in_flight, "capacity": view.work.capacity},
        "http": {"processes": view.config.http.processes, "serving": view.http_serving},
        "diffusions": latency.count,
        "latency_ms": latency.recent_percentiles(),
        "recent_latency_ms": [round(ms, 3) for _, ms in list(latency.recent)[-60:]],
        "alerts": list(view.alerts.recent)[-10:],
        "config": summary(view.config),
    }


def tpu_json(tpu: TpuMonitor | None, limit_c: float) -> dict[str, Any]:
    reading = tpu.reading.to_json() if tpu else {"present": False}
    protecting = bool(tpu and tpu.protecting)
    return {**reading, "temperature_limit_c": limit_c, "thermal_protection": protecting}


def broker_json(link: DeviceLink | None, configured: bool) -> dict[str, Any]:
    if link is None:
        return {"configured": configured, "connected": False}
    return {
        "configured": True,
        "connected": link.connected,
        "last_sync_ms": link.last_sync_ms,
        "wire": link.mqtt.active_wire,  # sync.wire, or "paho" where lean is unsupported
        "clock_skew_ms": link.clock_skew_ms(),  # the wall clock against the coordinator's
    }


async def health(
    loop_lag_s: float, outbox: Outbox | None, engine: Engine, work: WorkQueue
) -> tuple[bool, dict[str, Any]]:
    checks: dict[str, Any] = {"loop": loop_lag_s < LOOP_LAG_UNHEALTHY_S}
    checks["store"] = await _store_ok(outbox)
    checks["backend"] = any(
        b.get("available") and b.get("healthy", True) for b in engine.backends_status()
    )
    # A diffusion that did not stop at its deadline still holds its worker.
    checks["workers"] = not work.stuck()
    return all(checks.values()), checks


async def _store_ok(outbox: Outbox | None) -> bool:
    if outbox is None:
        return True
    try:
        stats = await asyncio.wait_for(asyncio.to_thread(outbox.stats), 2.0)
    except (TimeoutError, DgdmError) as exc:
        log.warning("outbox check failed", extra={"error": str(exc)})
        return False
    return not stats.storage_full


async def metrics_text(view: AgentView, metrics: AgentMetrics) -> bytes:
    stats = await view.outbox_stats()
    reading = view.tpu.reading if view.tpu else None
    link = view.link
    snapshot = Snapshot(
        outbox_messages={k: v.messages for k, v in stats.kinds.items()} if stats else {},
        outbox_bytes={k: v.bytes for k, v in stats.kinds.items()} if stats else {},
        outbox_dropped=stats.dropped if stats else 0,
        outbox_max_bytes=view.config.sync.max_outbox_bytes,
        mqtt_connected=link.connected if link is not None else None,
        last_sync_s=_seconds(link.last_sync_ms if link is not None else None),
        tpu_present=bool(reading and reading.present),
        tpu_temp_c=reading.temp_c if reading else None,
        tpu_temp_limit_c=view.config.tpu.temperature_limit_c,
        queue_depth=view.work.in_flight,
        backend_failures={b["name"]: b["failures"] for b in view.engine.backends_status()},
        active_backend=view.active_backend,
        envelopes_rejected=_rejected(link),
        http_connections=view.http_connections,
    )
    metrics.thermal_throttled.set(int(bool(view.tpu and view.tpu.protecting)))
    return metrics.render(snapshot)


def _rejected(link: DeviceLink | None) -> dict[str, int]:
    """The link counts each rejection as `rejected_<reason>`."""
    if link is None:
        return {}
    prefix = "rejected_"
    return {k[len(prefix) :]: v for k, v in link.counters.items() if k.startswith(prefix)}


def _seconds(ms: int | None) -> float | None:
    return None if ms is None else ms / 1000.0
