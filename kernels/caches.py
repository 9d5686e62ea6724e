"""The engine's runner cache entries and how an evicted runner is closed."""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from dgdm.kernels.backends.base import Runner, RunOutput

log = logging.getLogger(__name__)


@dataclass
class LoadedRunner:
    runner: Runner
    nbytes: int = 0  # estimated, for the cache's byte bound
    lock: threading.Lock = field(default_factory=threading.Lock)
    # The fastest run seen, per feature column: a runner's cost for its fixed N is steady,
    # only a preempted run is slower, and one such run must not make it look expensive.
    ms_per_feature: float = math.inf

    def run(self, x: np.ndarray) -> RunOutput:
        """Run (the caller holds `lock`) and remember how long it took."""
        start = time.perf_counter()
        out = self.runner.run(x)
        ms = (time.perf_counter() - start) * 1000.0 / max(x.shape[1], 1)
        self.ms_per_feature = min(self.ms_per_feature, ms)
        return out


def close_all(entries: list[LoadedRunner], wait_s: float = 0.0) -> None:
    """Close runners once no call is using them, waiting up to `wait_s` for each. One still
    in use is left to the garbage collector once its call ends: an eviction must not hold a
    small diffusion up behind a heavy one (`wait_s` 0), nor a stopping agent wait on a
    diffusion that cannot be interrupted (its memory goes at exit)."""
    for entry in entries:
        if entry.lock.acquire(timeout=wait_s):
            try:
                close_quietly(entry.runner)
            finally:
                entry.lock.release()


def close_quietly(runner: Runner) -> None:
    try:
        runner.close()
    except Exception as exc:  # noqa: BLE001 - closing a broken runner must not fail a call
        log.debug("closing runner failed: %s", exc)
