"""The fused wavefront series `_spmm.csr_series` (all Horner steps in one pass, rows split
over threads) against float64 Horner with scipy, and the sparse backend that uses it."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from dgdm.kernels import threads as kernel_threads
from dgdm.kernels.backends import sparse_backend
from dgdm.kernels.backends.sparse_backend import SeriesRunner, SparseBackend
from dgdm.kernels.diffusion import diffuse, series_coefficients
from dgdm.kernels.method import Method
from dgdm.kernels.operator import problem_for

from .conftest import geometric, graph_from_nx, spins_while

_spmm = pytest.importorskip(
    "dgdm.kernels._spmm", reason="the optional C extension is not built (no compiler?)"
)


def banded(n: int, band: int, density: float, seed: int) -> sp.csr_matrix:
    """A random float32 CSR whose entries all lie within `band` of the diagonal."""
    rng = np.random.default_rng(seed)
    count = int(density * n * (2 * band + 1)) + 1
    rows = rng.integers(0, n, count)
    cols = np.clip(rows + rng.integers(-band, band + 1, count), 0, n - 1)
    t = sp.csr_matrix(
        (rng.standard_normal(count).astype(np.float32) / 4, (rows, cols)), shape=(n, n)
    )
    t.sum_duplicates()
    t.sort_indices()
    return t


def horner64(t: sp.csr_matrix, coeffs: np.ndarray, x: np.ndarray) -> np.ndarray:
    t64, x64 = t.astype(np.float64), x.astype(np.float64)
    z = coeffs[-1] * x64
    for c in coeffs[-2::-1]:
        z = t64 @ z + c * x64
    return z


ISAS = _spmm.series_isas.split()


def compact(t: sp.csr_matrix, seed: int) -> tuple[sp.csr_matrix, np.ndarray]:
    """T's pattern with T_ij = s_i s_j (some s_i = 0: isolated nodes), and s."""
    rng = np.random.default_rng(seed)
    scale = rng.random(t.shape[0]).astype(np.float32)
    scale[rng.random(t.shape[0]) < 0.05] = 0
    rows = np.repeat(np.arange(t.shape[0]), np.diff(t.indptr))
    values = scale[rows].astype(np.float64) * scale[t.indices]
    return sp.csr_matrix((values, t.indices, t.indptr), shape=t.shape), scale


def series(t, coeffs, x, *, band, chunk=64, threads=1, scatter=None, isa=None, scale=None):
    """The series of T, or with `scale` of the compact diag(scale) pattern(T) diag(scale)."""
    out = np.full_like(x, np.nan)
    _spmm.csr_series(
        t.indptr.astype(np.int32), t.indices.astype(np.int32),
        None if scale is not None else t.data, np.asarray(coeffs, dtype=np.float32), x, out,
        band=band, chunk=chunk, threads=threads, scatter=scatter, isa=isa, scale=scale,
    )  # fmt: skip
    return out


def assert_close(out, ref, t, coeffs, x) -> None:
    """Within float32 rounding of the same series on |T|, |c| and |x|."""
    scale = horner64(abs(t), abs(np.asarray(coeffs, dtype=np.float64)), abs(x)).max(initial=1)
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-6 * max(scale, 1.0))


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 300),
    f=st.integers(1, 40),
    band_frac=st.floats(0.0, 1.0),
    k=st.integers(1, 12),
    chunk=st.sampled_from([1, 3, 16, 64, 1000]),
    threads=st.integers(1, 4),
    isa=st.sampled_from(ISAS),
    permuted=st.booleans(),
    seed=st.integers(0, 2**16),
)
@pytest.mark.parametrize("compact_operator", [False, True])
def test_matches_float64_horner(
    compact_operator, n, f, band_frac, k, chunk, threads, isa, permuted, seed
):
    band = int(band_frac * (n - 1))
    t, scale = banded(n, band, 0.3, seed), None
    if compact_operator:
        t, scale = compact(t, seed)
    rng = np.random.default_rng(seed + 1)
    coeffs = rng.standard_normal(k + 1)
    x = rng.standard_normal((n, f)).astype(np.float32)
    perm = rng.permutation(n).astype(np.int32) if permuted else None
    out = series(
        t, coeffs, x, band=band, chunk=chunk, threads=threads, scatter=perm, isa=isa, scale=scale
    )
    ref = horner64(t, coeffs.astype(np.float32).astype(np.float64), x)
    if perm is not None:
        unscattered = np.empty_like(ref)
        unscattered[perm] = ref
        ref = unscattered
    assert_close(out, ref, t, coeffs, x)


