"""Dense backend: P = f(T) precomputed once, then Z = P @ X (one BLAS call per diffusion).

Best for small graphs (per-call cost ~N^2 F, no Python loop) and the float64 reference.
"""

from __future__ import annotations

import numpy as np

from dgdm.kernels.backends.base import Problem, RunOutput
from dgdm.kernels.diffusion import dense_propagator, float32_error_bound
from dgdm.kernels.errors import BackendUnavailable

DEFAULT_MAX_NODES = 4096


class NumpyBackend:
    """Always available; refuses (BackendUnavailable) graphs too large for a dense P."""

    name = "numpy"

    def __init__(self, dtype: type = np.float32, max_nodes: int = DEFAULT_MAX_NODES) -> None:
        self.dtype = np.dtype(dtype)
        self.max_nodes = max_nodes

    def probe(self) -> None:
        return None

    def load(self, problem: Problem) -> NumpyRunner:
        if problem.n > self.max_nodes:
            raise BackendUnavailable(
                f"numpy keeps a dense N x N operator and {problem.n} nodes exceed its "
                f"limit of {self.max_nodes}."
            )
        p = dense_propagator(problem.t, problem.method)
        return NumpyRunner(np.ascontiguousarray(p, dtype=self.dtype))


class NumpyRunner:
    backend = "numpy"

    def __init__(self, p: np.ndarray) -> None:
        self._p = p
        self._bound = 0.0 if p.dtype == np.float64 else float32_error_bound(p.shape[0])

    def run(self, x: np.ndarray) -> RunOutput:
        x = np.asarray(x, dtype=self._p.dtype)
        return RunOutput(self._p @ x, self._bound)

    def close(self) -> None:
        self._p = np.zeros((0, 0), dtype=self._p.dtype)
