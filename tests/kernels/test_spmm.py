"""The optional compiled kernel dgdm.kernels._spmm against scipy's CSR @ dense, and the sparse
backend with and without it (same float32 numerics)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from dgdm.kernels.backends import sparse_backend
from dgdm.kernels.backends.sparse_backend import SparseBackend
from dgdm.kernels.diffusion import diffuse
from dgdm.kernels.errors import BackendUnavailable
from dgdm.kernels.method import Method
from dgdm.kernels.operator import problem_for

from .conftest import directed, geometric, graph_from_nx, spins_while

_spmm = pytest.importorskip(
    "dgdm.kernels._spmm", reason="the optional C extension is not built (no compiler?)"
)

PATHS = [pytest.param(False, id="dispatched"), pytest.param(True, id="portable")]


def random_csr(n: int, m: int, density: float, seed: int) -> sp.csr_matrix:
    t = sp.random(n, m, density=density, format="csr", dtype=np.float32, random_state=seed)
    t.data -= np.float32(0.5)  # signed weights
    return t


def expected(t: sp.csr_matrix, z: np.ndarray, x: np.ndarray | None, c: float, a: float):
    out = a * (t.astype(np.float64) @ z.astype(np.float64))
    return out + c * x.astype(np.float64) if x is not None else out


def run(t, z, x=None, *, c=0.0, a=1.0, portable=False, index=np.int32) -> np.ndarray:
    y = np.full((t.shape[0], z.shape[1]), np.nan, dtype=np.float32)
    _spmm.csr_spmm(
        t.indptr.astype(index), t.indices.astype(index), t.data, z, y, x,
        c=c, a=a, portable=portable,
    )  # fmt: skip
    return y


def assert_close(y: np.ndarray, ref: np.ndarray, t: sp.csr_matrix, z: np.ndarray) -> None:
    """Within float32 rounding: a few ulps of the row's sum of |terms|."""
    scale = (abs(t).astype(np.float64) @ abs(z).astype(np.float64)).max(initial=1.0)
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-6 * max(scale, 1.0))


def test_dispatch_reports_its_instruction_set() -> None:
    assert _spmm.isa in ("avx2", "portable")


@pytest.mark.parametrize("portable", PATHS)
@pytest.mark.parametrize("f", [1, 3, 8, 16, 17, 64])
@pytest.mark.parametrize("index", [np.int32, np.int64])
def test_matches_scipy_for_every_width(portable, f, index) -> None:
    t = random_csr(300, 250, 0.03, seed=f)
    rng = np.random.default_rng(f)
    z = rng.standard_normal((250, f), dtype=np.float32)
    x = rng.standard_normal((300, f), dtype=np.float32)
    assert_close(run(t, z, portable=portable, index=index), t @ z, t, z)
    y = run(t, z, x, c=0.7, a=-1.5, portable=portable, index=index)
    assert_close(y, expected(t, z, x, 0.7, -1.5), t, z)


@pytest.mark.parametrize("portable", PATHS)
def test_empty_rows_get_c_times_x(portable) -> None:
    t = sp.csr_matrix(
        (np.array([2.0, 3.0], np.float32), np.array([1, 0]), np.array([0, 0, 1, 1, 2, 2])),
        shape=(5, 2),
    )
    z = np.arange(2 * 17, dtype=np.float32).reshape(2, 17)
    x = np.ones((5, 17), np.float32)
    y = run(t, z, x, c=0.5, portable=portable)
    np.testing.assert_array_equal(y[[0, 2, 4]], 0.5)
    np.testing.assert_array_equal(y[1], 2.0 * z[1] + 0.5)
    np.testing.assert_array_equal(y[3], 3.0 * z[0] + 0.5)
    assert not np.isnan(run(t, z, portable=portable)).any()  # empty rows are written as 0


