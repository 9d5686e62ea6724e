"""Sparse backend: scipy CSR, for graphs far beyond a dense N x N operator.

Truncated series (ppr/heat with k, poly) run in float32 with Horner's rule on a CSR copy
of T reordered by reverse Cuthill-McKee: neighbours then sit close in memory, so the
gathers of X rows stay in cache (2x faster at 100,000 nodes of a random geometric graph).
With the optional compiled extension `dgdm.kernels._spmm` (AVX2+FMA chosen at run time,
portable C otherwise) the whole series is one wavefront pass (`csr_series`): after the
reordering every entry lies within `band` rows of the diagonal, so all K steps run a few
chunks of rows apart and T, X and the steps' outputs are reused from cache instead of
streamed from memory K times; graphs of N >= THREADS_MIN_NODES split their rows over
`kernels.threads` threads (`dgdm.kernels.threads`). Where T = S P S (sym normalisation of an
unweighted graph with self loops) the pass reads the pattern P and S, not T's values. A
graph the reordering leaves without a narrow band runs one compiled product per step
(`csr_spmm`); without the extension (no
compiler at install time) scipy's csr_matvecs does. Products write into preallocated
buffers, so a diffusion allocates only its result.
Exact ppr is the iterative solve of `diffusion.PprSolver` (float64, to a 1e-10 relative
residual); exact heat is scipy's expm_multiply (float64).
"""

from __future__ import annotations

import threading
from typing import Protocol, SupportsFloat

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import reverse_cuthill_mckee

from dgdm.kernels import threads as kernel_threads
from dgdm.kernels.backends.base import Problem, RunOutput
from dgdm.kernels.diffusion import (
    PprSolver,
    exact_heat,
    float32_error_bound,
    series_coefficients,
)
from dgdm.kernels.errors import BackendUnavailable

try:  # scipy's compiled kernel: y += A x for a block of vectors, no temporaries
    from scipy.sparse._sparsetools import csr_matvecs as _csr_matvecs
except ImportError:  # pragma: no cover - a future scipy without it falls back to A @ x
    _csr_matvecs = None


class _Spmm(Protocol):
    """What this backend calls in dgdm.kernels._spmm (typed by kernels/_spmm.pyi)."""

    def csr_spmm(  # noqa: PLR0917 - the C extension's signature
        self,
        indptr: np.ndarray,
        indices: np.ndarray,
        data: np.ndarray,
        z: np.ndarray,
        y: np.ndarray,
        x: np.ndarray | None = None,
        *,
        c: SupportsFloat = 0.0,
        a: SupportsFloat = 1.0,
        portable: bool = False,
    ) -> None: ...

    def csr_series(  # noqa: PLR0917 - the C extension's signature
        self,
        indptr: np.ndarray,
        indices: np.ndarray,
        data: np.ndarray | None,
        coeffs: np.ndarray,
        x: np.ndarray,
        out: np.ndarray,
        *,
        band: int,
        chunk: int = 64,
        threads: int = 1,
        scatter: np.ndarray | None = None,
        isa: str | None = None,
        scale: np.ndarray | None = None,
        gather: np.ndarray | None = None,
        source: np.ndarray | None = None,
    ) -> None: ...

    def take_rows(self, src: np.ndarray, rows: np.ndarray, out: np.ndarray, /) -> None: ...


_spmm: _Spmm | None
try:  # optional: built from kernels/_spmm.c when a C compiler was present at install time
    from dgdm.kernels import _spmm
except ImportError:
    _spmm = None

KERNELS = ("auto", "compiled", "scipy")
# Threads only from this many nodes: below it a thread's start costs more than it saves.
THREADS_MIN_NODES = 10_000
# The wavefront needs a band narrow against N (its rings hold ~3 band rows per step).
MAX_BAND_FRACTION = 0.125
CACHE_LINE = 64  # bytes
SERIES_CHUNK = 64  # rows per wavefront chunk (fastest of 32..256 at 10^4..10^5 nodes)


