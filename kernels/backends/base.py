"""The one small protocol every compute backend implements.

A `Backend` is a factory that knows whether it can run here (`probe`) and turns a
`Problem` (a normalised operator plus a method) into a `Runner` bound to that operator.
A `Runner` diffuses features many times cheaply: `run(x) -> RunOutput`, then `close()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import scipy.sparse as sp

from dgdm.kernels.method import Method


@dataclass(frozen=True)
class Problem:
    """A validated topology's normalised operator T (CSR, float64, N x N) and the method.

    `key` is a stable hash of topology + method: backends use it to cache built artefacts
    (dense propagators, int8 models) in memory and on disk.
    """

    key: str
    t: sp.csr_matrix
    method: Method

    @property
    def n(self) -> int:
        return int(self.t.shape[0])


@dataclass(frozen=True)
class RunOutput:
    """Z (N x F) and the bound on its relative Frobenius error against float64
    (0.0 for float64 backends, a float32 rounding bound for float32, measured/bounded for int8)."""

    z: np.ndarray
    error_bound: float


class Runner(Protocol):
    backend: str

    def run(self, x: np.ndarray) -> RunOutput: ...

    def close(self) -> None: ...


class Backend(Protocol):
    name: str

    def probe(self) -> None:
        """Return if usable here; raise `BackendUnavailable` with a one-sentence reason if not."""
        ...

    def load(self, problem: Problem) -> Runner:
        """Build (or fetch from cache) what this backend needs to run `problem`."""
        ...