@pytest.mark.parametrize("portable", PATHS)
def test_single_node_and_empty_shapes(portable) -> None:
    t = sp.csr_matrix(np.array([[0.25]], np.float32))
    z = np.array([[4.0, -8.0, 2.0]], np.float32)
    np.testing.assert_array_equal(run(t, z, z.copy(), c=1.0, portable=portable), [[5, -10, 2.5]])
    assert run(random_csr(0, 3, 0.5, 1), np.ones((3, 4), np.float32)).shape == (0, 4)
    assert run(random_csr(4, 4, 0.5, 1), np.ones((4, 0), np.float32)).shape == (4, 0)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 40),
    m=st.integers(1, 40),
    f=st.integers(1, 40),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
    c=st.floats(-2.0, 2.0),
    a=st.floats(-2.0, 2.0),
    portable=st.booleans(),
)
def test_random_small_csr_match_scipy(n, m, f, density, seed, c, a, portable) -> None:
    t = random_csr(n, m, density, seed)
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((m, f), dtype=np.float32)
    x = rng.standard_normal((n, f), dtype=np.float32)
    assert_close(run(t, z, x, c=c, a=a, portable=portable), expected(t, z, x, c, a), t, z)


def call_args(**change):
    t = random_csr(6, 5, 0.5, seed=3)
    args = {
        "indptr": t.indptr.astype(np.int32),
        "indices": t.indices.astype(np.int32),
        "data": t.data,
        "z": np.ones((5, 4), np.float32),
        "y": np.empty((6, 4), np.float32),
        "x": np.ones((6, 4), np.float32),
    }
    args.update(change)
    return args


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"z": np.ones((5, 4))}, TypeError, "z must be float32"),
        ({"data": np.ones(3, np.float16)}, TypeError, "data must be float32"),
        ({"indices": np.zeros(3, np.uint32)}, TypeError, "indices must be int32 or int64"),
        ({"indptr": np.zeros(7, np.int64)}, TypeError, "same dtype"),
        ({"z": [[1.0]]}, TypeError, "z must be an array"),
        ({"y": np.empty((6, 3), np.float32)}, ValueError, "z has 4 columns but y has 3"),
        ({"y": np.empty((5, 4), np.float32)}, ValueError, "indptr must have len"),
        ({"x": np.ones((6, 5), np.float32)}, ValueError, "x must have the shape of y"),
        ({"z": np.ones(5, np.float32)}, ValueError, "z must be 2-dimensional"),
        ({"data": np.ones(2, np.float32)}, ValueError, "indices has"),
        ({"z": np.ones((4, 5), np.float32).T}, ValueError, "z must be a C-contiguous"),
        ({"indices": np.full(15, 9, np.int32)}, ValueError, "indices must lie in"),
        ({"indptr": np.array([0, 3, 2, 5, 6, 6, 6], np.int32)}, ValueError, "non-decreasing"),
    ],
)
def test_bad_arguments_raise_clearly(change, error, message) -> None:
    args = call_args(**change)
    if "indices" in change and change["indices"].dtype == np.int32:
        args["data"] = np.ones(len(change["indices"]), np.float32)
        args["indptr"] = np.array([0, 3, 6, 9, 12, 15, 15], np.int32)
    with pytest.raises(error, match=message):
        _spmm.csr_spmm(**args)


def test_output_must_be_writable_and_separate() -> None:
    args = call_args()
    args["y"].flags.writeable = False
    with pytest.raises(ValueError, match="y must be a C-contiguous, writable array"):
        _spmm.csr_spmm(**args)
    shared = np.ones((6, 4), np.float32)
    with pytest.raises(ValueError, match="must not share memory"):
        _spmm.csr_spmm(**call_args(z=shared[:5], y=shared))


def test_the_gil_is_released_during_the_product() -> None:
    """An agent's event loop keeps running while a worker thread diffuses."""
    n, per_row = 20_000, 16
    ip = np.arange(0, n * per_row + 1, per_row, dtype=np.int32)
    ix = np.random.default_rng(5).integers(0, n, n * per_row, dtype=np.int32)
    data = np.ones(n * per_row, np.float32)
    z = np.ones((n, 128), np.float32)
    y = np.empty_like(z)
    spins = spins_while(lambda: _spmm.csr_spmm(ip, ix, data, z, y))
    assert spins > 20  # with the GIL held the whole call, this thread would not run at all


