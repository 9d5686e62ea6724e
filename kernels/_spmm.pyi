"""Types of the optional compiled extension built from kernels/_spmm.c (absent when not built).

Arrays arrive through the buffer protocol: index arrays int32 or int64, values float32,
2-D arrays C-contiguous. The functions write into `y` / `out` and return None.
"""

from typing import Any, SupportsFloat, TypeAlias

import numpy as np
from typing_extensions import Buffer

_Array: TypeAlias = np.ndarray[Any, Any] | Buffer

isa: str
"""The product kernel chosen at import: "avx2" or "portable"."""
series_isas: str
"""The fused series' instruction sets this CPU runs, e.g. "portable avx2 avx512"."""

def csr_spmm(
    indptr: _Array,
    indices: _Array,
    data: _Array,
    z: _Array,
    y: _Array,
    x: _Array | None = None,
    *,
    c: SupportsFloat = 0.0,
    a: SupportsFloat = 1.0,
    portable: bool = False,
) -> None:
    """y = a * (T @ z) + c * x for the CSR matrix T = (data, indices, indptr), in float32."""

def csr_series(
    indptr: _Array,
    indices: _Array,
    data: _Array | None,
    coeffs: _Array,
    x: _Array,
    out: _Array,
    *,
    band: int,
    chunk: int = 64,
    threads: int = 1,
    scatter: _Array | None = None,
    isa: str | None = None,
    scale: _Array | None = None,
    gather: _Array | None = None,
    source: _Array | None = None,
) -> None:
    """out = sum_j coeffs[j] T^j x in one wavefront pass; every |row - column| <= band.

    T = (data, indices, indptr), or with data None and `scale`, diag(scale) P diag(scale)
    for the pattern P = (indices, indptr). With `gather` (int32) and `source`, the threads
    first fill x: x[i] = source[gather[i]]."""

def take_rows(src: _Array, rows: _Array, out: _Array, /) -> None:
    """out[i] = src[rows[i]] for float32 src (M, F) and out (N, F), rows int32/int64 (N,)."""
