"""The engine's cost model: rough time (multiply-adds) and memory (bytes) of a backend's
build and call for one problem, to order backends, pick the agent's lane and keep a
diffusion within `kernels.max_diffusion_bytes`. Pure functions of the problem's shape."""

from __future__ import annotations

import importlib.util
import math

import scipy.sparse as sp

from dgdm.kernels.backends.base import Problem
from dgdm.kernels.diffusion import PPR_RTOL, series_coefficients
from dgdm.kernels.method import Method

_TFLITE_PER_CALL = 1e5
# A sparse gather costs ~4x a dense multiply-add with scipy's kernel, ~2.2x with the
# compiled one (dgdm.kernels._spmm, optional): looked up without importing it.
_SPARSE_GATHER = 2.2 if importlib.util.find_spec("dgdm.kernels._spmm") else 4.0


def call_cost(name: str, problem: Problem) -> float:
    """Rough per-call cost per feature column in multiply-adds, to order CPU backends by
    speed; accelerators/unknown first."""
    n, nnz = problem.n, problem.t.nnz
    if name == "numpy":
        return float(n) * n
    if name == "tflite":
        # int8 GEMM ~5x numpy float32 here, plus a fixed ~0.2 ms per call (quantise, invoke,
        # dequantise), spread over a typical 16 columns: below N ~ 350 dense numpy wins.
        return float(n) * n / 5.0 + _TFLITE_PER_CALL
    if name == "sparse":
        return _SPARSE_GATHER * nnz * _products(problem)
    return 0.0


# Build costs in the same units (~2e10 multiply-adds/s for float32 BLAS here), fitted to
# loads measured at N = 50 .. 3,000: fixed Python overhead ~0.2 ms dense and ~0.5 ms sparse
# (+ its reordering), and an int8 model written, loaded and calibrated ~20 ms.
_DENSE_FIXED = 4e6
_SPARSE_FIXED = 1e7
_INT8_MODEL_FIXED = 4e8


def build_cost(name: str, problem: Problem) -> float:
    """Rough cost of `Backend.load` for a topology seen for the first time."""
    n, nnz = float(problem.n), float(problem.t.nnz)
    exact = series_coefficients(problem.method) is None
    if name == "numpy":
        if exact:  # a dense solve or expm
            return _DENSE_FIXED + (10.0 if problem.method.kind == "heat" else 3.0) * n**3
        return _DENSE_FIXED + 16.0 * nnz * n * _products(problem)  # sparse T @ dense P
    if name == "tflite":
        return _INT8_MODEL_FIXED + build_cost("numpy", problem) + 10.0 * n * n
    if name == "sparse":
        # the series reorders T (RCM); the exact forms build nothing beyond T
        return _SPARSE_FIXED + (0.0 if exact else 1e4 * nnz)
    return 0.0


# What the costs above come to per second on one core of an x86-64 box (float32 BLAS does
# ~2e10; the sparse gathers are already weighted): used only to pick the agent's lane.
MULTIPLY_ADDS_PER_S = 1e10
_F64, _F32, _INDEX = 8, 4, 4


def csr_bytes(m: sp.csr_matrix) -> int:
    return int(m.data.nbytes + m.indices.nbytes + m.indptr.nbytes)


def _exact(method: Method) -> bool:
    """`series_coefficients(method) is None`, without computing them (once per call)."""
    return method.kind != "poly" and method.k is None


def runner_bytes(name: str, problem: Problem) -> int:
    """What a cached runner keeps: a dense float32 P (numpy), an int8 model and its
    interpreter's copy (tflite, edgetpu), a float32 reordered T with its permutations and
    three N x 16 buffers (sparse series); the exact sparse forms keep only T, which the
    problem already holds."""
    n, nnz = problem.n, problem.t.nnz
    if name == "numpy":
        return _F32 * n * n
    if name in ("tflite", "edgetpu"):
        return 2 * n * n
    if name == "sparse" and not _exact(problem.method):
        return (_F32 + _INDEX) * nnz + 4 * 8 * n + 3 * _F32 * n * 16
    return 0


def work_bytes(name: str, problem: Problem, features: int, *, built: bool) -> int:
    """Peak working memory of one call on `name`: the runner's build unless `built`, and
    the call's own arrays (inputs, outputs, iteration vectors)."""
    n, nnz = problem.n, problem.t.nnz
    call = n * features
    exact = _exact(problem.method)
    if name == "sparse":
        if exact:
            # ppr: CG's six N x F float64 arrays, T's transpose for the symmetry test;
            # heat: expm_multiply's shifted copy of T and its handful of N x F arrays
            return 2 * (_F64 + _INDEX) * nnz + 8 * _F64 * call
        build = 0 if built else runner_bytes(name, problem) + (_F64 + _INDEX) * nnz
        return build + 6 * _F32 * call
    # dense: T, the system or the running P, the result and its float32 copy (expm: more)
    dense = (6 if exact and problem.method.kind == "heat" else 3) * _F64 * n * n
    build = 0 if built else dense + runner_bytes(name, problem)
    return build + 3 * _F64 * call


MAX_PRODUCTS = 10**12


def _products(problem: Problem) -> int:
    """Products with T per call: the series' k; for the exact forms what their solvers
    take, so that a slow one is costed as slow: conjugate gradients ~sqrt(cond) ln(2/tol) / 2
    (sym), the fixed-point iteration ln(tol) / ln(1 - alpha) (col, row), expm_multiply
    ~11 t (its degree-55 steps of norm ~10, on a generator of norm up to 2 t)."""
    method = problem.method
    coeffs = series_coefficients(method)
    if coeffs is not None:
        return max(len(coeffs) - 1, 1)
    if method.kind == "heat":
        return max(int(11 * method.t), 40)
    if method.alpha >= 1.0:
        return 1
    if method.normalization == "sym":
        condition = (2.0 - method.alpha) / method.alpha
        return _count(math.sqrt(condition) * math.log(2.0 / PPR_RTOL) / 2)
    return _count(math.log(PPR_RTOL) / math.log1p(-method.alpha))


def _count(products: float) -> int:
    """A product count as an int; a tiny alpha (down to denormals) makes it astronomical or
    inf, which is costed as MAX_PRODUCTS (the deadline stops such a solve)."""
    return int(min(products, MAX_PRODUCTS)) + 1
