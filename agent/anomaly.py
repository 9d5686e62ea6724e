"""Latency anomalies: each topology's diffusion latency against its own recent baseline.

Pure (seconds and times in, decisions out), like `sync/link_state.py`. Per key (a
registered topology and feature width) the detector keeps an exponentially weighted mean
and variance of the latency. A sample is anomalous when it is slower than the mean by more
than `K_DEV` deviations *and* by more than `REL_FLOOR` of the mean and `ABS_FLOOR_S`: the
floors keep a 0.1 ms jitter on a 0.2 ms kernel (or a scheduler hiccup) from firing. Only
slower counts: a faster box is not a fault.

Hysteresis: `RAISE_AFTER` anomalous samples in a row raise; `CLEAR_AFTER` normal ones in a
row clear. Anomalous samples never enter the baseline (else it follows the fault and the
alert clears itself while the box stays slow); normal ones always do, also while raised.
Nothing is judged before `MIN_SAMPLES` samples: until then every sample is baseline, with
the weight of a plain mean (1/n) while that is larger than `ALPHA`, so the first samples do
not dominate. State is bounded: the `MAX_KEYS` most recently used keys are kept.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from enum import Enum

ALPHA = 0.05  # EWMA weight of a new sample: the baseline spans ~20-40 diffusions
MIN_SAMPLES = 30  # samples before anything is judged
K_DEV = 4.0  # an anomaly is slower than mean + K_DEV * deviation ...
REL_FLOOR = 1.0  # ... and than mean * (1 + REL_FLOOR): at least twice the usual latency ...
ABS_FLOOR_S = 0.0002  # ... and than mean + 0.2 ms (scheduler noise)
RAISE_AFTER = 5  # consecutive anomalous samples that raise
CLEAR_AFTER = 10  # consecutive normal samples that clear
MAX_KEYS = 256  # keys kept (least recently used dropped); kernels.max_topologies is 64


class Decision(Enum):
    RAISE = "raise"
    CLEAR = "clear"


@dataclass(frozen=True)
class Params:
    alpha: float = ALPHA
    min_samples: int = MIN_SAMPLES
    k_dev: float = K_DEV
    rel_floor: float = REL_FLOOR
    abs_floor_s: float = ABS_FLOOR_S
    raise_after: int = RAISE_AFTER
    clear_after: int = CLEAR_AFTER
    max_keys: int = MAX_KEYS


@dataclass
class Baseline:
    """One key's state; read-only for callers (the detector updates it)."""

    mean_s: float = 0.0
    var_s2: float = 0.0
    samples: int = 0  # samples taken into the baseline
    anomalous_run: int = 0  # consecutive anomalous samples
    normal_run: int = 0  # consecutive normal samples
    raised: bool = False
    raised_at: float | None = None
    last_s: float = 0.0  # the latest sample, anomalous or not

    @property
    def dev_s(self) -> float:
        return math.sqrt(max(self.var_s2, 0.0))


class LatencyDetector:
    def __init__(self, params: Params | None = None) -> None:
        self.params = params or Params()
        self._keys: OrderedDict[Hashable, Baseline] = OrderedDict()

    def observe(self, key: Hashable, seconds: float, now: float) -> Decision | None:
        """Take one latency sample of `key`; RAISE or CLEAR when its state changes."""
        state = self._state(key)
        state.last_s = seconds
        if not math.isfinite(seconds) or seconds < 0:
            return None
        if state.samples < self.params.min_samples or not self.is_anomalous(state, seconds):
            return self._normal(state, seconds)
        return self._anomalous(state, now)

    def baseline(self, key: Hashable) -> Baseline | None:
        return self._keys.get(key)

    def raised(self, key: Hashable) -> bool:
        state = self._keys.get(key)
        return state is not None and state.raised

    def is_anomalous(self, state: Baseline, seconds: float) -> bool:
        p = self.params
        excess = seconds - state.mean_s
        return excess > max(p.k_dev * state.dev_s, p.rel_floor * state.mean_s, p.abs_floor_s)

    def __len__(self) -> int:
        return len(self._keys)

    def _state(self, key: Hashable) -> Baseline:
        state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = Baseline()
            if len(self._keys) > self.params.max_keys:
                self._keys.popitem(last=False)
        else:
            self._keys.move_to_end(key)
        return state

    def _normal(self, state: Baseline, seconds: float) -> Decision | None:
        self._learn(state, seconds)
        state.anomalous_run = 0
        state.normal_run += 1
        if state.raised and state.normal_run >= self.params.clear_after:
            state.raised, state.raised_at = False, None
            return Decision.CLEAR
        return None

    def _anomalous(self, state: Baseline, now: float) -> Decision | None:
        state.normal_run = 0
        state.anomalous_run += 1
        if not state.raised and state.anomalous_run >= self.params.raise_after:
            state.raised, state.raised_at = True, now
            return Decision.RAISE
        return None

    def _learn(self, state: Baseline, seconds: float) -> None:
        """West's incremental EWMA of mean and variance; weight 1/n while that is larger."""
        state.samples += 1
        weight = max(self.params.alpha, 1.0 / state.samples)
        diff = seconds - state.mean_s
        step = weight * diff
        state.mean_s += step
        state.var_s2 = (1.0 - weight) * (state.var_s2 + diff * step)
