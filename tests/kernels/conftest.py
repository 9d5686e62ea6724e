"""Shared helpers for the kernels tests: graph families as networkx graphs and as Graphs."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import networkx as nx
import numpy as np
import pytest

from dgdm.kernels.graph import Graph, build_adjacency
from dgdm.kernels.method import Method

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


def graph_from_nx(g: nx.Graph, x: np.ndarray | None = None, method: Method | None = None) -> Graph:
    """A Graph with the same nodes (0..N-1) and weighted edges as a networkx graph."""
    n = g.number_of_nodes()
    edges = list(g.edges(data="weight", default=1.0))
    rows = np.array([u for u, _, _ in edges], dtype=np.int64)
    cols = np.array([v for _, v, _ in edges], dtype=np.int64)
    weights = np.array([w for _, _, w in edges], dtype=np.float64)
    adjacency = build_adjacency(n, rows, cols, weights, directed=g.is_directed())
    x = np.zeros((n, 0)) if x is None else x
    return Graph(tuple(range(n)), adjacency, x, g.is_directed(), None, method or Method())


def weighted_er(n: int, seed: int) -> nx.Graph:
    g = nx.gnp_random_graph(n, min(1.0, 6.0 / n), seed=seed)
    rng = np.random.default_rng(seed)
    for u, v in g.edges():
        g[u][v]["weight"] = float(rng.uniform(0.1, 3.0))
    return g


def geometric(n: int, seed: int) -> nx.Graph:
    radius = float(np.sqrt(8.0 / (np.pi * n)))
    g = nx.random_geometric_graph(n, radius, seed=seed)
    return nx.convert_node_labels_to_integers(g)


def directed(n: int, seed: int) -> nx.DiGraph:
    g = nx.gnp_random_graph(n, min(1.0, 5.0 / n), seed=seed, directed=True)
    rng = np.random.default_rng(seed)
    for u, v in g.edges():
        g[u][v]["weight"] = float(rng.uniform(0.5, 2.0))
    return g


def spins_while(work: Callable[[], object], times: int = 3) -> int:
    """How often this thread ran while a worker thread called `work` `times` times: with the
    GIL held for the whole call, hardly at all."""
    started = threading.Event()

    def worker_loop() -> None:
        started.set()
        for _ in range(times):
            work()

    worker = threading.Thread(target=worker_loop)
    worker.start()
    started.wait()
    spins = 0
    while worker.is_alive():
        spins += 1
        time.sleep(0)
    worker.join()
    return spins


def karate(n: int = 34, seed: int = 0) -> nx.Graph:
    del n, seed  # one fixed graph; the signature matches the other families
    return nx.karate_club_graph()


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES
