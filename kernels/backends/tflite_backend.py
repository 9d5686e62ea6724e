"""int8 TFLite backend: the off-diagonal of P as a 1x1 CONV_2D model, run on the CPU.

Per problem the runner quantises P once and, per feature count F, writes one model file
(cached on disk under `cache_dir` as `<key>-f<F>.tflite`, its sha256 next to it in
`<key>-f<F>.tflite.sha256`, the host terms in `<key>.host.npz`) and one interpreter (in
memory, reused for every call). A call quantises X with numpy straight into the
interpreter's input tensor, invokes, and dequantises: no model or interpreter work per call.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dgdm.kernels import quantize as q
from dgdm.kernels.backends.base import Problem, RunOutput
from dgdm.kernels.diffusion import dense_propagator
from dgdm.kernels.errors import BackendError, BackendUnavailable
from dgdm.kernels.tflite_model import build_conv_model
from dgdm.kernels.tflite_runtime import find_runtime, open_interpreter

DEFAULT_MAX_NODES = 4096
MAX_RETRIES = 6  # gain halvings per call; 1/64 is below any calibrated/never-clip ratio


class TFLiteBackend:
    """int8 model on the CPU through ai-edge-litert or tflite-runtime."""

    name = "tflite"

    def __init__(
        self,
        cache_dir: Path | None = None,
        max_nodes: int = DEFAULT_MAX_NODES,
        num_threads: int = 1,
    ) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.max_nodes = max_nodes
        self.num_threads = num_threads
        self._model_store: ModelStore | None = None

    def probe(self) -> None:
        find_runtime()

    def load(self, problem: Problem) -> Int8Runner:
        check_size(problem, self.max_nodes, self.name)
        runtime = find_runtime()

        def open_model(path: Path) -> Any:
            return open_interpreter(runtime, path, self.num_threads)

        return Int8Runner(self.name, problem, self._store(), open_model)

    def _store(self) -> ModelStore:
        if self._model_store is None:
            self._model_store = ModelStore(self.cache_dir)
        return self._model_store


def check_size(problem: Problem, max_nodes: int, backend: str) -> None:
    if problem.n > max_nodes:
        raise BackendUnavailable(
            f"{backend} bakes a dense N x N operator into its model and {problem.n} nodes "
            f"exceed its limit of {max_nodes}."
        )


class ModelStore:
    """Model files and host terms in `cache_dir`, or in a private directory removed at exit."""

    def __init__(self, cache_dir: Path | None) -> None:
        if cache_dir is None:
            cache_dir = Path(tempfile.mkdtemp(prefix="dgdm-tflite-"))
            weakref.finalize(self, shutil.rmtree, cache_dir, ignore_errors=True)
        cache_dir.mkdir(parents=True, exist_ok=True)
        self.dir = cache_dir

    def model_path(self, key: str, features: int) -> Path:
        return self.dir / f"{key}-f{features}.tflite"

    def host_path(self, key: str) -> Path:
        return self.dir / f"{key}.host.npz"

    def write(self, path: Path, data: bytes) -> None:
        """Atomic: a crash leaves the old file or none, never half a model. The digest goes
        last, so a crash between the two leaves a mismatch, which `verify` rebuilds."""
        self._write_atomic(path, data)
        self._write_atomic(_digest_path(path), _digest(data).encode())

    def verify(self, path: Path) -> None:
        """BackendError unless the model matches the digest written with it: a bit-flipped
        model still loads and runs, silently wrong, so loading alone cannot detect it."""
        try:
            expected = _digest_path(path).read_text(encoding="ascii").strip()
            actual = _digest(path.read_bytes())
        except (OSError, UnicodeDecodeError) as exc:
            raise BackendError(f"the cached model {path.name} cannot be verified ({exc}).") from exc
        if actual != expected:
            raise BackendError(f"the cached model {path.name} does not match its sha256 digest.")

    def remove(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        _digest_path(path).unlink(missing_ok=True)

    def _write_atomic(self, path: Path, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)

    def load_host(self, key: str) -> q.HostTerms | None:
        path = self.host_path(key)
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as arrays:
                return q.HostTerms.from_arrays(arrays)
        except (OSError, ValueError, KeyError, BackendError):
            path.unlink(missing_ok=True)  # corrupt: rebuilt from P below
            return None

    def save_host(self, key: str, host: q.HostTerms) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix="host", suffix=".npz")
        with os.fdopen(fd, "wb") as fh:
            # allow_pickle spelled out at its default: otherwise the ** mapping could fill it
            np.savez(fh, allow_pickle=True, **host.to_arrays())
        os.replace(tmp, self.host_path(key))


def _digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Int8Runner:
    """Runs one problem's int8 model; thread-safe (one lock, as an interpreter is not)."""

    def __init__(
        self,
        backend: str,
        problem: Problem,
        store: ModelStore,
        open_model: Callable[[Path], Any],
        prepare_model: Callable[[Path], Path] = lambda path: path,
    ) -> None:
        self.backend = backend
        self._problem = problem
        self._store = store
        self._open_model = open_model
        self._prepare_model = prepare_model
        self._qop: q.QuantizedOperator | None = None
        self._sessions: dict[int, Session] = {}
        self._lock = threading.Lock()

    def run(self, x: np.ndarray) -> RunOutput:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[0] != self._problem.n:
            raise BackendError(f"features must have shape ({self._problem.n}, F), not {x.shape}.")
        with self._lock:
            session = self._sessions.get(x.shape[1]) or self._open_session(x.shape[1])
            return session.run(x)

    def raw_invoke(self, features: int) -> Callable[[], None]:
        """The bare interpreter invoke of the F-feature model (for benchmarks)."""
        with self._lock:
            session = self._sessions.get(features) or self._open_session(features)
        return session.invoke

    def close(self) -> None:
        with self._lock:
            self._sessions.clear()

    def _open_session(self, features: int) -> Session:
        key = self._problem.key
        host = self._store.load_host(key)
        path = self._store.model_path(key, features)
        if host is None or not path.exists():
            qop = self._quantized()
            self._store.write(path, build_conv_model(qop, features))
            self._store.save_host(key, qop.host)
            host = qop.host
        session = Session(self._open_checked(path), host, features)
        self._sessions[features] = session
        return session

    def _open_checked(self, path: Path) -> Any:
        """Open a (cached) model; a corrupt file is removed, so the next load rebuilds it."""
        try:
            self._store.verify(path)
        except BackendError:
            self._store.remove(path)
            raise
        prepared = self._prepare_model(path)
        try:
            return self._open_model(prepared)
        except BackendUnavailable:
            raise
        except BackendError:
            prepared.unlink(missing_ok=True)
            self._store.remove(path)
            raise

    def _quantized(self) -> q.QuantizedOperator:
        if self._qop is None:
            p = dense_propagator(self._problem.t, self._problem.method)
            self._qop = q.quantize_operator(p)
        return self._qop


