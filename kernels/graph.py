"""Graph JSON (SPEC §3) parsed and validated once into a compact CSR `Graph`.

Both forms are accepted: the node/edge form (`nodes`, `edges`) and the compact PyG-style
form (`num_nodes`, `edge_index`, `edge_weight`, `x`). Every refusal is a `GraphError` naming
the offending field with its index; nothing downstream re-validates a `Graph`.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain, repeat
from typing import Any, TypeGuard

import numpy as np
import scipy.sparse as sp

from dgdm.common.fields import unknown_field
from dgdm.kernels.errors import GraphError
from dgdm.kernels.method import Method, parse_method

try:  # optional: built from kernels/_graphscan.c when a C compiler was present at install time
    from dgdm.kernels import _graphscan
except ImportError:  # pragma: no cover - depends on the installation
    _graphscan = None  # type: ignore[assignment]

NodeId = str | int

_NODE_FORM_KEYS = frozenset({"graph_id", "directed", "nodes", "edges", "method"})
_COMPACT_FORM_KEYS = frozenset(
    {"graph_id", "directed", "num_nodes", "edge_index", "edge_weight", "x", "method"}
)
_MAX_GRAPH_ID = 128
_NODE_KEYS = frozenset({"id", "features"})
_EDGE_KEYS = frozenset({"source", "target", "weight"})
_TWO_EDGE_KEYS = frozenset({"source", "target"})
# Exact types for the bulk checks (bool is an int subclass, and neither a number nor an id).
_ID_TYPES = frozenset({str, int})
_NUMBER_TYPES = frozenset({int, float})
# Repeated topologies (the usual one-off request: same graph, new features) reuse their
# canonical CSR instead of sorting and summing the edges again: the cache is keyed by a hash
# of the parsed edge arrays, ~10x cheaper than building the CSR. Only small graphs are kept
# (a cached entry is ~24 bytes per stored edge), so the cache stays under ~25 MB.
_CACHED_ADJACENCIES = 64
_CACHED_MAX_EDGES = 16_384


@dataclass(frozen=True)
class Limits:
    """What one graph may contain; exceeding any is a `too_large` GraphError (HTTP 413)."""

    max_nodes: int = 100_000
    max_edges: int = 2_000_000
    max_features: int = 1024
    max_body_bytes: int = 64 * 1024 * 1024


@dataclass(frozen=True, eq=False)
class Graph:
    """A validated graph.

    `adjacency` is A of SPEC §2 before the method's self loops: CSR float64, canonical
    (sorted indices, duplicates summed); undirected edges are stored in both directions.
    `x` is float64 (N, F), F may be 0 when no features were given (a topology only).
    """

    node_ids: tuple[NodeId, ...]
    adjacency: sp.csr_matrix
    x: np.ndarray
    directed: bool = False
    graph_id: str | None = None
    method: Method = field(default_factory=Method)

    @property
    def n(self) -> int:
        return len(self.node_ids)


def parse_graph_json(data: bytes | str, limits: Limits | None = None) -> Graph:
    """Parse a JSON document (bytes or text) into a Graph, enforcing the byte limit first."""
    limits = limits or Limits()
    size = len(data.encode() if isinstance(data, str) else data)
    if size > limits.max_body_bytes:
        raise GraphError(
            "body",
            f"is {size} bytes, more than the limit of {limits.max_body_bytes}",
            code="too_large",
        )
    raw = data.encode() if isinstance(data, str) else data
    return parse_graph_bytes(raw, _decode_json, limits)


def _decode_json(data: bytes) -> Any:
    try:
        return json.loads(data, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise GraphError("body", f"is not valid JSON ({exc})") from exc


def parse_graph_bytes(
    data: bytes, decode: Callable[[bytes], Any], limits: Limits | None = None
) -> Graph:
    """`parse_graph(decode(data))`, with the plain node/edge form read straight from the
    bytes by the compiled scanner (no Python object per node, edge and number: ~5x less
    work). Any other body goes the general way, so results and errors are the same."""
    limits = limits or Limits()
    graph = _scanned_graph(data, decode, limits)
    return graph if graph is not None else parse_graph(decode(data), limits)


def _scanned_graph(data: bytes, decode: Callable[[bytes], Any], limits: Limits) -> Graph | None:
    """The Graph from `_graphscan.scan`, or None when the general path must decide."""
    scanned = _graphscan.scan(data) if _graphscan is not None else None
    if scanned is None:
        return None
    (ids, has_features, width, x, rows, cols, weights), spans = scanned
    n, e = len(ids), len(rows) // 8
    if n > limits.max_nodes or width > limits.max_features or e > limits.max_edges:
        return None  # the general path names the limit
    try:
        extra = {key: decode(span) for key, span in spans.items()}
    except Exception:  # noqa: BLE001 - the general path raises the same, with its message
        return None
    directed = _parse_directed(extra.get("directed", False))
    method = parse_method(extra.get("method"))
    graph_id = _parse_graph_id(extra.get("graph_id"))
    features = np.frombuffer(x, np.float64).reshape(n, width) if has_features else np.zeros((n, 0))
    adjacency = _ADJACENCIES.get(
        n,
        np.frombuffer(rows, np.int64),
        np.frombuffer(cols, np.int64),
        np.frombuffer(weights, np.float64),
        directed,
    )
    return Graph(tuple(ids), adjacency, features, directed, graph_id, method)


def parse_graph(obj: Any, limits: Limits | None = None) -> Graph:
    """Validate a decoded JSON object (either form) into a Graph."""
    limits = limits or Limits()
    if not isinstance(obj, Mapping):
        raise GraphError("body", "must be a JSON object")
    if "nodes" in obj or "edges" in obj:
        _check_keys(obj, _NODE_FORM_KEYS)
        node_ids, x = _parse_nodes(obj.get("nodes"), limits)
        rows, cols, weights = _parse_edges(obj.get("edges", []), node_ids, limits)
    elif "num_nodes" in obj or "edge_index" in obj or "x" in obj:
        _check_keys(obj, _COMPACT_FORM_KEYS)
        node_ids, x = _parse_compact_nodes(obj, limits)
        rows, cols, weights = _parse_compact_edges(obj, len(node_ids), limits)
    else:
        raise GraphError("nodes", "is required (or the compact form's num_nodes/edge_index/x)")
    directed = _parse_directed(obj.get("directed", False))
    method = parse_method(obj.get("method"))
    graph_id = _parse_graph_id(obj.get("graph_id"))
    adjacency = _ADJACENCIES.get(len(node_ids), rows, cols, weights, directed)
    return Graph(tuple(node_ids), adjacency, x, directed, graph_id, method)


def topology_hash(adjacency: sp.csr_matrix) -> Any:
    """A blake2b state fed with A's canonical CSR (shape, indptr, indices, data): the
    topology half of the problem key. Known already for a cached adjacency."""
    known = _ADJACENCIES.hash_of(adjacency)
    if known is not None:
        return known
    digest = hashlib.blake2b(digest_size=16)
    digest.update(np.int64(adjacency.shape[0]).tobytes())
    digest.update(np.ascontiguousarray(adjacency.indptr, dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(adjacency.indices, dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(adjacency.data, dtype=np.float64).tobytes())
    return digest


class _AdjacencyCache:
    """Edge arrays -> their canonical CSR (read-only, shared by every Graph parsed from the
    same edges) and its topology hash; LRU, thread-safe."""

    def __init__(self, size: int, max_edges: int) -> None:
        self._size = size
        self._max_edges = max_edges
        self._lock = threading.Lock()
        self._by_edges: OrderedDict[bytes, sp.csr_matrix] = OrderedDict()
        self._hashes: dict[int, tuple[sp.csr_matrix, Any]] = {}  # id(A) -> (A, hash)

    def get(
        self, n: int, rows: np.ndarray, cols: np.ndarray, weights: np.ndarray, directed: bool
    ) -> sp.csr_matrix:
        if rows.size > self._max_edges:
            return build_adjacency(n, rows, cols, weights, directed=directed)
        key = _edges_key(n, rows, cols, weights, directed)
        with self._lock:
            adjacency = self._by_edges.get(key)
            if adjacency is not None:
                self._by_edges.move_to_end(key)
                return adjacency
        adjacency = build_adjacency(n, rows, cols, weights, directed=directed)
        for array in (adjacency.data, adjacency.indices, adjacency.indptr):
            array.flags.writeable = False  # shared: a caller must copy before editing
        digest = topology_hash(adjacency)
        with self._lock:
            self._by_edges[key] = adjacency
            self._hashes[id(adjacency)] = (adjacency, digest)
            while len(self._by_edges) > self._size:
                _, old = self._by_edges.popitem(last=False)
                self._hashes.pop(id(old), None)
        return adjacency

    def hash_of(self, adjacency: sp.csr_matrix) -> Any:
        """A copy of a cached adjacency's topology hash (None for any other matrix)."""
        with self._lock:
            entry = self._hashes.get(id(adjacency))
            if entry is None or entry[0] is not adjacency:
                return None
            return entry[1].copy()


