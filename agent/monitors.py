"""The agent's periodic checks: loop lag, the systemd watchdog, the TPU, telemetry (with the
disk check) and the broker's reachability. Each loop runs until cancelled at shutdown and
reads its period from the live config, so SIGHUP changes take effect on the next round."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from dgdm.agent import status
from dgdm.agent.alerts import INFO, WARNING, Alert
from dgdm.agent.telemetry import SampleInputs, Sampler
from dgdm.common.errors import DgdmError

if TYPE_CHECKING:
    from dgdm.agent.runtime import Agent

log = logging.getLogger("dgdm.agent")
LAG_PERIOD_S = 0.25
BROKER_PERIOD_S = 1.0
BACKENDS_PERIOD_S = 1.0
CLOCK_PERIOD_S = 1.0
MONO_KEY = "_mono"  # a sample's monotonic time, until it is queued
EARLY_SAMPLES = 6


def loops(agent: Agent) -> list[Coroutine[Any, Any, None]]:
    jobs = [
        tpu_loop(agent),
        telemetry_loop(agent),
        lag_loop(agent),
        broker_loop(agent),
        backends_loop(agent),
        clock_loop(agent),
    ]
    if agent.notifier.watchdog_interval_s:
        jobs.append(watchdog_loop(agent))
    return jobs


async def lag_loop(agent: Agent) -> None:
    """Measures how late the loop wakes up: a blocked loop shows up here and in health."""
    while True:
        before = time.monotonic()
        await asyncio.sleep(LAG_PERIOD_S)
        agent.loop_lag_s = max(0.0, time.monotonic() - before - LAG_PERIOD_S)


async def watchdog_loop(agent: Agent) -> None:
    interval = agent.notifier.watchdog_interval_s or 1.0
    while True:
        healthy, checks = await status.health(agent)
        if healthy:
            agent.notifier.watchdog()
        else:
            log.warning("health check failed: no watchdog ping", extra={"checks": checks})
        await asyncio.sleep(interval)


async def tpu_loop(agent: Agent) -> None:
    tpu = agent.tpu
    assert tpu is not None
    while True:
        try:
            await tpu.poll()
        except DgdmError as exc:
            log.warning("TPU poll failed", extra={"error": str(exc)})
        tpu.limit_c = agent.config.tpu.temperature_limit_c
        tpu.hysteresis_c = agent.config.tpu.hysteresis_c
        await asyncio.sleep(agent.config.tpu.poll_s)


# -- telemetry ----------------------------------------------------------------------------


async def telemetry_loop(agent: Agent) -> None:
    sampler = await asyncio.to_thread(Sampler, agent.config.device.data_dir)
    batcher = agent.telemetry
    assert batcher is not None
    rounds = 0
    while True:
        await asyncio.sleep(agent.config.telemetry.interval_s)
        rounds += 1
        try:
            sample = await _sample(agent, sampler)
        except Exception as exc:  # noqa: BLE001 - one bad round must not end telemetry and the disk checks
            log.warning("telemetry sample failed", extra={"error": repr(exc)})
            continue
        check_disk(agent, sample["disk_free_bytes"])
        await agent.flush_alerts()  # any the outbox refused before
        batcher.batch_s = _batch_s(agent, rounds)
        body = batcher.add(sample)
        if body is not None:
            await queue_telemetry(agent, body)


def _batch_s(agent: Agent, rounds: int) -> float:
    """`telemetry.batch_s`; but for the first EARLY_SAMPLES samples, while the link is up
    without a clock estimate, each sample goes alone, so that their receipts give it one
    within seconds of start-up instead of two batches (SPEC §6.1; plaintext telemetry is
    never receipted, so it stays batched)."""
    cfg = agent.config.telemetry
    link = agent.link
    early = rounds <= EARLY_SAMPLES and agent.config.sync.encrypt_telemetry
    if early and link is not None and link.connected and link.clock.best is None:
        return cfg.interval_s
    return cfg.batch_s


async def _sample(agent: Agent, sampler: Sampler) -> dict[str, Any]:
    stats = await agent.outbox_stats()
    outbox = (
        {"messages": stats.messages, "bytes": stats.bytes, "dropped": stats.dropped}
        if stats
        else {}
    )
    reading = agent.tpu.reading if agent.tpu else None
    inputs = SampleInputs(
        tpu_present=bool(reading and reading.present),
        tpu_temp_c=reading.temp_c if reading else None,
        outbox=outbox,
        diffusions=agent.latency.count,
        latencies_ms=agent.latency.take(),
    )
    mono = time.monotonic()
    sample = await asyncio.to_thread(sampler.sample, inputs)
    sample[MONO_KEY] = mono
    return sample


def stamp_coordinator_time(agent: Agent, body: dict[str, Any]) -> None:
    """Each sample's `coord_ts_ms`: its time on the coordinator's clock as estimated when it
    is queued (from its monotonic time, so a wall-clock step moves no point of a chart and
    samples taken before the first receipt are placed too); null without an estimate.
    `ts_ms` stays the device's own clock."""
    link = agent.link
    for sample in body.get("samples", ()):
        mono = sample.pop(MONO_KEY, None)
        estimate = link.coordinator_ms(mono) if link is not None and mono is not None else None
        sample["coord_ts_ms"] = estimate