class SparseBackend:
    """Always available (scipy is a dependency).

    `kernel` picks the series product: "compiled" (the extension; unavailable without it),
    "scipy", or "auto" (compiled when built, else scipy).
    """

    name = "sparse"

    def __init__(self, reorder: bool = True, kernel: str = "auto") -> None:
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
        self.reorder = reorder
        self.compiled = kernel == "compiled" or (kernel == "auto" and _spmm is not None)

    def probe(self) -> None:
        if self.compiled and _spmm is None:
            raise BackendUnavailable(
                "the compiled kernel dgdm.kernels._spmm is not built (no C compiler at "
                "install time); use kernel='scipy' or 'auto'"
            )

    def load(self, problem: Problem) -> SeriesRunner | PprRunner | HeatRunner:
        coeffs = series_coefficients(problem.method)
        if coeffs is not None:
            self.probe()
            return SeriesRunner(problem.t, coeffs, reorder=self.reorder, compiled=self.compiled)
        if problem.method.kind == "ppr":
            return PprRunner(PprSolver(problem.t, problem.method.alpha))
        return HeatRunner(problem.t, problem.method.t)


class SeriesRunner:
    """sum_j c_j T^j X in float32 on a reordered CSR; one call at a time (own buffers)."""

    backend = "sparse"

    def __init__(
        self,
        t: sp.csr_matrix,
        coeffs: np.ndarray,
        *,
        reorder: bool,
        compiled: bool = False,
        fuse: bool = True,
        compact: bool = True,
    ) -> None:
        n = t.shape[0]
        perm = _rcm(t) if reorder and n > 1 else np.arange(n)
        tp64 = sp.csr_matrix(t[perm][:, perm], dtype=np.float64)
        tp64.sort_indices()
        tp = tp64.astype(np.float32)
        tp.sort_indices()
        self._n = n
        self._t: sp.csr_matrix | None = tp
        self._indptr = tp.indptr.astype(np.int32)
        self._indices = tp.indices.astype(np.int32)
        self._perm = perm.astype(np.intp)
        self._inverse = np.argsort(perm).astype(np.intp)
        self._perm32 = self._perm.astype(np.int32)
        self._inverse32 = self._inverse.astype(np.int32)
        self._coeffs = [np.float32(c) for c in coeffs]
        self._coeffs32 = np.asarray(coeffs, dtype=np.float32)
        self._compiled = compiled
        self._band = _band(self._indptr, self._indices)
        # fuse=False: one product per step even where the band allows the wavefront (the
        # bench's before/after baseline)
        self._fused = fuse and compiled and len(coeffs) >= 2 and self._band <= MAX_BAND_FRACTION * n
        # the kernel's rings, in rows of X per thread; at most the two step buffers (z, y)
        # that the fused pass does without, so it never needs more memory than the steps
        self._ring_rows = (len(coeffs) - 2) * _ring_rows(self._band, SERIES_CHUNK)
        self._fused = self._fused and self._ring_rows <= 2 * n
        # compact=False: the fused pass reads T's values even where the pattern and a scale
        # vector would do (the bench's before/after baseline)
        self._scale = _pattern_scale(tp64) if self._fused and compact else None
        self._series_csr: tuple[np.ndarray, np.ndarray, np.ndarray | None]
        if self._scale is not None:
            self._series_csr = (self._indptr, self._indices, None)
        elif self._fused:  # even row lengths: the kernel's two-way loop then has no remainder
            self._series_csr = _pad_rows(self._indptr, self._indices, tp.data, 2)
        if self._fused:  # what it reads is _series_csr alone: T's values go with the compact
            # operator (its memory is then the pattern and S, 4 bytes an entry, not 12)
            self._t = None
            if self._scale is None:
                self._indptr = self._indices = np.empty(0, dtype=np.int32)
            self._perm = self._inverse = self._inverse32 = np.empty(0, dtype=np.intp)
        self._buffers: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()
        row_nnz = int(np.diff(tp.indptr).max()) if tp.nnz else 1
        # the same bound for the compact operator: per row and step it rounds each sum once
        # and s_i, s_i (S z)_i a few times, where the values round each entry and product
        self._bound = float32_error_bound(row_nnz * len(coeffs))

    def run(self, x: np.ndarray) -> RunOutput:
        x = np.ascontiguousarray(x, dtype=np.float32)
        with self._lock:
            xp, z, y = self._buffers_for(x.shape[1], 1 if self._fused else 3)
            if not self._compiled:
                np.take(x, self._perm, axis=0, out=xp)
                z = self._scipy_series(xp, z, y)
                return RunOutput(np.take(z, self._inverse, axis=0), self._bound)
            assert _spmm is not None  # compiled runners come from load(), which probes
            if self._fused:  # the threads also permute X (gather), each its own rows
                out = _aligned_empty(xp.shape)
                _spmm.csr_series(
                    *self._series_csr,
                    self._coeffs32,
                    xp,
                    out,
                    band=self._band,
                    chunk=SERIES_CHUNK,
                    threads=self.threads(),
                    scatter=self._perm32,
                    scale=self._scale,
                    gather=self._perm32,
                    source=x,
                )
                return RunOutput(out, self._bound)
            # the extension's row copy: np.take costs about one CSR product per direction
            _spmm.take_rows(x, self._perm32, xp)
            z = self._compiled_series(xp, z, y)
            out = np.empty_like(z)
            _spmm.take_rows(z, self._inverse32, out)
            return RunOutput(out, self._bound)

    # Horner's rule: z_K = c_K X, z_j = c_j X + T z_{j+1}, result z_0. Both forms ping-pong
    # between the buffers z and y and return the one holding z_0.

    def _compiled_series(self, xp: np.ndarray, z: np.ndarray, y: np.ndarray) -> np.ndarray:
        coeffs = self._coeffs
        if len(coeffs) == 1:
            np.multiply(xp, coeffs[0], out=z)
            return z
        assert _spmm is not None  # only run() calls this, for a compiled runner
        assert self._t is not None  # kept by every runner but the fused ones
        # z_{K-1} = c_{K-1} X + c_K (T X): scaling the first product saves the pass c_K X
        _spmm.csr_spmm(
            self._indptr, self._indices, self._t.data, xp, z, xp, c=coeffs[-2], a=coeffs[-1]
        )
        for c in coeffs[-3::-1]:
            _spmm.csr_spmm(self._indptr, self._indices, self._t.data, z, y, xp, c=c)
            z, y = y, z
        return z

    def _scipy_series(self, xp: np.ndarray, z: np.ndarray, y: np.ndarray) -> np.ndarray:
        np.multiply(xp, self._coeffs[-1], out=z)
        for c in self._coeffs[-2::-1]:
            np.multiply(xp, c, out=y)
            self._accumulate(z, y)
            z, y = y, z
        return z

    def _accumulate(self, z: np.ndarray, y: np.ndarray) -> None:
        """y += T z (scipy)."""
        assert self._t is not None  # not compiled: never fused
        n, f = z.shape
        if _csr_matvecs is None or f == 0:
            y += self._t @ z
            return
        _csr_matvecs(
            n, n, f, self._indptr, self._indices, self._t.data, z.reshape(-1), y.reshape(-1)
        )

    def threads(self) -> int:
        """Threads for one diffusion: `kernels.threads`, or 1 below THREADS_MIN_NODES."""
        n = self._n
        if n < THREADS_MIN_NODES:
            return 1
        return max(1, min(kernel_threads.count(), 2 * n // max(self._ring_rows, 1)))

    def _buffers_for(self, f: int, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """xp, z, y of width f (z and y empty when count is 1: the fused pass has rings)."""
        buffers = self._buffers.get(f)
        if buffers is None:
            n = self._n
            xp, z, y = (_aligned_empty((n if k < count else 0, f)) for k in range(3))
            buffers = (xp, z, y)
            self._buffers = {f: buffers}  # keep one width: bounded memory
        return buffers

    def close(self) -> None:
        self._buffers = {}


def _pattern_scale(t: sp.csr_matrix) -> np.ndarray | None:
    """s (float32) with T_ij = s_i s_j on every stored entry, or None.

    That is T = S P S for the pattern P: sym normalisation of an unweighted graph with self
    loops (s = d^-1/2, read off the diagonal T_ii = s_i^2). The series then reads the
    pattern and s instead of T's values, half the bytes per entry. The check allows float64
    rounding only, so a weighted graph keeps its values.
    """
    diagonal = t.diagonal()
    if t.nnz == 0 or (diagonal < 0).any():
        return None
    s = np.sqrt(diagonal)
    rows = np.repeat(np.arange(t.shape[0]), np.diff(t.indptr))
    if not np.allclose(t.data, s[rows] * s[t.indices], rtol=1e-12, atol=0):
        return None
    return s.astype(np.float32)


def _aligned_empty(shape: tuple[int, int]) -> np.ndarray:
    """An empty float32 array starting on a cache line (64 bytes): numpy's large blocks start
    16 bytes into a page, and a 16-feature row read across two lines is a second load."""
    count = shape[0] * shape[1]
    block = np.empty(count + CACHE_LINE // 4, dtype=np.float32)
    skip = (-block.ctypes.data % CACHE_LINE) // 4
    return block[skip : skip + count].reshape(shape)


def _pad_rows(
    indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, multiple: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The CSR with every row padded to a multiple of `multiple` entries by zeros on its own
    diagonal (exact: features are finite; inside any band)."""
    n = len(indptr) - 1
    lengths = np.diff(indptr)
    padded = (lengths + multiple - 1) // multiple * multiple
    new_indptr = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(padded, out=new_indptr[1:])
    new_indices = np.repeat(np.arange(n, dtype=np.int32), padded)
    new_data = np.zeros(int(new_indptr[-1]), dtype=np.float32)
    within = np.arange(len(indices)) - np.repeat(indptr[:-1], lengths)
    at = np.repeat(new_indptr[:-1], lengths) + within
    new_indices[at] = indices
    new_data[at] = data
    return new_indptr, new_indices, new_data


def _ring_rows(band: int, chunk: int) -> int:
    """Rows of one intermediate step's ring in csr_series (its series_plan)."""
    lag = 1 + -(-band // chunk)
    need = (lag + 1) * chunk + band
    return 1 << max(need - 1, 0).bit_length()


def _band(indptr: np.ndarray, indices: np.ndarray) -> int:
    """max |row - column| over the stored entries (0 for none)."""
    if len(indices) == 0:
        return 0
    rows = np.repeat(np.arange(len(indptr) - 1, dtype=np.int64), np.diff(indptr))
    return int(np.abs(rows - indices).max())


def _rcm(t: sp.csr_matrix) -> np.ndarray:
    """Reverse Cuthill-McKee on the symmetrised pattern (works for directed graphs too)."""
    pattern = (abs(t) + abs(t.T)).tocsr()
    return np.asarray(reverse_cuthill_mckee(pattern, symmetric_mode=True))


class PprRunner:
    backend = "sparse"

    def __init__(self, solver: PprSolver) -> None:
        self._solver = solver

    def run(self, x: np.ndarray) -> RunOutput:
        return RunOutput(self._solver.solve(x), 0.0)

    def close(self) -> None:
        return None


class HeatRunner:
    backend = "sparse"

    def __init__(self, t: sp.csr_matrix, time: float) -> None:
        self._t = t
        self._time = time

    def run(self, x: np.ndarray) -> RunOutput:
        return RunOutput(exact_heat(self._t, self._time, x), 0.0)

    def close(self) -> None:
        return None