class Session:
    """One interpreter for one (problem, F): buffers and views reused across calls."""

    def __init__(self, interpreter: Any, host: q.HostTerms, features: int) -> None:
        n = host.diagonal.shape[0]
        inp = interpreter.get_input_details()[0]
        out = interpreter.get_output_details()[0]
        _check_io(inp, out, n, features)
        self.invoke = interpreter.invoke
        self._input = interpreter.tensor(inp["index"])
        self._output = interpreter.tensor(out["index"])
        self._interpreter = interpreter  # keeps the tensor buffers alive
        self._host = host
        self._output_scale = float(out["quantization"][0])
        self._gains = np.ones(features, dtype=np.float32)
        self._workspace = q.Workspace(features, n)

    def run(self, x: np.ndarray) -> RunOutput:
        zt, bound = self._attempt(x)
        if bound > q.MAX_ERROR and (self._gains < 1.0).any():
            # Gains lowered for earlier features may cost these ones precision: start afresh.
            self._gains[:] = 1.0
            zt, bound = self._attempt(x)
        if not bound <= q.MAX_ERROR:
            raise BackendError(
                f"the int8 error bound for these features is {bound:.3g}, above "
                f"{q.MAX_ERROR}; a float backend must answer."
            )
        return RunOutput(zt.T, bound)

    def _attempt(self, x: np.ndarray) -> tuple[np.ndarray, float]:
        prep = q.prepare(x, self._gains, self._input()[0, 0], self._workspace)
        self.invoke()
        extremes = q.output_extremes(self._output()[0, 0])
        saturated = q.saturated_columns(extremes)
        for _ in range(MAX_RETRIES):
            if not saturated.size:
                break
            # Output clipped: halve those columns' input gain (exact, the host undoes it).
            self._gains[saturated] *= 0.5
            q.requantize_columns(prep, saturated, self._gains, self._input()[0, 0])
            self.invoke()
            extremes = q.output_extremes(self._output()[0, 0])
            saturated = q.saturated_columns(extremes)
        if saturated.size:
            raise BackendError("the int8 output still saturates after lowering the input gain.")
        zt = self._dequantize(prep)
        self._raise_gains_with_headroom(extremes)
        flat = zt.ravel()
        z_norm = math.sqrt(float(np.dot(flat, flat)))
        return zt, q.error_bound(self._host, self._output_scale, prep, z_norm)

    def _dequantize(self, prep: q.Prepared) -> np.ndarray:
        """Z^T (F, N) = s * out + diag(P) X^T + m (O 1)^T, all rows contiguous."""
        out_t = self._output()[0, 0]
        zt = np.multiply(out_t, (prep.scales * np.float32(self._output_scale))[:, None])
        zt += np.multiply(prep.xt, self._host.diagonal, out=prep.scratch)
        if prep.means.any():
            zt += np.multiply.outer(prep.means, self._host.row_sums)
        return zt

    def _raise_gains_with_headroom(self, extremes: tuple[np.ndarray, np.ndarray]) -> None:
        """Give columns back their gain when their output used < 45 % of the range."""
        high, low = extremes
        peak = np.maximum(high, -low.astype(np.int16))
        self._gains[(self._gains < 1.0) & (peak < 0.45 * q.QMAX)] *= 2.0


def _check_io(inp: dict, out: dict, n: int, features: int) -> None:
    shape = [1, 1, features, n]
    ok = (
        list(inp["shape"]) == shape
        and list(out["shape"]) == shape
        and inp["dtype"] == np.int8
        and out["dtype"] == np.int8
        and math.isclose(inp["quantization"][0], q.INPUT_SCALE, rel_tol=1e-6)
        and inp["quantization"][1] == 0
        and out["quantization"][1] == 0
        and out["quantization"][0] > 0
    )
    if not ok:
        raise BackendError(
            f"the cached model does not match this operator ({n} nodes, F={features})."
        )