def test_the_best_isa_is_the_default() -> None:
    assert ISAS[0] == "portable"
    t = banded(500, 5, 0.3, seed=0)
    x = np.random.default_rng(0).standard_normal((500, 20)).astype(np.float32)
    np.testing.assert_array_equal(
        series(t, [1, 2], x, band=5), series(t, [1, 2], x, band=5, isa=ISAS[-1])
    )


@pytest.mark.parametrize("compact_operator", [False, True])
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("f", [16, 64, 5])
def test_threads_give_the_single_thread_result(threads, f, isa, compact_operator) -> None:
    """Parts recompute their halo rows with the same arithmetic: bit for bit equal."""
    t, scale = banded(20_000, 40, 0.1, seed=f), None
    if compact_operator:
        t, scale = compact(t, seed=f)
    x = np.random.default_rng(f).standard_normal((20_000, f)).astype(np.float32)
    coeffs = 0.15 * 0.85 ** np.arange(11)
    one = series(t, coeffs, x, band=40, isa=isa, scale=scale)
    np.testing.assert_array_equal(
        series(t, coeffs, x, band=40, threads=threads, isa=isa, scale=scale), one
    )
    assert_close(one, horner64(t, coeffs.astype(np.float32), x), t, coeffs, x)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("f", [16, 32, 8, 5])
def test_scattered_rows_on_a_cache_line_are_the_same(f, isa) -> None:
    """The last step streams its scattered rows when `out` starts on a cache line."""
    t, scale = compact(banded(3_000, 20, 0.2, seed=f), seed=f)
    x = np.random.default_rng(f).standard_normal((3_000, f)).astype(np.float32)
    perm = np.random.default_rng(f + 1).permutation(3_000).astype(np.int32)
    coeffs = 0.15 * 0.85 ** np.arange(11)
    ip, ix = t.indptr.astype(np.int32), t.indices.astype(np.int32)
    c32 = coeffs.astype(np.float32)
    outs = []
    for offset in (0, 1):  # floats past a cache line: 0 streams (f % 8 == 0), 1 cannot
        out = sparse_backend._aligned_empty((3_000 * f + 1, 1))[offset:][: 3_000 * f]
        out = out.reshape(3_000, f)
        _spmm.csr_series(ip, ix, None, c32, x, out, band=20, scatter=perm, scale=scale, isa=isa)
        outs.append(out.copy())
    np.testing.assert_array_equal(outs[0], outs[1])
    assert_close(outs[0][perm], horner64(t, c32, x), t, coeffs, x)


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"band": 1}, ValueError, "more than band = 1"),
        ({"band": -1}, ValueError, "band must be >= 0"),
        ({"chunk": 0}, ValueError, "chunk >= 1"),
        ({"threads": 0}, ValueError, "threads in"),
        ({"threads": 65}, ValueError, "threads in"),
        ({"isa": "sse9"}, ValueError, "isa sse9 is not one of this CPU's: portable"),
        ({"coeffs": np.ones(1, np.float32)}, ValueError, "at least 2 values"),
        ({"coeffs": np.ones(3)}, TypeError, "coeffs must be float32"),
        ({"indices": np.array([0, 5], np.int32)}, ValueError, "indices must lie in"),
        ({"indices": np.array([0, 1], np.int64)}, TypeError, "indices must be int32"),
        ({"indptr": np.array([0, 2, 1, 2], np.int32)}, ValueError, "non-decreasing"),
        ({"scatter": np.array([0, 1, 3], np.int32)}, ValueError, r"scatter\[2\] is outside"),
        ({"scatter": np.array([0, 1], np.int32)}, ValueError, "scatter must have 3 entries"),
        ({"x": np.ones((2, 2), np.float32)}, ValueError, "x must have the shape of out"),
        ({"scale": np.ones(3, np.float32)}, TypeError, "give data .* or scale .*, not both"),
        ({"data": None}, TypeError, "give data .* or scale .*, not both"),
        ({"data": None, "scale": np.ones(2, np.float32)}, ValueError, "scale must have 3"),
        ({"data": None, "scale": np.ones(3)}, TypeError, "scale must be float32"),
    ],
)
def test_bad_arguments_raise_clearly(change, error, message) -> None:
    args = {
        "indptr": np.array([0, 1, 1, 2], np.int32),
        "indices": np.array([2, 1], np.int32),  # row 0 -> column 2: two from the diagonal
        "data": np.ones(2, np.float32),
        "coeffs": np.ones(3, np.float32),
        "x": np.ones((3, 2), np.float32),
        "out": np.zeros((3, 2), np.float32),
        "band": 2,
    }
    args.update(change)
    positional = [args.pop(k) for k in ("indptr", "indices", "data", "coeffs", "x", "out")]
    with pytest.raises(error, match=message):
        _spmm.csr_series(*positional, **args)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(("column", "message"), [(60, "indices must lie in"), (9, "more than")])