async def queue_telemetry(agent: Agent, body: dict[str, Any]) -> None:
    if agent.outbox is None:
        return
    from dgdm.sync.envelope import Kind

    stamp_coordinator_time(agent, body)
    try:
        await agent.enqueue(Kind.TELEMETRY, body)
    except DgdmError as exc:
        log.warning("telemetry not queued", extra={"error": str(exc)})
        return
    agent.metrics.telemetry_batches.inc()


async def flush_telemetry(agent: Agent) -> None:
    body = agent.telemetry.flush() if agent.telemetry else None
    if body is not None:
        await queue_telemetry(agent, body)


def check_disk(agent: Agent, free: int) -> None:
    limit = agent.config.alerts.disk_min_free_bytes
    details = {
        "free_bytes": free,
        "min_free_bytes": limit,
        "path": str(agent.config.device.data_dir),
    }
    if free < limit:
        agent.alerts.condition(Alert("disk_low", WARNING, f"Disk low: {free} bytes free.", details))
    else:
        agent.alerts.resolved("disk_low", Alert("disk_ok", INFO, "Disk space is back.", details))


# -- broker -------------------------------------------------------------------------------


async def broker_loop(agent: Agent) -> None:
    while True:
        await asyncio.sleep(BROKER_PERIOD_S)
        check_broker(agent, time.monotonic())


def check_broker(agent: Agent, now: float) -> None:
    if agent.link is None:
        return
    if agent.link.connected:
        agent.offline_since = None
        agent.alerts.resolved(
            "broker_unreachable", Alert("broker_reachable", INFO, "Broker reachable again.")
        )
        return
    if agent.offline_since is None:
        agent.offline_since = now
    offline_s = now - agent.offline_since
    if offline_s > agent.config.sync.offline_alert_s:
        message = f"Broker unreachable for {int(offline_s)} s."
        details = {"offline_s": round(offline_s, 1)}
        agent.alerts.condition(Alert("broker_unreachable", WARNING, message, details))


# -- clock --------------------------------------------------------------------------------


async def clock_loop(agent: Agent) -> None:
    skewed = False
    while True:
        await asyncio.sleep(CLOCK_PERIOD_S)
        skewed = check_clock(agent, skewed)


def check_clock(agent: Agent, skewed: bool) -> bool:
    """`clock_skew` while the wall clock is more than `sync.max_clock_skew_ms` off the
    coordinator's as estimated from receipts (SPEC §6.1), `clock_ok` once back within half
    of it; returns whether it holds."""
    from dgdm.sync.clock import skew_alarm

    skew = agent.link.clock_skew_ms() if agent.link is not None else None
    if skew is None:
        return skewed
    limit = agent.config.sync.max_clock_skew_ms
    now_skewed = skew_alarm(skewed, skew, limit)
    best = agent.link.clock.best
    details = {"skew_ms": skew, "max_skew_ms": limit, "rtt_ms": best and round(best.rtt_ms, 1)}
    if now_skewed:
        ahead = "behind" if skew > 0 else "ahead of"
        message = f"Clock {abs(skew)} ms {ahead} the coordinator's."
        agent.alerts.condition(Alert("clock_skew", WARNING, message, details))
    else:
        message = "Clock agrees with the coordinator's again."
        agent.alerts.resolved("clock_skew", Alert("clock_ok", INFO, message, details))
    return now_skewed


# -- backends -----------------------------------------------------------------------------


async def backends_loop(agent: Agent) -> None:
    while True:
        await asyncio.sleep(BACKENDS_PERIOD_S)
        check_backends(agent)


def check_backends(agent: Agent) -> None:
    """`backend_failed` while any backend's last run failed (the engine fell back); its
    recovery once each of them has answered again. Repeats are deduplicated by the policy."""
    failing = failing_backends(agent.engine.backends_status())
    if not failing:
        agent.alerts.resolved(
            "backend_failed",
            Alert("backend_recovered", INFO, "Every failed backend answers again."),
        )
        return
    names = sorted(failing)
    message = f"Backend {', '.join(names)} failed at run time: diffusions fall back."
    details = {"backends": names, "reasons": failing}
    agent.alerts.condition(Alert("backend_failed", WARNING, message, details))


def failing_backends(statuses: list[dict[str, Any]]) -> dict[str, str]:
    """Backend name -> its last error, for each whose last run failed."""
    return {b["name"]: b.get("last_error", "") for b in statuses if b.get("failing")}


def eviction_alert(kind: Any, count: int) -> Alert:
    """The outbox dropped `count` messages of `kind` to stay within its size: older ones
    evicted, or a new one refused when only more urgent messages were left to evict."""
    name = getattr(kind, "name", str(kind)).lower()
    return Alert(
        "outbox_evicting",
        WARNING,
        f"Outbox full: dropped {count} {name} message(s) to stay within max_outbox_bytes.",
        {"kind": name, "count": count},
    )
