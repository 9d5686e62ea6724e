"""Request bodies for registered topologies (`/graphs/{id}`), checked field by field.

Pure: each function takes the decoded JSON and returns what the engine needs, or raises
`GraphError` naming the bad field (HTTP 422).
"""

from __future__ import annotations

from typing import Any

from dgdm.common.fields import unknown_field
from dgdm.kernels.errors import GraphError

EDGE_CHANGES = ("add", "remove", "reweight")


def registration(obj: Any, graph_id: str) -> Any:
    """A PUT body as a graph object whose graph_id is the one in the path."""
    if not isinstance(obj, dict):
        return obj  # parse_graph names what is wrong with it
    if obj.get("graph_id", graph_id) != graph_id:
        raise GraphError("graph_id", "must match the graph id in the path")
    return {**obj, "graph_id": graph_id}


def parse_features(obj: Any, n: int, max_features: int) -> Any:
    """`{"x": [[...] * F] * N}` for a registered topology of N nodes -> float64 (N, F)."""
    import numpy as np

    x = _feature_rows(obj, n)
    width = len(x[0]) if n and isinstance(x[0], list) else 0
    if n and not 1 <= width <= max_features:
        raise GraphError("x[0]", f"must hold 1..{max_features} numbers", code="invalid")
    _check_rows(x, width)
    try:
        array = np.array(x, dtype=np.float64).reshape(n, width)
    except OverflowError as exc:
        raise GraphError("x", "holds a number too large for float64") from exc
    if not np.isfinite(array).all():
        raise GraphError("x", "must hold finite numbers only")
    return array


def _feature_rows(obj: Any, n: int) -> list[Any]:
    if not isinstance(obj, dict):
        raise GraphError("body", "must be a JSON object")
    unknown = unknown_field(obj, ("x",))
    if unknown is not None:
        raise GraphError(unknown, "is not a known field (only x)")
    x = obj.get("x")
    if not isinstance(x, list) or len(x) != n:
        raise GraphError("x", f"must be a list of {n} feature rows, one per node")
    return x


def _check_rows(x: list[Any], width: int) -> None:
    for i, row in enumerate(x):
        if type(row) is not list or len(row) != width:
            raise GraphError(f"x[{i}]", f"must be a list of {width} numbers")
        for j, value in enumerate(row):
            if type(value) not in (int, float):
                raise GraphError(f"x[{i}][{j}]", "must be a number")


def parse_edge_changes(obj: Any) -> dict[str, list[Any]]:
    """`{"add": [...], "remove": [...], "reweight": [...]}` for PATCH /graphs/{id}; the engine
    checks each edge (known nodes, weights) and names the bad one."""
    if not isinstance(obj, dict):
        raise GraphError("body", "must be a JSON object")
    unknown = unknown_field(obj, EDGE_CHANGES)
    if unknown is not None:
        raise GraphError(unknown, "is not a known field (add, remove, reweight)")
    changes: dict[str, list[Any]] = {}
    for name in EDGE_CHANGES:
        edges = obj.get(name, [])
        if not isinstance(edges, list):
            raise GraphError(name, "must be a list of edges")
        changes[name] = edges
    if not any(changes.values()):
        raise GraphError("body", "must change at least one edge (add, remove or reweight)")
    return changes