def test_a_bad_entry_deep_in_a_long_row_is_refused(isa, column, message) -> None:
    """Row 30 of 60 has 40 entries, columns 10..49 within band 20 (the AVX-512 check takes 16
    at a time); its 37th is put out of range (60) or 21 rows from the diagonal (9)."""
    indptr = np.zeros(61, np.int32)
    indptr[31:] = 40
    indices = np.arange(10, 50, dtype=np.int32)
    indices[36] = column
    x = np.ones((60, 3), np.float32)
    with pytest.raises(ValueError, match=message):
        _spmm.csr_series(
            indptr, indices, np.ones(40, np.float32), np.ones(3, np.float32), x,
            np.zeros_like(x), band=20, isa=isa,
        )  # fmt: skip


def test_the_gil_is_released_during_the_series() -> None:
    """An agent's event loop keeps running while a worker thread diffuses."""
    t = banded(20_000, 30, 0.2, seed=9)
    x = np.ones((20_000, 64), np.float32)
    spins = spins_while(lambda: series(t, np.ones(11), x, band=30))
    assert spins > 20  # with the GIL held the whole call, this thread would not run at all


def test_out_must_not_share_memory_with_x() -> None:
    x = np.ones((3, 2), np.float32)
    ip, ix = np.array([0, 0, 0, 0], np.int32), np.zeros(0, np.int32)
    with pytest.raises(ValueError, match="out must not share memory with x"):
        _spmm.csr_series(ip, ix, np.zeros(0, np.float32), np.ones(2, np.float32), x, x, band=0)


# --- the backend ----------------------------------------------------------------------------


def grid_problem(side: int, k: int = 10):
    import networkx as nx

    g = nx.convert_node_labels_to_integers(nx.grid_2d_graph(side, side))
    method = Method(kind="ppr", alpha=0.15, k=k)
    return problem_for(graph_from_nx(g, method=method))


@pytest.mark.parametrize("threads", [1, 2])
def test_backend_fuses_large_banded_graphs_and_threads_them(monkeypatch, threads) -> None:
    problem = grid_problem(110)  # 12,100 nodes, band ~110 after reverse Cuthill-McKee
    monkeypatch.setattr(kernel_threads, "_configured", threads)
    runner = SparseBackend().load(problem)
    assert isinstance(runner, SeriesRunner)
    assert runner._fused
    assert runner.threads() == threads
    x = np.random.default_rng(0).random((problem.n, 16))
    got = runner.run(x)
    exact = diffuse(problem.t, problem.method, x)
    assert np.linalg.norm(got.z - exact) <= got.error_bound * np.linalg.norm(exact)


def test_backend_stores_sym_unweighted_operators_compactly() -> None:
    """Pattern + scale for T = D^-1/2 (A + I) D^-1/2 of an unweighted graph; values else."""
    unweighted = grid_problem(40)
    runner = SparseBackend().load(unweighted)
    assert isinstance(runner, SeriesRunner)
    assert runner._scale is not None
    assert runner._series_csr[2] is None
    x = np.random.default_rng(0).random((unweighted.n, 16))
    got = runner.run(x)
    exact = diffuse(unweighted.t, unweighted.method, x)
    assert np.linalg.norm(got.z - exact) <= got.error_bound * np.linalg.norm(exact)
    coeffs = series_coefficients(unweighted.method)
    assert coeffs is not None
    values = SeriesRunner(unweighted.t, coeffs, reorder=True, compiled=True, compact=False)
    assert values._scale is None
    assert values.run(x).error_bound == got.error_bound
    weighted = unweighted.t.copy()
    weighted.data *= np.random.default_rng(1).uniform(0.5, 1.5, weighted.nnz)
    assert sparse_backend._pattern_scale(weighted) is None
    no_loops = unweighted.t - sp.diags(unweighted.t.diagonal())
    assert sparse_backend._pattern_scale(sp.csr_matrix(no_loops)) is None


