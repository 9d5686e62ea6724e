"""Edge deltas (SPEC: add, remove, reweight a registered topology's edges) applied to a
canonical adjacency; each edge is checked by `graph.py`'s own edge checks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from dgdm.kernels.errors import GraphError
from dgdm.kernels.graph import NodeId, build_adjacency, check_edge_keys, edge_endpoint, parse_weight


def _edge(item: Any, field: str, index: Mapping[NodeId, int]) -> tuple[int, int, Any]:
    """(source row, target row, weight or None) from {"source","target","weight"} or a tuple."""
    if isinstance(item, Mapping):
        check_edge_keys(item, field)
        parts = (item.get("source"), item.get("target"), item.get("weight"))
    elif isinstance(item, list | tuple) and len(item) in (2, 3):
        parts = (item[0], item[1], item[2] if len(item) == 3 else None)
    else:
        raise GraphError(field, "must be an edge object or [source, target, weight?]")
    source = edge_endpoint(parts[0], index, f"{field}.source")
    target = edge_endpoint(parts[1], index, f"{field}.target")
    return source, target, parts[2]


def apply_edge_deltas(
    adjacency: sp.csr_matrix,
    *,
    directed: bool,
    index: Mapping[NodeId, int],
    add: Sequence[Any],
    remove: Sequence[Any],
    reweight: Sequence[Any],
) -> sp.csr_matrix:
    """A new canonical A: remove, then reweight (set), then add (duplicates add up)."""
    a = adjacency.copy()
    for i, item in enumerate(remove):
        src, dst, _ = _edge(item, f"remove[{i}]", index)
        _set_entry(a, src, dst, 0.0, directed=directed, field=f"remove[{i}]")
    a.eliminate_zeros()  # so a removed edge cannot be reweighted
    for i, item in enumerate(reweight):
        src, dst, weight = _edge(item, f"reweight[{i}]", index)
        weight = parse_weight(weight, f"reweight[{i}].weight")
        _set_entry(a, src, dst, weight, directed=directed, field=f"reweight[{i}]")
    a.eliminate_zeros()
    triples = []
    for i, item in enumerate(add):
        src, dst, weight = _edge(item, f"add[{i}]", index)
        w = 1.0 if weight is None else parse_weight(weight, f"add[{i}].weight")
        triples.append((src, dst, w))
    if triples:
        rows, cols, weights = (np.array(v) for v in zip(*triples, strict=True))
        delta = build_adjacency(a.shape[0], rows, cols, weights.astype(float), directed=directed)
        a = (a + delta).tocsr()
    a.sum_duplicates()
    a.sort_indices()
    return a


def _set_entry(
    a: sp.csr_matrix, src: int, dst: int, value: float, *, directed: bool, field: str
) -> None:
    pairs = [(src, dst)] if directed or src == dst else [(src, dst), (dst, src)]
    for row, col in pairs:
        start, stop = a.indptr[row], a.indptr[row + 1]
        pos = start + int(np.searchsorted(a.indices[start:stop], col))
        if pos >= stop or a.indices[pos] != col:
            raise GraphError(field, "names an edge that does not exist")
        a.data[pos] = value
