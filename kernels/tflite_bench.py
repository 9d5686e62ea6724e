"""Timing of the int8 TFLite path against numpy, for `dgdm bench kernels`.

For each (N, F): the median of a raw `invoke()` (the runtime's floor), of the runner's
`run(x)` (quantise + invoke + dequantise + error bound, what the public API pays), and of
numpy float32 `P @ X` in the same process. Random geometric graphs, average degree ~8,
ppr k = 10, sym normalisation, uniform features; one interpreter thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import scipy.sparse as sp

from dgdm.kernels.backends.base import Problem
from dgdm.kernels.backends.tflite_backend import Int8Runner, TFLiteBackend
from dgdm.kernels.diffusion import dense_propagator
from dgdm.kernels.method import Method
from dgdm.kernels.operator import normalized_operator, problem_key


def bench_tflite(sizes, features, repeats: int = 200, seed: int = 0) -> list[dict]:
    """One row per (N, F): median µs of raw invoke, runner.run and numpy f32 P @ X."""
    rows = []
    for n in sizes:
        problem = rgg_problem(n, seed)
        p32 = dense_propagator(problem.t, problem.method).astype(np.float32)
        runner = TFLiteBackend().load(problem)
        for f in features:
            x = np.random.default_rng(seed).uniform(-1, 1, (n, f)).astype(np.float32)
            rows.append({"n": n, "f": f, **_measure(runner, p32, x, repeats)})
        runner.close()
    return rows


def _measure(runner: Int8Runner, p32: np.ndarray, x: np.ndarray, repeats: int) -> dict:
    bound = runner.run(x).error_bound
    return {
        "invoke_us": median_us(runner.raw_invoke(x.shape[1]), repeats),
        "run_us": median_us(lambda: runner.run(x), repeats),
        "numpy_f32_us": median_us(lambda: p32 @ x, repeats),
        "error_bound": bound,
    }


def median_us(fn: Callable[[], object], repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return float(np.median(samples)) * 1e6


def rgg_problem(n: int, seed: int = 0, method: Method | None = None) -> Problem:
    """A random geometric graph, average degree ~8 (the benchmark family); ppr k=10 default."""
    rng = np.random.default_rng(seed)
    points = rng.random((n, 2))
    radius = np.sqrt(8.0 / (np.pi * n))
    diff = points[:, None, :] - points[None, :, :]
    close = np.einsum("ijk,ijk->ij", diff, diff) < radius * radius
    np.fill_diagonal(close, False)
    method = method or Method(kind="ppr", alpha=0.15, k=10)
    adjacency = sp.csr_matrix(close, dtype=np.float64)
    return Problem(problem_key(adjacency, method), normalized_operator(adjacency, method), method)
