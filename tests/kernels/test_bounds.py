"""Bounded diffusions in the kernels (issue 20): the iterative exact ppr solve (residual,
against a direct solve), deadlines that stop it, the memory estimate that refuses a call
before any work, and the byte bound of the engine's caches."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import scipy.sparse as sp

from dgdm.kernels.backends.numpy_backend import NumpyBackend
from dgdm.kernels.backends.sparse_backend import SparseBackend
from dgdm.kernels.costs import runner_bytes
from dgdm.kernels.deadline import Deadline, applied
from dgdm.kernels.diffusion import PPR_RTOL, PprSolver
from dgdm.kernels.engine import Engine, EngineBounds
from dgdm.kernels.errors import DeadlineExceeded, GraphError
from dgdm.kernels.method import Method
from dgdm.kernels.operator import normalized_operator

from .conftest import directed, geometric, graph_from_nx, weighted_er


@pytest.mark.parametrize("normalization", ["sym", "col", "row"])
@pytest.mark.parametrize(("family", "alpha"), [(weighted_er, 0.15), (directed, 0.05)])
def test_exact_ppr_solves_to_its_residual(family, alpha, normalization) -> None:
    graph = graph_from_nx(family(300, seed=3))
    t = normalized_operator(graph.adjacency, Method(normalization=normalization))
    x = np.random.default_rng(0).random((300, 5))
    x[:, 2] = 0.0  # a zero column stays zero
    z = PprSolver(t, alpha).solve(x)
    system = sp.identity(300) - (1 - alpha) * t
    residual = np.linalg.norm(alpha * x - system @ z, axis=0)
    assert (residual <= PPR_RTOL * np.linalg.norm(alpha * x, axis=0)).all()
    direct = alpha * np.linalg.solve(system.toarray(), x)
    assert np.linalg.norm(z - direct) <= 1e-8 * np.linalg.norm(direct)


def features(n: int) -> np.ndarray:
    return np.random.default_rng(n).random((n, 1))


def big_directed_operator(n: int = 20_000) -> sp.csr_matrix:
    rng = np.random.default_rng(1)
    rows, cols = rng.integers(0, n, (2, 5 * n))
    a = sp.csr_matrix((np.ones(5 * n), (rows, cols)), shape=(n, n))
    return normalized_operator(a, Method(normalization="row"))


def test_a_deadline_stops_the_solve_between_products() -> None:
    t = big_directed_operator()
    x = np.random.default_rng(2).random((t.shape[0], 2))
    solver = PprSolver(t, 0.0005)  # ~46,000 products: minutes without the deadline
    start = time.monotonic()
    with applied(Deadline(0.2)), pytest.raises(DeadlineExceeded, match=r"deadline of 0\.2 s"):
        solver.solve(x)
    assert time.monotonic() - start < 2.0
    deadline = Deadline(60.0)  # stopped from another thread, as the agent does on SIGTERM
    threading.Timer(0.2, deadline.stop, ("shutting down",)).start()
    with applied(deadline), pytest.raises(DeadlineExceeded, match="shutting down"):
        solver.solve(x)


def test_a_deadline_is_not_a_backend_failure() -> None:
    graph = graph_from_nx(geometric(2000, seed=4), features(2000), Method(k=1000))
    engine = Engine(backends=[SparseBackend()])
    with applied(Deadline(0.0)), pytest.raises(DeadlineExceeded):
        engine.diffuse(graph)
    assert engine.backends_status()[0]["failures"] == 0
    assert engine.backends_status()[0]["healthy"]


def test_a_call_over_the_memory_bound_is_refused_before_any_work() -> None:
    graph = graph_from_nx(geometric(2000, seed=5), features(2000))
    tight = Engine(backends=[NumpyBackend()], bounds=EngineBounds(max_diffusion_bytes=10 << 20))
    with pytest.raises(GraphError, match=r"kernels\.max_diffusion_bytes") as refused:
        tight.diffuse(graph)
    assert refused.value.code == "too_large"
    both = Engine(backends=[NumpyBackend(), SparseBackend()], bounds=tight.bounds)
    assert both.diffuse(graph).backend == "sparse"  # the dense build is over, CSR fits


def test_the_caches_are_bounded_by_bytes() -> None:
    budget = 2 << 20
    engine = Engine(backends=[NumpyBackend()], bounds=EngineBounds(cache_bytes=budget))
    method = Method(k=3)
    graphs = [graph_from_nx(weighted_er(400, seed=s), features(400), method) for s in range(12)]
    for graph in graphs:
        engine.diffuse(graph)
    held = sum(entry.nbytes for entry in engine._runners.values())
    assert 0 < held <= budget
    per_runner = runner_bytes("numpy", engine._problem(graphs[-1])[0])
    # the operators share the budget: a little less than budget // per_runner runners
    assert 1 < len(engine._runners) <= budget // per_runner
    assert engine.diffuse(graphs[0]).embedding.shape == (400, 1)  # rebuilt on demand