def test_a_fused_runner_keeps_only_what_its_pass_reads() -> None:
    """The compact operator holds 4 bytes an entry (the pattern; S is per node), the values
    one 8, with one int32 permutation: T's float32 copy and the step path's arrays go."""
    problem = grid_problem(40)
    coeffs = series_coefficients(problem.method)
    assert coeffs is not None
    for compact_operator, per_entry in ((True, 4), (False, 8)):
        runner = SeriesRunner(problem.t, coeffs, reorder=True, compiled=True,
                              compact=compact_operator)  # fmt: skip
        held = {id(a): a.nbytes for a in vars(runner).values() if isinstance(a, np.ndarray)}
        held |= {id(a): a.nbytes for a in runner._series_csr if a is not None}
        nnz, n = problem.t.nnz, problem.n
        assert runner._t is None
        assert sum(held.values()) <= per_entry * (nnz + 2 * n) + 3 * 4 * n + 64
        x = np.random.default_rng(2).random((n, 8))
        exact = diffuse(problem.t, problem.method, x)
        got = runner.run(x)
        assert np.linalg.norm(got.z - exact) <= got.error_bound * np.linalg.norm(exact)


def test_backend_keeps_small_graphs_on_one_thread_and_wide_bands_step_by_step(monkeypatch):
    monkeypatch.setattr(kernel_threads, "_configured", 8)
    method = Method(kind="ppr", alpha=0.15, k=10)
    small = SparseBackend().load(problem_for(graph_from_nx(geometric(500, seed=2), method=method)))
    assert isinstance(small, SeriesRunner)
    assert small.threads() == 1
    problem = grid_problem(30)
    coeffs = series_coefficients(problem.method)
    assert coeffs is not None
    # a random order leaves no narrow band: one product per step, same answer
    shuffle = np.random.default_rng(0).permutation
    monkeypatch.setattr(sparse_backend, "_rcm", lambda t: shuffle(t.shape[0]))
    wide = SeriesRunner(problem.t, coeffs, reorder=True, compiled=True)
    assert not wide._fused
    x = np.random.default_rng(1).random((problem.n, 3))
    exact = diffuse(problem.t, problem.method, x)
    got = wide.run(x)
    assert np.linalg.norm(got.z - exact) <= got.error_bound * np.linalg.norm(exact)


def test_padded_rows_hold_the_same_matrix() -> None:
    t = banded(300, 7, 0.2, seed=3)
    indptr, indices, data = sparse_backend._pad_rows(
        t.indptr.astype(np.int32), t.indices.astype(np.int32), t.data, 2
    )
    assert (np.diff(indptr) % 2 == 0).all()
    padded = sp.csr_matrix((data, indices, indptr), shape=t.shape)
    assert abs(padded - t).max() == 0
    assert padded.nnz - t.nnz == (np.diff(t.indptr) % 2).sum()


def test_threads_setting(monkeypatch) -> None:
    monkeypatch.setattr(kernel_threads, "_configured", 0)
    assert kernel_threads.count() == kernel_threads.available() >= 1
    kernel_threads.configure(3)
    assert kernel_threads.count() == 3
    with pytest.raises(ValueError, match="threads must be >= 0"):
        kernel_threads.configure(-1)


def test_kernels_threads_is_a_config_key() -> None:
    from dgdm.agent.config import load_config
    from dgdm.sync.errors import ConfigError

    assert load_config(None, env={}).kernels.threads == 0
    assert load_config(None, env={"DGDM__KERNELS__THREADS": "2"}).kernels.threads == 2
    with pytest.raises(ConfigError, match=r"kernels\.threads"):
        load_config(None, env={"DGDM__KERNELS__THREADS": "-1"})
