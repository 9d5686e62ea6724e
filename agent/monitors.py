"""The agent's periodic checks: loop lag, the systemd watchdog, the TPU, telemetry (with the
disk check), the broker's reachability, the clock and the backends. Each loop runs until
cancelled at shutdown, reads its period from the live config (so SIGHUP changes take effect
on the next round) and hands its readings to a watcher (agent/watchers.py), which decides
the alert."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from dgdm.agent.telemetry import SampleInputs, Sampler
from dgdm.agent.watchers import BrokerWatch, ClockWatch, Watchers, backend_alert
from dgdm.common.errors import DgdmError

if TYPE_CHECKING:
    from dgdm.agent.alerts import Alerts
    from dgdm.agent.config import AgentConfig
    from dgdm.agent.runtime import Agent
    from dgdm.agent.sdnotify import Notifier
    from dgdm.agent.tpu import TpuMonitor
    from dgdm.kernels.engine import Engine
    from dgdm.sync.link import DeviceLink

log = logging.getLogger("dgdm.agent")
LAG_PERIOD_S = 0.25
BROKER_PERIOD_S = 1.0
BACKENDS_PERIOD_S = 1.0
CLOCK_PERIOD_S = 1.0
MONO_KEY = "_mono"  # a sample's monotonic time, until it is queued
EARLY_SAMPLES = 6


class Monitors:
    """What the periodic checks keep between rounds: the loop's lag and the watchers."""

    def __init__(self, config: AgentConfig, now: float) -> None:
        self.loop_lag_s = 0.0
        self.watchers = Watchers(config, now)


def loops(agent: Agent) -> list[Coroutine[Any, Any, None]]:
    tpu = agent.tpu
    assert tpu is not None
    watchers = agent.monitors.watchers
    jobs = [
        tpu_loop(tpu, lambda: agent.config),
        telemetry_loop(agent),
        lag_loop(agent.monitors),
        backends_loop(agent.engine, agent.alerts),
    ]
    if agent.link is not None:
        jobs.append(broker_loop(agent.link, agent.alerts, watchers.broker))
        jobs.append(clock_loop(agent.link, agent.alerts, watchers.clock))
    if agent.notifier.watchdog_interval_s:
        jobs.append(watchdog_loop(agent.notifier, agent.health))
    return jobs


async def lag_loop(monitors: Monitors) -> None:
    """Measures how late the loop wakes up: a blocked loop shows up here and in health."""
    while True:
        before = time.monotonic()
        await asyncio.sleep(LAG_PERIOD_S)
        monitors.loop_lag_s = max(0.0, time.monotonic() - before - LAG_PERIOD_S)


async def watchdog_loop(
    notifier: Notifier, health: Callable[[], Awaitable[tuple[bool, dict[str, Any]]]]
) -> None:
    interval = notifier.watchdog_interval_s or 1.0
    while True:
        healthy, checks = await health()
        if healthy:
            notifier.watchdog()
        else:
            log.warning("health check failed: no watchdog ping", extra={"checks": checks})
        await asyncio.sleep(interval)


async def tpu_loop(tpu: TpuMonitor, settings: Callable[[], AgentConfig]) -> None:
    while True:
        try:
            await tpu.poll()
        except DgdmError as exc:
            log.warning("TPU poll failed", extra={"error": str(exc)})
        config = settings().tpu
        tpu.limit_c = config.temperature_limit_c
        tpu.hysteresis_c = config.hysteresis_c
        await asyncio.sleep(config.poll_s)


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
        agent.alerts.report(agent.monitors.watchers.disk.observe(sample["disk_free_bytes"]))
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


# -- broker, clock, backends --------------------------------------------------------------


async def broker_loop(link: DeviceLink, alerts: Alerts, watch: BrokerWatch) -> None:
    while True:
        await asyncio.sleep(BROKER_PERIOD_S)
        alerts.report(watch.observe(link.connected, time.monotonic()))


async def clock_loop(link: DeviceLink, alerts: Alerts, watch: ClockWatch) -> None:
    while True:
        await asyncio.sleep(CLOCK_PERIOD_S)
        best = link.clock.best
        alerts.report(watch.observe(link.clock_skew_ms(), None if best is None else best.rtt_ms))


async def backends_loop(engine: Engine, alerts: Alerts) -> None:
    while True:
        await asyncio.sleep(BACKENDS_PERIOD_S)
        alerts.report(backend_alert(engine.backends_status()))