def _edges_key(
    n: int, rows: np.ndarray, cols: np.ndarray, weights: np.ndarray, directed: bool
) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(np.array([n, directed, rows.size], dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(rows, dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(cols, dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(weights, dtype=np.float64).tobytes())
    return digest.digest()


_ADJACENCIES = _AdjacencyCache(_CACHED_ADJACENCIES, _CACHED_MAX_EDGES)


def build_adjacency(
    n: int, rows: np.ndarray, cols: np.ndarray, weights: np.ndarray, *, directed: bool
) -> sp.csr_matrix:
    """CSR A with duplicate edges summed; an undirected edge i-j sets A[i,j] and A[j,i]
    (a self loop i-i once, as networkx counts it)."""
    if not directed:
        off = rows != cols
        rows, cols, weights = (
            np.concatenate([rows, cols[off]]),
            np.concatenate([cols, rows[off]]),
            np.concatenate([weights, weights[off]]),
        )
    return canonical_csr(n, rows, cols, weights)


def canonical_csr(n: int, rows: np.ndarray, cols: np.ndarray, weights: np.ndarray) -> sp.csr_matrix:
    """CSR with sorted indices and duplicates summed, built with numpy directly (scipy's
    COO -> CSR path costs ~0.3 ms of constructor checks on a 100-node graph)."""
    weights = np.asarray(weights, dtype=np.float64)
    # One row-major sort key (n * n fits in int64 for any n whose CSR fits in memory).
    key = rows.astype(np.int64) * n + cols
    order = np.argsort(key, kind="stable")
    key, weights = key[order], weights[order]
    if key.size:
        first = np.empty(key.size, dtype=bool)
        first[0] = True
        np.not_equal(key[1:], key[:-1], out=first[1:])
        starts = np.flatnonzero(first)
        with np.errstate(over="ignore"):
            summed = np.add.reduceat(weights, starts)
        if not np.isfinite(summed).all():
            raise GraphError("edges", "duplicate edges' weights add up past the float64 range")
        key, weights = key[starts], summed
    rows, cols = np.divmod(key, n)
    index_dtype = np.int32 if max(n, rows.size) < 2**31 - 1 else np.int64
    indptr = np.zeros(n + 1, dtype=index_dtype)
    np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
    adjacency = sp.csr_matrix((weights, cols.astype(index_dtype), indptr), shape=(n, n), copy=False)
    adjacency.has_sorted_indices = True
    adjacency.has_canonical_format = True
    return adjacency


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a valid JSON number")


def _check_keys(obj: Mapping[str, Any], allowed: frozenset[str]) -> None:
    key = unknown_field(obj, allowed)
    if key is not None:
        raise GraphError(key, "is not a known graph field for this form")


def _parse_directed(value: Any) -> bool:
    if not isinstance(value, bool):
        raise GraphError("directed", "must be true or false")
    return value


def _parse_graph_id(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= _MAX_GRAPH_ID:
        raise GraphError("graph_id", f"must be a string of 1 to {_MAX_GRAPH_ID} characters")
    return value


def _is_node_id(value: Any) -> TypeGuard[NodeId]:
    return isinstance(value, str | int) and not isinstance(value, bool)


def _list(value: Any, name: str) -> Sequence[Any]:
    if not isinstance(value, list):
        raise GraphError(name, "must be a list")
    return value


def _too_large(name: str, what: str, count: int, limit: int) -> GraphError:
    return GraphError(name, f"has {count} {what}, more than the limit of {limit}", code="too_large")


def _parse_nodes(value: Any, limits: Limits) -> tuple[list[NodeId], np.ndarray]:
    nodes = _list(value, "nodes")
    if len(nodes) > limits.max_nodes:
        raise _too_large("nodes", "nodes", len(nodes), limits.max_nodes)
    ids = _plain_node_ids(nodes)
    if ids is None:
        ids = _checked_node_ids(nodes)
    features = [node.get("features") for node in nodes]
    return ids, _feature_matrix(features, "nodes[{}].features", limits)


def _plain_node_ids(nodes: Sequence[Any]) -> list[NodeId] | None:
    """The ids when every node is a plain dict with known keys and a unique str/int id;
    None means "look closer" (`_checked_node_ids` names the first problem, if any)."""
    if not set(map(type, nodes)) <= {dict} or not set(chain.from_iterable(nodes)) <= _NODE_KEYS:
        return None
    ids: list[Any] = list(map(dict.get, nodes, repeat("id")))
    if not set(map(type, ids)) <= _ID_TYPES or len(set(ids)) != len(ids):
        return None
    return ids


def _checked_node_ids(nodes: Sequence[Any]) -> list[NodeId]:
    ids: list[NodeId] = []
    seen: set[NodeId] = set()
    for i, node in enumerate(nodes):
        if not isinstance(node, Mapping):
            raise GraphError(f"nodes[{i}]", "must be an object")
        key = unknown_field(node, _NODE_KEYS)
        if key is not None:
            raise GraphError(f"nodes[{i}].{key}", "is not a known node field")
        node_id = node.get("id")
        if not _is_node_id(node_id):
            raise GraphError(f"nodes[{i}].id", "must be a string or an integer")
        if node_id in seen:
            raise GraphError(f"nodes[{i}].id", f"duplicates the id {node_id!r}")
        seen.add(node_id)
        ids.append(node_id)
    return ids


def _parse_compact_nodes(obj: Mapping[str, Any], limits: Limits) -> tuple[list[NodeId], np.ndarray]:
    x = obj.get("x")
    if x is not None:
        x = _list(x, "x")
    num_nodes = obj.get("num_nodes", len(x) if x is not None else None)
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 0:
        raise GraphError("num_nodes", "must be a non-negative integer")
    if num_nodes > limits.max_nodes:
        raise _too_large("num_nodes", "nodes", num_nodes, limits.max_nodes)
    if x is None:
        return list(range(num_nodes)), np.zeros((num_nodes, 0))
    if len(x) != num_nodes:
        raise GraphError("x", f"has {len(x)} rows but num_nodes is {num_nodes}")
    return list(range(num_nodes)), _feature_matrix(list(x), "x[{}]", limits)


def _feature_matrix(rows: list[Any], name: str, limits: Limits) -> np.ndarray:
    """(N, F) float64 from per-node lists; all absent means F = 0 (a topology only)."""
    if all(row is None for row in rows):
        return np.zeros((len(rows), 0))
    x = _plain_matrix(rows, limits.max_features)
    return x if x is not None else _checked_matrix(rows, name, limits)


def _plain_matrix(rows: list[Any], max_features: int) -> np.ndarray | None:
    """The happy path, one numpy conversion: equal-length lists of finite JSON numbers.
    None means "look closer"; no field name is built here."""
    if set(map(type, rows)) != {list} or len(set(map(len, rows))) != 1:
        return None
    width = len(rows[0])
    if width > max_features or not set(map(type, chain.from_iterable(rows))) <= _NUMBER_TYPES:
        return None
    try:
        x = np.array(rows, dtype=np.float64)
    except (OverflowError, ValueError, TypeError):
        return None
    if x.shape != (len(rows), width) or not np.isfinite(x).all():
        return None
    return x


def _checked_matrix(rows: list[Any], name: str, limits: Limits) -> np.ndarray:
    """Value by value, so that the first bad one is named exactly."""
    width = None
    for i, row in enumerate(rows):
        if not isinstance(row, list):
            raise GraphError(name.format(i), "must be a list of numbers")
        if width is None:
            width = len(row)
            if width > limits.max_features:
                raise _too_large(name.format(i), "features", width, limits.max_features)
        elif len(row) != width:
            raise GraphError(name.format(i), f"has {len(row)} features, node 0 has {width}")
    values = [
        [_finite(value, f"{name.format(i)}[{j}]") for j, value in enumerate(row)]
        for i, row in enumerate(rows)
    ]
    return np.array(values, dtype=np.float64).reshape(len(rows), width or 0)


def _finite(value: Any, name: str) -> float:
    """A JSON number as a finite float (huge integers and inf/nan are refused)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise GraphError(name, "must be a number")
    try:
        number = float(value)
    except OverflowError as exc:
        raise GraphError(name, "is out of range") from exc
    if not math.isfinite(number):
        raise GraphError(name, "must be finite")
    return number


def _parse_edges(
    value: Any, node_ids: list[NodeId], limits: Limits
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    edges = _list(value, "edges")
    if len(edges) > limits.max_edges:
        raise _too_large("edges", "edges", len(edges), limits.max_edges)
    plain = _plain_edges(edges, node_ids)
    if plain is not None:
        return plain
    return _checked_edges(edges, {node: i for i, node in enumerate(node_ids)})


def _plain_edges(
    edges: Sequence[Any], node_ids: list[NodeId]
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The happy path: plain dict edges, str/int endpoints that exist, finite weights > 0,
    converted in bulk. None means "look closer"; no field name is built here."""
    if not set(map(type, edges)) <= {dict}:
        return None
    # Two keys each (the usual unweighted edge): the id type checks below prove that they
    # are source and target, so the keys need not be read one by one.
    keys = _TWO_EDGE_KEYS if set(map(len, edges)) <= {2} else set(chain.from_iterable(edges))
    if not keys <= _EDGE_KEYS:
        return None
    sources = list(map(dict.get, edges, repeat("source")))
    targets = list(map(dict.get, edges, repeat("target")))
    # The type checks come first: True == 1 and 1.0 == 1 would find a node by its id.
    source_types, target_types = set(map(type, sources)), set(map(type, targets))
    if not source_types | target_types <= _ID_TYPES:
        return None
    try:
        w = _plain_weights(edges, "weight" in keys)
        if w is None:
            return None
        # Node ids 0..N-1 in order (the usual integer case): an id is its row.
        identity = node_ids == list(range(len(node_ids)))
        index: dict[NodeId, int] = {} if identity else {n: i for i, n in enumerate(node_ids)}
        rows = _rows_of(sources, source_types, node_ids, index)
        cols = _rows_of(targets, target_types, node_ids, index)
    except (KeyError, OverflowError, ValueError, TypeError):
        return None
    return rows, cols, w


def _plain_weights(edges: Sequence[Any], any_weight: bool) -> np.ndarray | None:
    """Finite weights > 0 as float64 (1.0 where absent); None means "look closer"."""
    if not any_weight:
        return np.ones(len(edges))
    weights = list(map(dict.get, edges, repeat("weight"), repeat(1.0)))
    if not set(map(type, weights)) <= _NUMBER_TYPES:
        return None
    w = np.array(weights, dtype=np.float64)
    if not (np.isfinite(w).all() and (w > 0.0).all()):
        return None
    return w


def _rows_of(
    ids: list[Any], types: set[type], node_ids: list[NodeId], index: Mapping[NodeId, int]
) -> np.ndarray:
    """Row numbers of node ids (KeyError for an unknown one). With no `index` the node ids
    are 0..N-1 in order, so an integer id is its row: one conversion and a range check."""
    if not index:
        if not types <= {int}:
            raise KeyError("a string id names no node here")
        rows = np.array(ids, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(node_ids)):
            raise KeyError("an id is out of range")
        return rows
    return np.fromiter(map(index.__getitem__, ids), np.int64, len(ids))


def _checked_edges(
    edges: Sequence[Any], index: Mapping[NodeId, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Edge by edge, so that the first bad field is named exactly."""
    rows = np.empty(len(edges), dtype=np.int64)
    cols = np.empty(len(edges), dtype=np.int64)
    weights = np.empty(len(edges), dtype=np.float64)
    for e, edge in enumerate(edges):
        if not isinstance(edge, Mapping):
            raise GraphError(f"edges[{e}]", "must be an object")
        check_edge_keys(edge, f"edges[{e}]")
        rows[e] = edge_endpoint(edge.get("source"), index, f"edges[{e}].source")
        cols[e] = edge_endpoint(edge.get("target"), index, f"edges[{e}].target")
        weights[e] = parse_weight(edge.get("weight", 1.0), f"edges[{e}].weight")
    return rows, cols, weights


def check_edge_keys(edge: Mapping[str, Any], field: str) -> None:
    """An edge object names only source, target and weight (also an edge delta's)."""
    key = unknown_field(edge, _EDGE_KEYS)
    if key is not None:
        raise GraphError(f"{field}.{key}", "is not a known edge field")


def edge_endpoint(value: Any, index: Mapping[NodeId, int], name: str) -> int:
    """The row of an edge's source or target node id (also an edge delta's)."""
    if not _is_node_id(value):
        raise GraphError(name, "must be a node id (string or integer)")
    try:
        return index[value]
    except KeyError:
        raise GraphError(name, f"names the unknown node {value!r}") from None


def parse_weight(value: Any, name: str) -> float:
    """An edge weight: a finite number > 0 (SPEC §2)."""
    weight = _finite(value, name)
    if weight <= 0.0:
        raise GraphError(name, "must be greater than 0")
    return weight


def _parse_compact_edges(
    obj: Mapping[str, Any], n: int, limits: Limits
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    edge_index = obj.get("edge_index", [[], []])
    if not isinstance(edge_index, list) or len(edge_index) != 2:
        raise GraphError("edge_index", "must be two lists [sources, targets]")
    src = _list(edge_index[0], "edge_index[0]")
    dst = _list(edge_index[1], "edge_index[1]")
    if len(src) != len(dst):
        raise GraphError("edge_index[1]", f"has {len(dst)} entries, edge_index[0] has {len(src)}")
    if len(src) > limits.max_edges:
        raise _too_large("edge_index", "edges", len(src), limits.max_edges)
    rows = _index_array(src, n, "edge_index[0]")
    cols = _index_array(dst, n, "edge_index[1]")
    weights = _compact_weights(obj.get("edge_weight"), len(src))
    return rows, cols, weights


def _index_array(values: Sequence[Any], n: int, name: str) -> np.ndarray:
    if set(map(type, values)) <= {int}:  # the happy path: one conversion, one range check
        try:
            out = np.array(values, dtype=np.int64).reshape(len(values))
        except OverflowError:
            out = None
        if out is not None and (out.size == 0 or (out.min() >= 0 and out.max() < n)):
            return out
    out = np.empty(len(values), dtype=np.int64)
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, int):
            raise GraphError(f"{name}[{i}]", "must be an integer node index")
        if not 0 <= value < n:
            raise GraphError(f"{name}[{i}]", f"names the unknown node {value} (num_nodes is {n})")
        out[i] = value
    return out


def _compact_weights(value: Any, count: int) -> np.ndarray:
    if value is None:
        return np.ones(count)
    weights = _list(value, "edge_weight")
    if len(weights) != count:
        raise GraphError("edge_weight", f"has {len(weights)} entries for {count} edges")
    if set(map(type, weights)) <= _NUMBER_TYPES:  # the happy path: one conversion
        try:
            w = np.array(weights, dtype=np.float64).reshape(count)
        except OverflowError:
            w = None
        if w is not None and np.isfinite(w).all() and (w > 0.0).all():
            return w
    return np.array(
        [parse_weight(w, f"edge_weight[{i}]") for i, w in enumerate(weights)], dtype=np.float64
    ).reshape(count)
