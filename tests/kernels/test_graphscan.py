"""The compiled graph scanner (`_graphscan`) against the general path it shortcuts.

For every body, `parse_graph_bytes(body, decode)` must give what `parse_graph(decode(body))`
gives: the same Graph (ids with their types, features bit for bit, the same CSR) or the same
GraphError. The scanner may only decline (None), never differ, and never raise.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dgdm.agent import jsonio
from dgdm.kernels.errors import GraphError
from dgdm.kernels.graph import Graph, Limits, parse_graph, parse_graph_bytes

_graphscan = pytest.importorskip("dgdm.kernels._graphscan", reason="built without a C compiler")

LIMITS = Limits(max_nodes=64, max_edges=256, max_features=8)
JSON_PUNCTUATION = [bytes([c]) for c in b'\\",:{}[]-+.eE 0']


def stdlib_decode(data: bytes) -> Any:
    return json.loads(data)


DECODERS = {"agent": jsonio.loads, "stdlib": stdlib_decode}


def outcome(parse: Any) -> tuple[str, Any]:
    """A comparable summary of a parse: the graph's parts, or the error's."""
    try:
        graph: Graph = parse()
    except GraphError as exc:
        return "error", (exc.field, exc.message, exc.code)
    except (jsonio.BadJson, ValueError) as exc:  # the decoder's own refusal
        return type(exc).__name__, str(exc)
    a = graph.adjacency
    return "graph", (
        [(type(i).__name__, i) for i in graph.node_ids],
        graph.x.shape,
        graph.x.tobytes(),  # bit for bit: -0.0 and +0.0 differ here
        a.shape,
        a.indptr.tolist(),
        a.indices.tolist(),
        a.data.tobytes(),
        graph.directed,
        graph.graph_id,
        graph.method,
    )


def assert_same(
    body: bytes, decode_name: str = "agent", limits: Limits = LIMITS
) -> tuple[str, Any]:
    decode = DECODERS[decode_name]
    general = outcome(lambda: parse_graph(decode(body), limits))
    fast = outcome(lambda: parse_graph_bytes(body, decode, limits))
    assert fast == general
    return fast


# -- documents ----------------------------------------------------------------------------

finite = st.floats(allow_nan=False, allow_infinity=False)
number = st.one_of(
    finite,
    st.integers(-(10**25), 10**25),
    st.sampled_from([0.0, -0.0, 0, 5e-324, 1.7976931348623157e308, 1e22, 1e23, 2.0**53 + 1]),
)
node_id = st.one_of(st.integers(-3, 40), st.text(max_size=4))


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(1, 12))
    if draw(st.booleans()):
        ids: list[Any] = list(range(n))  # the usual case
    else:
        ids = draw(st.lists(node_id, min_size=n, max_size=n))
    width = draw(st.sampled_from([None, 0, 1, 3, 9]))
    nodes: list[dict[str, Any]] = []
    for i in ids:
        node: dict[str, Any] = {"id": i}
        if width is not None:
            node["features"] = draw(st.lists(number, min_size=width, max_size=width))
        nodes.append(node)
    endpoint = st.sampled_from(ids) if draw(st.integers(0, 9)) else node_id
    edges = []
    for _ in range(draw(st.integers(0, 20))):
        edge: dict[str, Any] = {"source": draw(endpoint), "target": draw(endpoint)}
        if draw(st.booleans()):
            edge["weight"] = draw(st.one_of(st.floats(0.01, 100.0), number))
        edges.append(edge)
    doc: dict[str, Any] = {"nodes": nodes, "edges": edges}
    if draw(st.booleans()):
        doc["directed"] = draw(st.sampled_from([True, False, None, 1]))
    if draw(st.booleans()):
        doc["graph_id"] = draw(st.one_of(st.none(), st.text(max_size=5), st.integers()))
    if draw(st.booleans()):
        doc["method"] = draw(
            st.sampled_from([{"kind": "ppr", "alpha": 0.2}, {"kind": "heat", "t": 2}, {}, []])
        )
    return doc


def encode(doc: Any, style: int) -> bytes:
    if style == 0:
        return json.dumps(doc).encode()
    if style == 1:
        return json.dumps(doc, separators=(",", ":")).encode()
    if style == 2:
        return json.dumps(doc, indent="\t", ensure_ascii=False).encode()
    return json.dumps(doc, indent=1, sort_keys=True).encode()


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(doc=documents(), style=st.integers(0, 3), decode_name=st.sampled_from(sorted(DECODERS)))
def test_same_graph_or_same_error_as_the_general_path(
    doc: dict[str, Any], style: int, decode_name: str
) -> None:
    assert_same(encode(doc, style), decode_name)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(doc=documents(), data=st.data())
def test_mutated_bodies_are_never_misread(doc: dict[str, Any], data: st.DataObject) -> None:
    """Bytes changed, cut or inserted anywhere: still the general path's answer."""
    body = bytearray(encode(doc, 1))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(body)))
        op = data.draw(st.integers(0, 2))
        if op == 0 and at < len(body):
            body[at] = data.draw(st.integers(0, 255))
        elif op == 1:
            body[at:at] = data.draw(st.sampled_from(JSON_PUNCTUATION))
        else:
            del body[at : at + data.draw(st.integers(1, 8))]
    assert_same(bytes(body))


@given(st.binary(max_size=200))
def test_random_bytes_never_raise_from_the_scanner(data: bytes) -> None:
    scanned = _graphscan.scan(data)
    assert scanned is None or isinstance(scanned, tuple)


