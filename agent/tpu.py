"""Edge TPU health: polls `dgdm.kernels.edgetpu.discover()`, raises alerts, protects the TPU.

Thermal protection: above `tpu.temperature_limit_c` the engine is told to exclude the
`edgetpu` backend (work moves to the CPU); it returns once the TPU has cooled
`hysteresis_c` below the limit, so the choice does not flap around the threshold.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dgdm.agent.alerts import CRITICAL, INFO, WARNING, Alert, Alerts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TpuReading:
    present: bool
    devices: tuple[str, ...] = ()
    reason: str = ""
    temp_c: float | None = None
    runtime: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "present": self.present,
            "devices": list(self.devices),
            "reason": self.reason,
            "temp_c": self.temp_c,
            "runtime": self.runtime,
        }


def read_tpu() -> TpuReading:
    """One blocking look at the TPU through the kernels package."""
    try:
        from dgdm.kernels.edgetpu import discover
    except ImportError as exc:
        return TpuReading(False, reason=f"the Edge TPU probe is not available ({exc})")
    state = discover()
    return TpuReading(
        present=bool(state.present),
        devices=tuple(state.devices),
        reason=state.reason,
        temp_c=state.temp_c,
        runtime=state.runtime,
    )


def too_hot(temp_c: float | None, limit_c: float, hysteresis_c: float, protecting: bool) -> bool:
    """Whether thermal protection should be on after this reading."""
    if temp_c is None:
        return protecting
    if protecting:
        return temp_c > limit_c - hysteresis_c
    return temp_c > limit_c


class TpuMonitor:
    def __init__(
        self,
        alerts: Alerts,
        set_excluded: Callable[[set[str]], None],
        limit_c: float,
        hysteresis_c: float,
        read: Callable[[], TpuReading] = read_tpu,
    ) -> None:
        self.alerts = alerts
        self.limit_c = limit_c
        self.hysteresis_c = hysteresis_c
        self._set_excluded = set_excluded
        self._read = read
        self.reading = TpuReading(False, reason="not checked yet")
        self.protecting = False
        self._seen_present = False

    async def poll(self) -> TpuReading:
        reading = await asyncio.to_thread(self._read)
        await self.apply(reading)
        return reading

    async def apply(self, reading: TpuReading) -> None:
        self._presence_alerts(reading)
        protect = too_hot(reading.temp_c, self.limit_c, self.hysteresis_c, self.protecting)
        if protect != self.protecting:
            await asyncio.to_thread(self._set_excluded, {"edgetpu"} if protect else set())
            self.protecting = protect
            log.warning(
                "thermal protection %s",
                "on" if protect else "off",
                extra={"temp_c": reading.temp_c, "limit_c": self.limit_c},
            )
        self._thermal_alerts(reading)
        self.reading = reading

    def _presence_alerts(self, reading: TpuReading) -> None:
        if reading.present:
            self._seen_present = True
            self.alerts.resolved(
                "tpu_lost",
                Alert(
                    "tpu_recovered", INFO, "Edge TPU is back.", {"devices": list(reading.devices)}
                ),
            )
        elif self._seen_present:
            self.alerts.condition(
                Alert(
                    "tpu_lost",
                    CRITICAL,
                    f"Edge TPU lost: {reading.reason}",
                    {"reason": reading.reason},
                )
            )

    def _thermal_alerts(self, reading: TpuReading) -> None:
        details = {"temp_c": reading.temp_c, "limit_c": self.limit_c}
        if self.protecting:
            self.alerts.condition(
                Alert(
                    "tpu_overheat",
                    WARNING,
                    f"Edge TPU at {reading.temp_c} °C, over {self.limit_c} °C: work moved to CPU.",
                    details,
                )
            )
        else:
            self.alerts.resolved(
                "tpu_overheat",
                Alert(
                    "tpu_cooled",
                    INFO,
                    "Edge TPU has cooled down: diffusion may use it again.",
                    details,
                ),
            )
