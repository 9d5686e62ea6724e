"""Telemetry: a system sample every `interval_s`, batched into one message per `batch_s`.

The sample body is SPEC §6's telemetry sample. Sampling (psutil, a statvfs, the outbox's
counters) is blocking, so `Sampler.sample` runs in a thread; `TelemetryBatcher` is the pure
part that decides when a batch is due.
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) by nearest rank; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


class LatencyWindow:
    """Diffusion latencies: those since the last telemetry sample, and a recent history for
    the status page. Appends come from the event loop only, so no lock is needed."""

    def __init__(self, history: int = 2048) -> None:
        self._since_sample: list[float] = []
        self.recent: deque[tuple[float, float]] = deque(maxlen=history)
        self.count = 0

    def record(self, latency_ms: float) -> None:
        self._since_sample.append(latency_ms)
        self.recent.append((time.monotonic(), latency_ms))  # a window: no wall-clock steps
        self.count += 1

    def take(self) -> list[float]:
        """Latencies since the previous call (the next telemetry sample's window)."""
        taken, self._since_sample = self._since_sample, []
        return taken

    def recent_percentiles(self, window_s: float = 60.0) -> dict[str, float | None]:
        cutoff = time.monotonic() - window_s
        values = [ms for ts, ms in self.recent if ts >= cutoff]
        return {"p50": percentile(values, 50), "p99": percentile(values, 99), "n": len(values)}


@dataclass(frozen=True)
class SampleInputs:
    """What the runtime knows that psutil does not."""

    tpu_present: bool
    tpu_temp_c: float | None
    outbox: dict[str, int]  # messages, bytes, dropped
    diffusions: int
    latencies_ms: list[float]


class Sampler:
    def __init__(self, disk_path: Path) -> None:
        self.disk_path = disk_path
        psutil.cpu_percent(interval=None)  # the first reading is meaningless; prime it

    def sample(self, inputs: SampleInputs) -> dict[str, Any]:
        memory = psutil.virtual_memory()
        return {
            "ts_ms": int(time.time() * 1000),
            "cpu_percent": psutil.cpu_percent(interval=None),
            "mem_used_bytes": int(memory.total - memory.available),
            "mem_total_bytes": int(memory.total),
            "load1": round(os.getloadavg()[0], 3),
            "disk_free_bytes": disk_free(self.disk_path),
            "tpu": {"present": inputs.tpu_present, "temp_c": inputs.tpu_temp_c},
            "outbox": {
                "messages": inputs.outbox.get("messages", 0),
                "bytes": inputs.outbox.get("bytes", 0),
                "dropped": inputs.outbox.get("dropped", 0),
            },
            "diffusions": inputs.diffusions,
            "latency_p50_ms": _round(percentile(inputs.latencies_ms, 50)),
            "latency_p99_ms": _round(percentile(inputs.latencies_ms, 99)),
        }


def disk_free(path: Path) -> int:
    try:
        return int(psutil.disk_usage(str(path)).free)
    except OSError:
        return 0


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


class TelemetryBatcher:
    """Collects samples and says when `batch_s` has passed since the batch began."""

    def __init__(self, batch_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.batch_s = batch_s
        self._clock = clock
        self._samples: list[dict[str, Any]] = []
        self._started = clock()

    def add(self, sample: dict[str, Any]) -> dict[str, Any] | None:
        """Add a sample; return the telemetry body when the batch is due, else None."""
        self._samples.append(sample)
        if self._clock() - self._started + 1e-6 < self.batch_s:
            return None
        return self.flush()

    def flush(self) -> dict[str, Any] | None:
        if not self._samples:
            return None
        body = {"samples": self._samples}
        self._samples = []
        self._started = self._clock()
        return body