def literal_variants(x: float) -> list[str]:
    # the fixed-point form cut to 60 characters may end in its "." (1e58): not JSON then
    out = [repr(x), f"{x:.17g}", f"{x:.6e}", f"{x:.3E}", f"{x:.20f}"[:60].rstrip(".")]
    if x.is_integer() and abs(x) < 1e30:
        out.append(str(int(x)))
    return [s for s in out if math.isfinite(float(s))]  # rounding may overflow: 1.798E+308


@settings(max_examples=500)
@given(st.one_of(finite, st.floats(-1e6, 1e6)))
def test_numbers_are_read_as_float_reads_them(x: float) -> None:
    for literal in literal_variants(x):
        body = b'{"nodes":[{"id":0,"features":[%s]}]}' % literal.encode()
        expected = float(json.loads(literal))
        graph = parse_graph_bytes(body, jsonio.loads, Limits())
        assert struct.pack("<d", graph.x[0, 0]) == struct.pack("<d", expected), literal
        assert _graphscan.scan(body) is not None, literal


@pytest.mark.parametrize(
    "literal",
    [
        "0", "-0", "-0.0", "0e0", "1e22", "1e23", "9007199254740993", "9007199254740992.5",
        "123456789012345678901234567890", "0.1", "0.30000000000000004", "5e-324", "2.5e-324",
        "1.7976931348623157e308", "4.9406564584124654e-324", "1.0000000000000002",
        "0.000000000000000000000000000000001", "1E+2", "1e-0",
    ],
)  # fmt: skip
def test_number_edge_cases(literal: str) -> None:
    body = b'{"nodes":[{"id":0,"features":[%s]}]}' % literal.encode()
    kind, parts = assert_same(body)
    assert kind == "graph"
    expected = float(json.loads(literal))
    assert parts[2] == struct.pack("<d", expected)  # x's bytes
    assert math.copysign(1.0, np.frombuffer(parts[2])[0]) == math.copysign(1.0, expected)


@pytest.mark.parametrize(
    "body",
    [
        b'{"nodes":[{"id":"a\\u0062"}]}',  # an escape
        b'{"nodes":[{"id":0,"id":1}]}',  # a repeated key
        b'{"nodes":[{"id":0}],"nodes":[{"id":1}]}',
        b'{"nodes":[{"id":0,"x":1}]}',  # an unknown key
        b'{"nodes":[{"id":0,"features":null}]}',
        b'{"nodes":[{"id":0,"features":[1e400]}]}',  # not finite
        b'{"nodes":[{"id":0,"features":[1]},{"id":1,"features":[1,2]}]}',  # uneven
        b'{"nodes":[{"id":0},{"id":0}]}',  # a repeated id
        b'{"nodes":[{"id":1.0}]}',
        b'{"nodes":[{"id":true}]}',
        b'{"nodes":[{"id":0}],"edges":[{"source":0,"target":0,"weight":0}]}',
        b'{"nodes":[{"id":0}],"edges":[{"source":0,"target":1}]}',  # unknown endpoint
        b'{"nodes":[{"id":0}],"edges":[{"source":0}]}',
        b'{"edges":[],"nodes":[{"id":0}]}',  # edges before nodes: needs the ids first
        b'{"nodes":[]}',
        b'{"nodes":[{"id":0}]} x',
        b'\xef\xbb\xbf{"nodes":[{"id":0}]}',  # a byte order mark
        b'{"nodes":[{"id":"\xff"}]}',  # not UTF-8
        b'{"nodes":[{"id":12345678901234567890123}]}',  # beyond int64
        b'{"num_nodes":1}',
    ],
)
def test_the_scanner_declines_what_it_does_not_read_plainly(body: bytes) -> None:
    assert _graphscan.scan(body) is None
    assert_same(body, "stdlib")


def test_the_usual_bodies_take_the_scanner() -> None:
    """Without this, every test above could pass with a scanner that always declines."""
    from dgdm.agent.bench import bench_graph

    plain = [
        bench_graph(100, 16),
        b'{"nodes":[{"id":"a","features":[1,2]},{"id":"b","features":[3,4]}],'
        b'"edges":[{"source":"a","target":"b","weight":2.5}],"directed":true,'
        b'"graph_id":"g1","method":{"kind":"heat","t":1.5}}',
    ]
    for body in plain:
        assert _graphscan.scan(body) is not None
        kind, _ = assert_same(body, limits=Limits())
        assert kind == "graph"


def test_limits_are_named_as_the_general_path_names_them() -> None:
    nodes = [{"id": i, "features": [1.0]} for i in range(LIMITS.max_nodes + 1)]
    body = json.dumps({"nodes": nodes}).encode()
    assert _graphscan.scan(body) is not None  # scanned, then refused by the limit
    kind, (field, _, code) = assert_same(body)
    assert (kind, field, code) == ("error", "nodes", "too_large")


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(doc=documents())
def test_scanned_features_are_writeable_like_decoded_ones(doc: dict[str, Any]) -> None:
    assume(all("features" in node for node in doc["nodes"]))
    body = json.dumps(doc).encode()
    try:
        graph = parse_graph_bytes(body, jsonio.loads, LIMITS)
    except GraphError:
        return
    assert graph.x.flags.writeable
    assert graph.x.dtype == np.float64
    assert graph.x.flags.c_contiguous
