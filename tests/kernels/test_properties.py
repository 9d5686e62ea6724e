"""Hypothesis properties of the kernels: linearity in X and permutation equivariance."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from dgdm.kernels.backends.numpy_backend import NumpyBackend
from dgdm.kernels.backends.sparse_backend import SparseBackend
from dgdm.kernels.diffusion import diffuse
from dgdm.kernels.graph import Graph, build_adjacency
from dgdm.kernels.method import Method
from dgdm.kernels.operator import problem_for

methods = st.one_of(
    st.builds(
        Method,
        kind=st.just("ppr"),
        alpha=st.floats(0.05, 1.0),
        k=st.none() | st.integers(0, 12),
        normalization=st.sampled_from(["sym", "col", "row"]),
        self_loops=st.booleans(),
    ),
    st.builds(
        Method,
        kind=st.just("heat"),
        t=st.floats(0.0, 6.0),
        k=st.none() | st.integers(0, 12),
        normalization=st.sampled_from(["sym", "col", "row"]),
    ),
    st.builds(
        Method,
        kind=st.just("poly"),
        coefficients=st.lists(st.floats(-2, 2), min_size=1, max_size=5).map(tuple),
        normalization=st.sampled_from(["sym", "col", "row"]),
    ),
)


@st.composite
def graphs(draw) -> Graph:
    n = draw(st.integers(1, 14))
    m = draw(st.integers(0, 3 * n))
    ends = st.integers(0, n - 1)
    rows = np.array(draw(st.lists(ends, min_size=m, max_size=m)), dtype=np.int64)
    cols = np.array(draw(st.lists(ends, min_size=m, max_size=m)), dtype=np.int64)
    weights = np.array(draw(st.lists(st.floats(0.01, 10.0), min_size=m, max_size=m)))
    is_directed = draw(st.booleans())
    adjacency = build_adjacency(n, rows, cols, weights, directed=is_directed)
    x = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).normal(size=(n, 3))
    return Graph(tuple(range(n)), adjacency, x, is_directed, None, draw(methods))


def close(a: np.ndarray, b: np.ndarray, tol: float) -> bool:
    scale = max(float(np.abs(a).max(initial=0.0)), float(np.abs(b).max(initial=0.0)), 1.0)
    return float(np.abs(a - b).max(initial=0.0)) <= tol * scale


@settings(max_examples=80, deadline=None)
@given(graph=graphs(), a=st.floats(-3, 3), b=st.floats(-3, 3))
def test_linear_in_x(graph: Graph, a: float, b: float) -> None:
    problem = problem_for(graph)
    y = np.cos(np.arange(graph.x.size, dtype=np.float64)).reshape(graph.x.shape)
    combined = diffuse(problem.t, problem.method, a * graph.x + b * y)
    separate = a * diffuse(problem.t, problem.method, graph.x) + b * diffuse(
        problem.t, problem.method, y
    )
    assert close(combined, separate, 1e-9)
    runner = SparseBackend().load(problem)
    assert close(runner.run(a * graph.x + b * y).z, combined, 1e-4)


@settings(max_examples=80, deadline=None)
@given(graph=graphs(), seed=st.integers(0, 1000))
def test_permutation_equivariant(graph: Graph, seed: int) -> None:
    """Relabelling the nodes by a permutation permutes the rows of Z the same way."""
    perm = np.random.default_rng(seed).permutation(graph.n)
    permuted = Graph(
        graph.node_ids,
        graph.adjacency[perm][:, perm].tocsr(),
        graph.x[perm],
        graph.directed,
        None,
        graph.method,
    )
    z = diffuse(problem_for(graph).t, graph.method, graph.x)
    zp = diffuse(problem_for(permuted).t, graph.method, permuted.x)
    assert close(zp, z[perm], 1e-9)
    dense = NumpyBackend(dtype=np.float64).load(problem_for(permuted)).run(permuted.x).z
    assert close(dense, z[perm], 1e-8)
