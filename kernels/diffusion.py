"""The diffusion methods of SPEC §2 as numerics on a normalised operator T.

Float64 here is the reference every backend is checked against. Choices:
- truncated series (ppr with k, heat with k, poly) use Horner's rule: k products with T
  and no powers of T are ever formed;
- exact ppr solves (I - (1 - alpha) T) Z = alpha X iteratively, to a relative residual of
  1e-10 in every column (`PprSolver`): memory is T and a few N x F arrays, time
  O(edges x iterations). It used to be a sparse LU factorisation, which is quick on
  near-planar graphs but fills in catastrophically on random ones (average degree 10:
  53 s and 980 MB at 10,000 nodes, no answer in 240 s at 100,000); conjugate gradients
  answer those in ~20 products with T (0.3 s at 100,000 nodes, F = 4);
- every loop of products with T checks the running diffusion's deadline
  (`dgdm.kernels.deadline`), so a request over its deadline stops within one product;
- exact heat is the action of the matrix exponential, scipy's `expm_multiply`
  (Al-Mohy & Higham), never a dense expm of a large matrix.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import scipy.sparse as sp

from dgdm.kernels import deadline
from dgdm.kernels.errors import KernelError
from dgdm.kernels.method import Method

# scipy.linalg and scipy.sparse.linalg (~10 MB and ~0.1-0.2 s to import) are imported where
# the exact forms need them: the truncated series never loads them.

FLOAT32_UNIT = float(np.finfo(np.float32).eps) / 2


def series_coefficients(method: Method) -> np.ndarray | None:
    """c_0..c_k of Z = sum_j c_j T^j X, or None when the method asks for the exact form."""
    if method.kind == "poly":
        return np.asarray(method.coefficients, dtype=np.float64)
    if method.k is None:
        return None
    j = np.arange(method.k + 1, dtype=np.float64)
    if method.kind == "ppr":
        return method.alpha * (1.0 - method.alpha) ** j
    if method.t == 0.0:
        return (j == 0).astype(np.float64)
    log_terms = -method.t + j * math.log(method.t) - np.array([math.lgamma(v + 1) for v in j])
    return np.exp(log_terms)


def horner(apply_t: Callable[[np.ndarray], np.ndarray], coeffs: np.ndarray, x: np.ndarray):
    """sum_j coeffs[j] T^j x with len(coeffs) - 1 applications of T."""
    z = coeffs[-1] * x
    for c in coeffs[-2::-1]:
        deadline.check()
        z = apply_t(z)
        z += c * x
    return z


# Exact ppr is solved until every column's residual is this small relative to alpha X; the
# error is then at most cond(I - (1 - alpha) T) times that (<= (2 - alpha) / alpha for sym).
PPR_RTOL = 1e-10


class PprSolver:
    """Exact ppr: (I - (1 - alpha) T) Z = alpha X solved to PPR_RTOL for every X.

    A symmetric T (sym normalisation of an undirected graph, the default) makes the system
    symmetric positive definite with eigenvalues in [alpha, 2 - alpha]: conjugate gradients,
    ~20 products with T at alpha 0.15 whatever N. Any other T (directed graphs, col and row
    normalisation) has spectral radius <= 1, so the fixed-point iteration
    Z <- alpha X + (1 - alpha) T Z converges, its residual shrinking by ~(1 - alpha) per
    product: ~150 products at alpha 0.15, ~2,300 at alpha 0.01 (where the deadline may
    end it). Columns are iterated side by side, each until its own residual is small.
    """

    def __init__(self, t: sp.csr_matrix, alpha: float) -> None:
        self._t = sp.csr_matrix(t)
        self._alpha = alpha
        self._beta = 1.0 - alpha
        self._symmetric = _is_symmetric(self._t)

    def solve(self, x: np.ndarray) -> np.ndarray:
        b = self._alpha * np.asarray(x, dtype=np.float64)
        if b.shape[1] == 0:
            return np.zeros_like(b)
        goal = PPR_RTOL * _column_norms(b)
        if self._symmetric:
            return _conjugate_gradients(self._apply, b, goal, _iteration_cap(self._alpha, 4))
        return _fixed_point(self._t, self._beta, b, goal, _iteration_cap(self._alpha, 1))

    def _apply(self, v: np.ndarray) -> np.ndarray:
        """(I - (1 - alpha) T) v."""
        out = self._t @ v
        out *= -self._beta
        out += v
        return out


def _is_symmetric(t: sp.csr_matrix) -> bool:
    difference = abs(t - t.T)
    scale = abs(t).max() if t.nnz else 0.0
    return difference.nnz == 0 or difference.max() <= 1e-13 * scale


def _column_norms(v: np.ndarray) -> np.ndarray:
    return np.sqrt(np.einsum("ij,ij->j", v, v))


def _iteration_cap(alpha: float, speedup: float) -> int:
    """Far more products than convergence needs (a guard for callers without a deadline)."""
    if alpha >= 1.0:
        return 10
    needed = math.log(PPR_RTOL) / math.log1p(-alpha)
    return int(10 * needed / speedup) + 100


def _conjugate_gradients(
    apply_a: Callable[[np.ndarray], np.ndarray], b: np.ndarray, goal: np.ndarray, cap: int
) -> np.ndarray:
    """CG for every column at once (each with its own step sizes), from Z = alpha X."""
    z = b.copy()
    for _ in range(3):  # the recurred residual drifts: confirm it with the true one
        r = b - apply_a(z)
        rr = np.einsum("ij,ij->j", r, r)
        p = r.copy()
        for _ in range(cap):
            active = np.sqrt(rr) > goal
            if not active.any():
                break
            deadline.check()
            q = apply_a(p)
            pq = np.einsum("ij,ij->j", p, q)
            step = np.where(active, rr / np.where(active, pq, 1.0), 0.0)
            z += step * p
            r -= step * q
            rr_next = np.einsum("ij,ij->j", r, r)
            p = r + np.where(active, rr_next / np.where(active, rr, 1.0), 0.0) * p
            rr = rr_next
        if (_column_norms(b - apply_a(z)) <= goal).all():
            return z
    raise KernelError("the exact ppr solve did not converge (conjugate gradients)")


def _fixed_point(
    t: sp.csr_matrix, beta: float, b: np.ndarray, goal: np.ndarray, cap: int
) -> np.ndarray:
    """Z <- alpha X + (1 - alpha) T Z from Z = alpha X; the step is the residual."""
    z = b.copy()
    for _ in range(cap):
        deadline.check()
        nxt = t @ z
        nxt *= beta
        nxt += b
        residual = _column_norms(nxt - z)
        z = nxt
        if (residual <= goal).all():
            return z
    raise KernelError("the exact ppr solve did not converge (fixed-point iteration)")


TINY_GENERATOR = 1e-12


def exact_heat(t: sp.csr_matrix, time: float, x: np.ndarray) -> np.ndarray:
    """expm(-t (I - T)) X as scipy computes it (the SPEC §2 oracle)."""
    from scipy.sparse.linalg import expm_multiply

    deadline.check()  # expm_multiply itself cannot be interrupted (scipy's own loop)
    generator = time * (t - sp.identity(t.shape[0], format="csr"))
    x = np.asarray(x, dtype=np.float64)
    scale = abs(generator).max() * t.shape[0] if generator.nnz else 0.0
    if scale < TINY_GENERATOR:
        # exp(G) = I + G to far below float64 precision here, and scipy's step count
        # degenerates to 0 on such a G (a time that underflows): 0/0 in expm_multiply.
        return x + generator @ x
    return expm_multiply(generator.tocsr(), x)


def diffuse(t: sp.csr_matrix, method: Method, x: np.ndarray) -> np.ndarray:
    """Z = f(T) X in float64: the reference every backend is tested against."""
    x = np.asarray(x, dtype=np.float64)
    coeffs = series_coefficients(method)
    if coeffs is not None:
        return horner(t.__matmul__, coeffs, x)
    if method.kind == "ppr":
        return PprSolver(t, method.alpha).solve(x)
    return exact_heat(t, method.t, x)


def dense_propagator(t: sp.csr_matrix, method: Method) -> np.ndarray:
    """P = f(T) as a dense float64 N x N matrix, so that Z = P X (small graphs only)."""
    n = t.shape[0]
    coeffs = series_coefficients(method)
    if coeffs is not None:
        # T is sparse, the running P dense: each Horner step costs nnz(T) * N, not N^3.
        return np.asarray(horner(t.__matmul__, coeffs, np.identity(n)))
    import scipy.linalg

    dense_t = t.toarray()
    if method.kind == "ppr":
        system = np.identity(n) - (1.0 - method.alpha) * dense_t
        return method.alpha * scipy.linalg.solve(system, np.identity(n), check_finite=False)
    return scipy.linalg.expm(method.t * (dense_t - np.identity(n)))


def float32_error_bound(accumulations: int) -> float:
    """Relative error estimate for float32 sums of `accumulations` terms of like sign.

    The probabilistic bound of Higham & Mary (2019), sqrt(n) * u with a safety factor 4,
    plus the final rounding to float32; it holds for non-negative operators (ppr, heat)
    with features that do not cancel, which is what we report with every float32 result.
    """
    return 4.0 * math.sqrt(max(accumulations, 1)) * FLOAT32_UNIT + FLOAT32_UNIT
