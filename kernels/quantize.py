"""int8 quantisation of a dense propagator P and of feature matrices, with an error bound.

Z = P X is split as Z = diag(P) X + O X: the diagonal (the largest entries of a ppr/heat
propagator) stays in float on the host, only the off-diagonal O is baked into the model,
with one weight scale per output row (per-channel). Each feature column is centred when
that halves its range (O X = O (X - 1 m^T) + (O 1) m^T, the second term on the host) and
scaled to max |x| = gain <= 1 before rounding to int8 (input scale 1/127, zero point 0).

The output scale is calibrated on data (KERNELS-FACTS: about 2x better than a never-clipping
bound): zero-mean Gaussian columns scaled to max |x| = 1, with a 25 % margin. A column whose
output saturates is re-run at half the gain (the host knows its own scaling, so this is
exact); the gain is remembered per column so that similar features do not pay again.

The error bound (`error_bound`) is a statistical estimate computed from the quantisation
step sizes, with a safety margin, not a worst-case bound: rounding errors are modelled as
independent and uniform on +-step/2 (variance step^2 / 12) and propagated through norms
measured on the operator once (||O - O_q||_F and ||O||_F), then multiplied by `MARGIN`.
Tests check it against the measured error for dense, sparse, one-hot, heavy-tailed,
smooth and rough features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dgdm.kernels.errors import BackendError

QMAX = 127
INPUT_SCALE = 1.0 / QMAX
MARGIN = 1.5
MAX_ERROR = 0.03
CALIBRATION_COLUMNS = 32
CALIBRATION_HEADROOM = 1.0
# Centre a column only when that shrinks its range by this factor (one-hot columns are not
# centred: the mean would turn exact zeros into a constant that rounds the same way everywhere).
CENTRE_GAIN = 0.75


@dataclass(frozen=True)
class QuantizedOperator:
    """What the model holds (weights, scales) and what the host keeps (the rest)."""

    weights: np.ndarray  # int8 (N, N): row i = output channel i, diagonal zero
    weight_scales: np.ndarray  # float32 (N,)
    output_scale: float
    host: HostTerms

    @property
    def n(self) -> int:
        return int(self.weights.shape[0])


@dataclass(frozen=True)
class HostTerms:
    """Float parts computed on the host, and the operator norms the error bound needs."""

    diagonal: np.ndarray  # float32 (N,): diag(P)
    row_sums: np.ndarray  # float32 (N,): O 1, to undo centring
    weight_error_rms: float  # ||O - O_q||_F / sqrt(N)
    operator_rms: float  # ||O||_F / sqrt(N)
    never_clip: float  # max_i sum_j |O_q[i, j]|: no |x| <= 1 input can exceed it

    @property
    def row_sums_norm2(self) -> float:
        return float(np.dot(self.row_sums, self.row_sums))

    def to_arrays(self) -> dict[str, np.ndarray]:
        norms = [self.weight_error_rms, self.operator_rms, self.never_clip]
        return {"diagonal": self.diagonal, "row_sums": self.row_sums, "norms": np.array(norms)}

    @classmethod
    def from_arrays(cls, arrays) -> HostTerms:
        diagonal, row_sums, norms = arrays["diagonal"], arrays["row_sums"], arrays["norms"]
        if diagonal.shape != row_sums.shape or norms.shape != (3,) or diagonal.ndim != 1:
            raise BackendError("the cached host terms have inconsistent shapes.")
        w_rms, op_rms, never_clip = (float(v) for v in norms)
        return cls(diagonal.astype(np.float32), row_sums.astype(np.float32), w_rms, op_rms,
                   never_clip)  # fmt: skip


def quantize_operator(p: np.ndarray, seed: int = 0) -> QuantizedOperator:
    """Per-channel int8 weights of the off-diagonal of P, host terms, calibrated output scale."""
    p = np.asarray(p, dtype=np.float64)
    n = p.shape[0]
    off = p.copy()
    np.fill_diagonal(off, 0.0)
    row_max = np.abs(off).max(axis=1)
    scales = np.where(row_max > 0, row_max / QMAX, 1.0).astype(np.float32)
    weights = np.clip(np.rint(off / scales[:, None]), -QMAX, QMAX).astype(np.int8)
    dequant = weights * scales[:, None].astype(np.float64)
    host = HostTerms(
        diagonal=np.diag(p).astype(np.float32),
        row_sums=off.sum(axis=1).astype(np.float32),
        weight_error_rms=float(np.linalg.norm(off - dequant)) / math.sqrt(n),
        operator_rms=float(np.linalg.norm(off)) / math.sqrt(n),
        never_clip=float(np.abs(dequant).sum(axis=1).max()),
    )
    output_range = _calibrate_output_range(dequant, host.never_clip, seed)
    return QuantizedOperator(weights, scales, output_range / QMAX, host)


def _calibrate_output_range(dequant: np.ndarray, never_clip: float, seed: int) -> float:
    n = dequant.shape[0]
    x = np.random.default_rng(seed).standard_normal((n, CALIBRATION_COLUMNS))
    x -= x.mean(axis=0)
    x /= np.abs(x).max(axis=0)
    observed = float(np.abs(dequant @ np.rint(x * QMAX)).max()) * INPUT_SCALE
    if never_clip == 0.0:
        return 1.0  # P is diagonal: the model always outputs zeros
    return min(max(observed * CALIBRATION_HEADROOM, never_clip / 16), never_clip)


class Workspace:
    """Two (F, N) float32 buffers reused by every call of one session: X^T and scratch.

    A call then allocates only its result; numpy's ufuncs write into them with `out=`.
    """

    def __init__(self, features: int, n: int) -> None:
        self.xt = np.empty((features, n), dtype=np.float32)
        self.scratch = np.empty((features, n), dtype=np.float32)


@dataclass
class Prepared:
    """Host-side state of one call: X^T and how each column was shifted and scaled."""

    xt: np.ndarray  # (F, N) float32 copy of X^T, contiguous: every reduction runs along rows
    means: np.ndarray  # (F,) subtracted per column (0 where not centred)
    ranges: np.ndarray  # (F,) max |x - m| per column
    scales: np.ndarray  # (F,) xs = (x - m) / scale, scale = range / gain; 0 for zero columns
    centred_norm2: float  # ||X - 1 m^T||_F^2
    rounding_bias: np.ndarray  # (F,) mean input rounding error per column, in x/scale units
    scratch: np.ndarray  # (F, N) float32 work buffer


def prepare(x: np.ndarray, gains: np.ndarray, dst: np.ndarray, ws: Workspace) -> Prepared:
    """Centre/scale X (N, F) and write round(127 xs)^T into `dst` (int8, F x N).

    Works on a contiguous copy of X^T (in `ws.xt`): numpy reductions along axis 0 of a
    tall, narrow array are ~10x slower than along rows, and the model wants X^T anyway.
    """
    xt = ws.xt
    np.copyto(xt, x.T)
    xmax, xmin = xt.max(axis=1), xt.min(axis=1)
    means = xt.sum(axis=1) / np.float32(xt.shape[1])
    amax = np.maximum(xmax, -xmin)
    ranges = np.maximum(xmax - means, means - xmin)
    centre = ranges < CENTRE_GAIN * amax
    means = np.where(centre, means, np.float32(0.0))
    ranges = np.where(centre, ranges, amax)
    flat = xt.ravel()
    norm2 = max(float(np.dot(flat, flat)) - xt.shape[1] * float(np.dot(means, means)), 0.0)
    bias = np.zeros_like(means)
    prep = Prepared(xt, means, ranges, ranges / gains, norm2, bias, ws.scratch)
    quantize_columns(prep, slice(None), dst)
    return prep


def quantize_columns(prep: Prepared, cols, dst: np.ndarray) -> None:
    """dst[cols] = round(127 (x - m) / scale) for the selected feature columns."""
    safe = np.where(prep.scales[cols] > 0, prep.scales[cols], np.float32(1.0))
    if isinstance(cols, slice):  # every column: the scratch buffer, no temporaries
        xs = np.subtract(prep.xt, prep.means[:, None], out=prep.scratch)
    else:  # a few saturated columns (fancy indexing copies anyway)
        xs = prep.xt[cols] - prep.means[cols, None]
    xs *= (QMAX / safe)[:, None]
    before = xs.sum(axis=1)
    np.rint(xs, out=xs)
    # Rounding errors are not independent when many entries share a value (a constant or
    # sparse column): their mean acts coherently, through O 1, and is accounted exactly.
    prep.rounding_bias[cols] = (before - xs.sum(axis=1)) / (QMAX * xs.shape[1])
    dst[cols] = xs


def requantize_columns(prep: Prepared, cols: np.ndarray, gains: np.ndarray, dst) -> None:
    """Re-scale only the columns in `cols` at their (lowered) gains, in place."""
    prep.scales[cols] = prep.ranges[cols] / gains[cols]
    quantize_columns(prep, cols, dst)


def output_extremes(q_t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per output column (row of the F x N output) its largest and smallest int8 value;
    computed once per invoke, they serve both the saturation test and the gain raise."""
    return q_t.max(axis=1), q_t.min(axis=1)


def saturated_columns(extremes: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Indices of output columns that touch the int8 limits."""
    high, low = extremes
    return np.flatnonzero((high >= QMAX) | (low <= -QMAX - 1))


def error_bound(qop_host: HostTerms, output_scale: float, prep: Prepared, z_norm: float) -> float:
    """Relative Frobenius error estimate of one result (see the module docstring)."""
    n = qop_host.diagonal.shape[0]
    per_column = (n / 12.0) * ((qop_host.operator_rms * INPUT_SCALE) ** 2 + output_scale**2)
    err2 = qop_host.weight_error_rms**2 * prep.centred_norm2
    err2 += per_column * float(np.dot(prep.scales, prep.scales))
    coherent = prep.scales * prep.rounding_bias
    err2 += qop_host.row_sums_norm2 * float(np.dot(coherent, coherent))
    err = MARGIN * math.sqrt(err2)
    if err == 0.0:
        return 0.0
    if z_norm <= err:
        return math.inf
    return err / (z_norm - err)
