"""SPEC §2 oracles: networkx.pagerank and scipy's expm_multiply, and truncated series
against independent closed forms, on several graph families and sizes 10..2000."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
import scipy.sparse as sp
from scipy.sparse.linalg import expm_multiply

from dgdm.kernels.backends.numpy_backend import NumpyBackend
from dgdm.kernels.backends.sparse_backend import SparseBackend
from dgdm.kernels.diffusion import PPR_RTOL, diffuse, series_coefficients
from dgdm.kernels.method import Method
from dgdm.kernels.operator import normalized_operator, problem_for

from .conftest import directed, geometric, graph_from_nx, karate, weighted_er

FAMILIES = {"er": weighted_er, "geometric": geometric, "directed": directed, "karate": karate}
CASES = [
    ("karate", 34, None),
    ("er", 10, None),
    ("er", 200, 4),
    ("geometric", 60, 6),
    ("geometric", 2000, 2),
    ("directed", 30, None),
    ("directed", 500, 3),
    ("er", 2000, 2),
]


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def pagerank_column(g: nx.Graph, alpha: float, source: int) -> np.ndarray:
    h = g.copy()
    h.add_edges_from((v, v, {"weight": 1.0}) for v in h.nodes)
    pr = nx.pagerank(h, alpha=1 - alpha, personalization={source: 1}, tol=1e-12)
    return np.array([pr[v] for v in range(h.number_of_nodes())])


@pytest.mark.parametrize(("family", "n", "sources"), CASES)
@pytest.mark.parametrize("backend", ["reference", "sparse", "numpy64"])
def test_ppr_col_matches_networkx_pagerank(family, n, sources, backend) -> None:
    g = FAMILIES[family](n, seed=n)
    n = g.number_of_nodes()
    alpha = 0.15 if n % 2 else 0.3
    graph = graph_from_nx(g, method=Method(kind="ppr", alpha=alpha, normalization="col"))
    picked = range(n) if sources is None else np.random.default_rng(n).choice(n, sources)
    x = np.zeros((n, len(picked)))
    x[list(picked), range(len(picked))] = 1.0  # columns of X = I
    problem = problem_for(graph)
    if backend == "reference":
        z = diffuse(problem.t, problem.method, x)
    elif backend == "sparse":
        z = SparseBackend().load(problem).run(x).z
    else:
        z = NumpyBackend(dtype=np.float64).load(problem).run(x).z
    for col, source in enumerate(picked):
        assert rel(z[:, col], pagerank_column(g, alpha, int(source))) <= 1e-6


@pytest.mark.parametrize(("family", "n"), [("karate", 34), ("er", 300), ("directed", 200)])
@pytest.mark.parametrize("normalization", ["sym", "col", "row"])
@pytest.mark.parametrize("backend", ["sparse", "numpy64"])
def test_heat_matches_expm_multiply(family, n, normalization, backend) -> None:
    g = FAMILIES[family](n, seed=7)
    method = Method(kind="heat", t=3.0, normalization=normalization)
    problem = problem_for(graph_from_nx(g, method=method))
    x = np.random.default_rng(1).normal(size=(g.number_of_nodes(), 5))
    generator = 3.0 * (problem.t - sp.identity(problem.n))
    expected = expm_multiply(generator.tocsr(), x)
    be = SparseBackend() if backend == "sparse" else NumpyBackend(dtype=np.float64)
    assert rel(be.load(problem).run(x).z, expected) <= 1e-6


@pytest.mark.parametrize("normalization", ["sym", "col", "row"])
@pytest.mark.parametrize("k", [0, 1, 7, 25])
def test_truncated_ppr_is_exact_minus_its_tail(normalization, k) -> None:
    """sum_{j<=k} a c^j T^j X = Z - c^{k+1} T^{k+1} Z with Z the exact solve."""
    g = weighted_er(150, seed=k)
    alpha = 0.2
    exact = problem_for(graph_from_nx(g, method=Method(alpha=alpha, normalization=normalization)))
    x = np.random.default_rng(k).random((150, 4))
    z = diffuse(exact.t, exact.method, x)
    tail = z
    for _ in range(k + 1):
        tail = exact.t @ tail
    closed = z - (1 - alpha) ** (k + 1) * tail
    truncated = Method(alpha=alpha, normalization=normalization, k=k)
    assert rel(diffuse(exact.t, truncated, x), closed) <= 1e-10


@pytest.mark.parametrize(
    "method",
    [
        Method(kind="heat", t=2.0, k=6),
        Method(kind="heat", t=0.0, k=3),
        Method(kind="poly", coefficients=(0.5, -0.25, 2.0, 0.125)),
        Method(kind="ppr", alpha=0.5, k=4),
    ],
)
def test_series_match_the_eigen_decomposition(method) -> None:
    """For sym T = V diag(l) V^T, a polynomial of T is V diag(p(l)) V^T."""
    g = geometric(120, seed=3)
    problem = problem_for(graph_from_nx(g, method=method))
    lam, v = np.linalg.eigh(problem.t.toarray())
    coeffs = series_coefficients(method)
    p = sum(c * lam**j for j, c in enumerate(coeffs))
    x = np.random.default_rng(2).normal(size=(120, 3))
    expected = v @ (p[:, None] * (v.T @ x))
    assert rel(diffuse(problem.t, method, x), expected) <= 1e-9


def test_long_heat_series_converges_to_the_exact_action() -> None:
    problem = problem_for(graph_from_nx(karate(), method=Method(kind="heat", t=4.0, k=60)))
    x = np.random.default_rng(0).random((34, 2))
    exact = diffuse(problem.t, Method(kind="heat", t=4.0), x)
    assert rel(diffuse(problem.t, problem.method, x), exact) <= 1e-12


def test_isolated_node_keeps_zero_rows_without_self_loops() -> None:
    g = nx.Graph()
    g.add_nodes_from(range(3))
    g.add_edge(0, 1)
    for norm in ("sym", "col", "row"):
        method = Method(normalization=norm, self_loops=False)
        t = normalized_operator(graph_from_nx(g).adjacency, method).toarray()
        assert np.all(t[2] == 0)
        assert np.all(t[:, 2] == 0)
        assert np.isfinite(t).all()


@pytest.mark.parametrize(
    "method",
    [
        Method(kind="ppr"),
        Method(kind="ppr", k=10, normalization="col"),
        Method(kind="heat", t=2.0, normalization="row"),
        Method(kind="heat", t=2.0, k=12),
        Method(kind="poly", coefficients=(0.2, 0.3, 0.5)),
    ],
)
@pytest.mark.parametrize(
    "backend", [NumpyBackend(), NumpyBackend(dtype=np.float64), SparseBackend()]
)
def test_backends_within_their_reported_bound(method, backend) -> None:
    problem = problem_for(graph_from_nx(geometric(400, seed=5), method=method))
    x = np.random.default_rng(0).random((400, 16))
    expected = diffuse(problem.t, method, x)
    out = backend.load(problem).run(x)
    assert out.z.shape == (400, 16)
    # exact ppr: the reference is solved to a relative residual of PPR_RTOL, not to float64
    solved = PPR_RTOL * 20 if method.kind == "ppr" and method.k is None else 1e-12
    assert rel(out.z, expected) <= max(out.error_bound, solved)
    assert out.error_bound < 1e-4


@pytest.mark.parametrize("time", [5e-324, 1e-300, 1e-20])
def test_exact_heat_at_a_vanishing_time_is_the_identity(time: float) -> None:
    # Found by hypothesis on Python 3.13: scipy's expm_multiply divided 0 by 0 here.
    from dgdm.kernels.diffusion import exact_heat

    t = sp.csr_matrix(np.array([[0.0, 1.0], [1.0, 0.0]]))
    x = np.array([[1.0, 0.0], [0.0, 0.0]])
    np.testing.assert_allclose(exact_heat(t, time, x), x, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(exact_heat(t, time, np.zeros((2, 1))), np.zeros((2, 1)))
