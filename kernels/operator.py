"""The normalised operator T of SPEC §2 and the `Problem` a backend is handed.

T is built once per topology + method from the validated adjacency; the problem key is a
hash of exactly the inputs T and the method depend on, so caches keyed by it are safe.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import scipy.sparse as sp

from dgdm.kernels.backends.base import Problem
from dgdm.kernels.graph import Graph, topology_hash
from dgdm.kernels.method import Method


def normalized_operator(adjacency: sp.spmatrix, method: Method) -> sp.csr_matrix:
    """T (CSR float64) from A: self loops added when asked, then sym / col / row.

    d is the row sums (out-degrees) of A including the self loops; a node of degree 0 keeps
    a zero row and column.
    """
    a = sp.csr_matrix(adjacency, dtype=np.float64, copy=True)
    if method.self_loops:
        a = (a + sp.identity(a.shape[0], dtype=np.float64, format="csr")).tocsr()
    degree = np.asarray(a.sum(axis=1)).ravel()
    if method.normalization == "sym":
        scale = _safe_power(degree, -0.5)
        t = sp.diags(scale) @ a @ sp.diags(scale)
    elif method.normalization == "col":
        t = a.T @ sp.diags(_safe_power(degree, -1.0))
    else:
        t = sp.diags(_safe_power(degree, -1.0)) @ a
    t = sp.csr_matrix(t)
    t.sum_duplicates()
    t.sort_indices()
    return t


def _safe_power(degree: np.ndarray, exponent: float) -> np.ndarray:
    out = np.zeros_like(degree)
    positive = degree > 0
    out[positive] = degree[positive] ** exponent
    return out


def problem_key(adjacency: sp.csr_matrix, method: Method) -> str:
    """A stable hash of topology (canonical CSR of A) + method."""
    digest = topology_hash(adjacency)
    digest.update(_method_bytes(method))
    return digest.hexdigest()


@functools.lru_cache(maxsize=256)
def _method_bytes(method: Method) -> bytes:
    """A method's canonical JSON; a request usually names one of very few methods."""
    return json.dumps(method.to_json(), sort_keys=True).encode()


def problem_for(graph: Graph, method: Method | None = None, key: str | None = None) -> Problem:
    """The Problem (key, T, method) of a validated graph, with its own or another method
    (`key` when the caller has already hashed it)."""
    method = method or graph.method
    return Problem(
        key or problem_key(graph.adjacency, method),
        normalized_operator(graph.adjacency, method),
        method,
    )
