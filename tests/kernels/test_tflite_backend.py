"""The int8 TFLite backend run for real on ai-edge-litert, checked against float64."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dgdm.kernels.backends.numpy_backend import NumpyBackend
from dgdm.kernels.backends.tflite_backend import TFLiteBackend
from dgdm.kernels.diffusion import dense_propagator
from dgdm.kernels.engine import Engine
from dgdm.kernels.errors import BackendError, BackendUnavailable
from dgdm.kernels.graph import Graph
from dgdm.kernels.method import Method
from dgdm.kernels.quantize import MAX_ERROR
from dgdm.kernels.tflite_bench import bench_tflite, rgg_problem


def relative_error(z: np.ndarray, p: np.ndarray, x: np.ndarray) -> float:
    exact = p @ x.astype(np.float64)
    return float(np.linalg.norm(z - exact) / np.linalg.norm(exact))


def dense_features(kind: str, n: int, f: int, rng: np.random.Generator) -> np.ndarray:
    return {
        "uniform": lambda: rng.uniform(-1, 1, (n, f)),
        "gauss": lambda: rng.normal(size=(n, f)) * 10,
        "positive": lambda: rng.random((n, f)) + 3.0,
        "mixed": lambda: np.c_[np.ones((n, 2)), rng.normal(size=(n, f - 2))],
    }[kind]()


@pytest.mark.parametrize("n", [64, 300, 1024, 2048])
def test_error_within_reported_bound(n: int) -> None:
    problem = rgg_problem(n, seed=n)
    p = dense_propagator(problem.t, problem.method)
    runner = TFLiteBackend().load(problem)
    rng = np.random.default_rng(n)
    for kind in ("uniform", "positive", "mixed", "gauss"):
        x = dense_features(kind, n, 16, rng)
        try:
            out = runner.run(x)
        except BackendError:
            # Gaussian columns use little of the output range; at N = 2,048 their bound
            # can pass 0.03, and then the backend refuses rather than misreports.
            assert (kind, n) == ("gauss", 2048)
            continue
        assert out.z.shape == (n, 16)
        assert out.z.dtype == np.float32
        err = relative_error(out.z, p, x)
        assert err <= out.error_bound <= MAX_ERROR, (kind, err, out.error_bound)
        assert err > 1e-4  # it really is int8, not a float path
    runner.close()


@pytest.mark.parametrize(
    "method",
    [
        Method("ppr", alpha=0.15),
        Method("heat", t=3.0, normalization="col", k=8),
        Method("heat", t=2.0, normalization="row"),
        Method("poly", coefficients=(0.5, 0.3, 0.2)),
    ],
)
def test_methods_exact_and_truncated(method: Method) -> None:
    problem = rgg_problem(200, seed=7, method=method)
    p = dense_propagator(problem.t, method)
    x = np.random.default_rng(3).uniform(-1, 1, (200, 8))
    out = TFLiteBackend().load(problem).run(x)
    assert relative_error(out.z, p, x) <= out.error_bound <= MAX_ERROR


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    f=st.integers(1, 24),
    density=st.sampled_from([1.0, 0.5, 0.2, 0.05]),
    scale=st.floats(1e-3, 1e3),
    offset=st.floats(-5, 5),
)
def test_reported_bound_is_never_below_the_error(seed, f, density, scale, offset) -> None:
    """Sparse, shifted, scaled features: either a result within its bound or a refusal."""
    runner = _shared_runner()
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(128, f)) * (rng.random((128, f)) < density) + offset) * scale
    try:
        out = runner.run(x)
    except BackendError as exc:
        assert "error bound" in str(exc)
        return
    assert relative_error(out.z, _P128, x) <= out.error_bound <= MAX_ERROR


_PROBLEM128 = rgg_problem(128, seed=11)
_P128 = dense_propagator(_PROBLEM128.t, _PROBLEM128.method)
_RUNNERS: list = []


def _shared_runner():
    if not _RUNNERS:
        _RUNNERS.append(TFLiteBackend().load(_PROBLEM128))
    return _RUNNERS[0]


def test_one_hot_features_are_refused_not_misreported() -> None:
    """One-hot columns use a sliver of the calibrated output range: the bound says so."""
    problem = rgg_problem(1024, seed=2)
    with pytest.raises(BackendError, match="error bound"):
        TFLiteBackend().load(problem).run(np.eye(1024)[:, :16])


def test_zero_features_give_exact_zeros() -> None:
    out = _shared_runner().run(np.zeros((128, 5)))
    assert not out.z.any()
    assert out.error_bound == 0.0


def test_saturating_columns_are_rerun_at_lower_gain() -> None:
    """Smooth positive columns (the top of P's spectrum) overflow the calibrated range."""
    p = _P128
    _w, v = np.linalg.eigh((p + p.T) / 2)
    x = v[:, -4:] * np.sign(v[:, -4:].sum(axis=0))
    out = _shared_runner().run(x)
    assert relative_error(out.z, p, x) <= out.error_bound <= MAX_ERROR


def test_models_cached_on_disk_and_reused(tmp_path) -> None:
    problem = rgg_problem(100, seed=5)
    x = np.random.default_rng(0).uniform(-1, 1, (100, 6))
    first = TFLiteBackend(tmp_path).load(problem).run(x)
    files = sorted(p.name for p in tmp_path.iterdir())
    model = f"{problem.key}-f6.tflite"
    assert files == [model, f"{model}.sha256", f"{problem.key}.host.npz"]
    mtime = (tmp_path / files[0]).stat().st_mtime_ns
    second = TFLiteBackend(tmp_path).load(problem).run(x)
    assert (tmp_path / files[0]).stat().st_mtime_ns == mtime  # loaded, not rebuilt
    np.testing.assert_array_equal(first.z, second.z)


def test_one_interpreter_per_feature_count(tmp_path) -> None:
    problem = rgg_problem(80, seed=4)
    runner = TFLiteBackend(tmp_path).load(problem)
    rng = np.random.default_rng(1)
    for f in (3, 7, 3, 7):
        runner.run(rng.uniform(-1, 1, (80, f)))
    assert sorted(runner._sessions) == [3, 7]
    assert len(list(tmp_path.glob("*.tflite"))) == 2


def test_corrupt_model_file_is_a_backend_error_then_rebuilt(tmp_path) -> None:
    problem = rgg_problem(90, seed=6)
    x = np.random.default_rng(2).uniform(-1, 1, (90, 4))
    good = TFLiteBackend(tmp_path).load(problem).run(x)
    model = tmp_path / f"{problem.key}-f4.tflite"
    model.write_bytes(model.read_bytes()[:200])
    with pytest.raises(BackendError):
        TFLiteBackend(tmp_path).load(problem).run(x)
    assert not model.exists()  # removed, so the next load rebuilds it
    again = TFLiteBackend(tmp_path).load(problem).run(x)
    np.testing.assert_array_equal(good.z, again.z)


def _flip_a_weight_bit(model: Path) -> None:
    """Flip one bit inside the weight buffer: the file still parses, loads and runs."""
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x10
    model.write_bytes(bytes(data))


def test_bit_flipped_model_is_detected_by_its_digest_then_rebuilt(tmp_path) -> None:
    problem = rgg_problem(90, seed=6)
    x = np.random.default_rng(2).uniform(-1, 1, (90, 4))
    good = TFLiteBackend(tmp_path).load(problem).run(x)
    model = tmp_path / f"{problem.key}-f4.tflite"
    digest = tmp_path / f"{problem.key}-f4.tflite.sha256"
    assert digest.read_text() == hashlib.sha256(model.read_bytes()).hexdigest()
    _flip_a_weight_bit(model)
    interpreter = Interpreter(model_path=str(model))  # the runtime itself does not notice
    interpreter.allocate_tensors()
    with pytest.raises(BackendError, match="sha256"):
        TFLiteBackend(tmp_path).load(problem).run(x)
    assert not model.exists()
    assert not digest.exists()
    again = TFLiteBackend(tmp_path).load(problem).run(x)
    np.testing.assert_array_equal(good.z, again.z)


def test_model_without_its_digest_is_rebuilt(tmp_path) -> None:
    problem = rgg_problem(90, seed=6)
    x = np.random.default_rng(2).uniform(-1, 1, (90, 4))
    good = TFLiteBackend(tmp_path).load(problem).run(x)
    (tmp_path / f"{problem.key}-f4.tflite.sha256").unlink()
    with pytest.raises(BackendError, match="verified"):
        TFLiteBackend(tmp_path).load(problem).run(x)
    np.testing.assert_array_equal(TFLiteBackend(tmp_path).load(problem).run(x).z, good.z)


def test_engine_falls_back_from_a_bit_flipped_model_then_recovers(tmp_path) -> None:
    problem = rgg_problem(90, seed=6)
    graph = Graph(
        tuple(range(90)), problem.t.tocsr(), np.zeros((90, 0)), False, "g", problem.method
    )
    x = np.random.default_rng(2).uniform(-1, 1, (90, 4))
    clock = [0.0]
    backends = [TFLiteBackend(tmp_path), NumpyBackend(dtype=np.float64)]
    engine = Engine(backends=backends, clock=lambda: clock[0])
    graph_id = engine.register(graph)
    assert engine.diffuse_registered(graph_id, x, backend="tflite").backend == "tflite"
    (model,) = tmp_path.glob("*.tflite")
    _flip_a_weight_bit(model)
    engine.close()  # drop the loaded interpreter: the next call loads from disk
    result = engine.diffuse_registered(graph_id, x, backend="tflite")
    assert result.backend == "numpy"
    assert result.fallbacks == ("tflite",)
    clock[0] += 3600.0  # past the re-probe backoff: the model is rebuilt and used again
    assert engine.diffuse_registered(graph_id, x, backend="tflite").backend == "tflite"


def test_corrupt_host_terms_are_rebuilt(tmp_path) -> None:
    problem = rgg_problem(90, seed=6)
    x = np.random.default_rng(2).uniform(-1, 1, (90, 4))
    good = TFLiteBackend(tmp_path).load(problem).run(x)
    (tmp_path / f"{problem.key}.host.npz").write_bytes(b"not an npz")
    np.testing.assert_array_equal(TFLiteBackend(tmp_path).load(problem).run(x).z, good.z)


def test_wrong_feature_shape_is_a_backend_error() -> None:
    with pytest.raises(BackendError, match="shape"):
        _shared_runner().run(np.zeros((127, 2)))


def test_too_many_nodes_is_unavailable() -> None:
    with pytest.raises(BackendUnavailable, match="limit"):
        TFLiteBackend(max_nodes=50).load(rgg_problem(60))


def test_probe_finds_ai_edge_litert() -> None:
    TFLiteBackend().probe()


def test_bench_rows_have_timings() -> None:
    (row,) = bench_tflite([64], [4], repeats=5)
    assert row["n"] == 64
    assert row["f"] == 4
    assert min(row["invoke_us"], row["run_us"], row["numpy_f32_us"]) > 0
    assert row["error_bound"] <= MAX_ERROR
