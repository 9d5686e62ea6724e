"""The agent's state as the outside sees it: /status, /healthz (also the watchdog's check),
/metrics and the TPU and broker views. Reads only; anything blocking runs in a thread."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from dgdm.agent import __version__
from dgdm.agent.answers import outbox_json
from dgdm.agent.metrics import Snapshot
from dgdm.common.errors import DgdmError

if TYPE_CHECKING:
    from dgdm.agent.runtime import Agent

log = logging.getLogger("dgdm.agent")
LOOP_LAG_UNHEALTHY_S = 5.0


async def status(agent: Agent) -> dict[str, Any]:
    from dgdm.sync.settings import summary

    stats = await agent.outbox_stats()
    latency = agent.latency
    return {
        "device_id": agent.config.device.id,
        "agent_version": __version__,
        "uptime_s": round(agent.uptime_s(), 3),
        "loop_lag_ms": round(agent.loop_lag_s * 1000, 1),
        "started_ms": int(agent.started_wall * 1000),
        "active_backend": agent.active_backend(),
        "backends": agent.engine.backends_status(),
        "tpu": tpu_json(agent),
        "broker": broker_json(agent),
        "outbox": outbox_json(stats),
        "queue": {"in_flight": agent.work.in_flight, "capacity": agent.work.capacity},
        "diffusions": latency.count,
        "latency_ms": latency.recent_percentiles(),
        "recent_latency_ms": [round(ms, 3) for _, ms in list(latency.recent)[-60:]],
        "alerts": list(agent.alerts.recent)[-10:],
        "config": summary(agent.config),
    }


def tpu_json(agent: Agent) -> dict[str, Any]:
    reading = agent.tpu.reading.to_json() if agent.tpu else {"present": False}
    limit = agent.config.tpu.temperature_limit_c
    protecting = bool(agent.tpu and agent.tpu.protecting)
    return {**reading, "temperature_limit_c": limit, "thermal_protection": protecting}


def broker_json(agent: Agent) -> dict[str, Any]:
    if agent.link is None:
        return {"configured": bool(agent.config.sync.broker_url), "connected": False}
    last = getattr(agent.link, "last_sync_ms", None)
    wire = agent.link.mqtt.active_wire  # sync.wire, or "paho" where lean is unsupported
    connected = bool(agent.link.connected)
    skew = agent.link.clock_skew_ms()  # the wall clock against the coordinator's (SPEC §6.1)
    return {
        "configured": True,
        "connected": connected,
        "last_sync_ms": last,
        "wire": wire,
        "clock_skew_ms": skew,
    }


async def health(agent: Agent) -> tuple[bool, dict[str, Any]]:
    checks: dict[str, Any] = {"loop": agent.loop_lag_s < LOOP_LAG_UNHEALTHY_S}
    checks["store"] = await _store_ok(agent.outbox)
    checks["backend"] = any(
        b.get("available") and b.get("healthy", True) for b in agent.engine.backends_status()
    )
    # A diffusion that did not stop at its deadline still holds its worker.
    checks["workers"] = not agent.work.stuck()
    return all(checks.values()), checks


async def _store_ok(outbox: Any) -> bool:
    if outbox is None:
        return True
    try:
        stats = await asyncio.wait_for(asyncio.to_thread(outbox.stats), 2.0)
    except (TimeoutError, DgdmError) as exc:
        log.warning("outbox check failed", extra={"error": str(exc)})
        return False
    return not stats.storage_full


async def metrics_text(agent: Agent) -> bytes:
    stats = await agent.outbox_stats()
    reading = agent.tpu.reading if agent.tpu else None
    link = agent.link
    snapshot = Snapshot(
        outbox_messages={k: v.messages for k, v in stats.kinds.items()} if stats else {},
        outbox_bytes={k: v.bytes for k, v in stats.kinds.items()} if stats else {},
        outbox_dropped=stats.dropped if stats else 0,
        outbox_max_bytes=agent.config.sync.max_outbox_bytes,
        mqtt_connected=bool(link.connected) if link is not None else None,
        last_sync_s=_seconds(getattr(link, "last_sync_ms", None)),
        tpu_present=bool(reading and reading.present),
        tpu_temp_c=reading.temp_c if reading else None,
        tpu_temp_limit_c=agent.config.tpu.temperature_limit_c,
        queue_depth=agent.work.in_flight,
        backend_failures={b["name"]: b["failures"] for b in agent.engine.backends_status()},
        active_backend=agent.active_backend(),
        envelopes_rejected=_rejected(link),
        http_connections=len(agent.connections),
    )
    agent.metrics.thermal_throttled.set(int(bool(agent.tpu and agent.tpu.protecting)))
    return agent.metrics.render(snapshot)


def _rejected(link: Any) -> dict[str, int]:
    """The link counts each rejection as `rejected_<reason>`."""
    counters = getattr(link, "counters", None) or {}
    prefix = "rejected_"
    return {k[len(prefix) :]: v for k, v in counters.items() if k.startswith(prefix)}


def _seconds(ms: int | None) -> float | None:
    return None if ms is None else ms / 1000.0