@pytest.mark.parametrize("f", [1, 3, 16, 17])
@pytest.mark.parametrize("index", [np.int32, np.int64])
def test_take_rows_matches_numpy_take(f, index) -> None:
    rng = np.random.default_rng(f)
    src = rng.standard_normal((50, f), dtype=np.float32)
    rows = rng.integers(0, 50, 80).astype(index)
    out = np.empty((80, f), np.float32)
    _spmm.take_rows(src, rows, out)
    np.testing.assert_array_equal(out, np.take(src, rows, axis=0))


def test_take_rows_rejects_bad_rows_and_shapes() -> None:
    src = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match=r"rows\[1\] is outside \[0, 4\)"):
        _spmm.take_rows(src, np.array([0, 4], np.int32), np.empty((2, 3), np.float32))
    with pytest.raises(ValueError, match="out must have shape"):
        _spmm.take_rows(src, np.array([0, 1], np.int32), np.empty((2, 4), np.float32))
    with pytest.raises(TypeError, match="src must be float32"):
        _spmm.take_rows(src.astype(np.float64), np.zeros(2, np.int32), np.empty((2, 3), np.float32))
    with pytest.raises(ValueError, match="must not share memory"):
        _spmm.take_rows(src, np.zeros(2, np.int32), src[:2])


# --- the backend: compiled and scipy paths agree, and scipy is the fallback ----------------


def backend_problem(g, k: int, normalization: str = "sym"):
    method = Method(kind="ppr", alpha=0.15, k=k, normalization=normalization)
    return problem_for(graph_from_nx(g, method=method))


@pytest.mark.parametrize("k", [0, 1, 2, 10])
@pytest.mark.parametrize("f", [1, 16, 17])
@pytest.mark.parametrize(
    ("family", "n", "normalization"), [("geometric", 800, "sym"), ("directed", 150, "row")]
)
def test_backend_compiled_and_scipy_agree(family, n, normalization, k, f) -> None:
    g = (geometric if family == "geometric" else directed)(n, seed=n)
    problem = backend_problem(g, k, normalization)
    x = np.random.default_rng(k).standard_normal((problem.n, 2 * f))[:, ::2]  # a strided view
    compiled = SparseBackend(kernel="compiled").load(problem).run(x)
    scipy_ = SparseBackend(kernel="scipy").load(problem).run(x)
    assert compiled.z.dtype == scipy_.z.dtype == np.float32
    assert compiled.error_bound == scipy_.error_bound
    exact = diffuse(problem.t, problem.method, x)
    size = np.linalg.norm(exact)
    assert np.linalg.norm(compiled.z - scipy_.z) <= 2 * compiled.error_bound * size
    assert np.linalg.norm(compiled.z - exact) <= compiled.error_bound * size


def test_backend_kernel_choice() -> None:
    assert SparseBackend().compiled
    assert not SparseBackend(kernel="scipy").compiled
    with pytest.raises(ValueError, match="kernel must be one of auto, compiled, scipy"):
        SparseBackend(kernel="avx")


def test_without_the_extension_auto_uses_scipy_and_compiled_is_unavailable(monkeypatch):
    monkeypatch.setattr(sparse_backend, "_spmm", None)
    problem = backend_problem(geometric(200, seed=1), 10)
    x = np.random.default_rng(0).random((problem.n, 3))
    auto = SparseBackend()
    assert not auto.compiled
    auto.probe()
    z = auto.load(problem).run(x)
    assert np.linalg.norm(z.z - diffuse(problem.t, problem.method, x)) <= z.error_bound * (
        np.linalg.norm(z.z)
    )
    with pytest.raises(BackendUnavailable, match="not built"):
        SparseBackend(kernel="compiled").probe()
