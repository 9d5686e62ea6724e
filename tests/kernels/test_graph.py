"""Graph JSON parsing: both forms, the refusals SPEC §3 lists, limits, and hypothesis fuzzing."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from dgdm.kernels.errors import GraphError
from dgdm.kernels.graph import Limits, parse_graph, parse_graph_json


def weighted(weight: Any) -> dict[str, Any]:
    return node_form(edges=[{"source": "a", "target": "b", "weight": weight}])


def node_form(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "nodes": [{"id": "a", "features": [0.1, 0.2]}, {"id": "b", "features": [0.0, 1.0]}],
        "edges": [{"source": "a", "target": "b", "weight": 0.8}],
    }
    body.update(overrides)
    return body


def refusal(obj: Any, limits: Limits | None = None) -> GraphError:
    with pytest.raises(GraphError) as info:
        parse_graph(obj, limits)
    return info.value


def test_node_form_builds_symmetric_csr_with_features() -> None:
    g = parse_graph(node_form(graph_id="g1"))
    assert g.node_ids == ("a", "b")
    assert g.graph_id == "g1"
    assert not g.directed
    np.testing.assert_array_equal(g.adjacency.toarray(), [[0.0, 0.8], [0.8, 0.0]])
    np.testing.assert_array_equal(g.x, [[0.1, 0.2], [0.0, 1.0]])


def test_directed_duplicates_add_and_self_loop_counted_once() -> None:
    edges = [
        {"source": 1, "target": 2},
        {"source": 1, "target": 2, "weight": 2.5},
        {"source": 2, "target": 2, "weight": 4.0},
    ]
    nodes = [{"id": 1}, {"id": 2}]
    directed = parse_graph({"nodes": nodes, "edges": edges, "directed": True})
    np.testing.assert_array_equal(directed.adjacency.toarray(), [[0.0, 3.5], [0.0, 4.0]])
    undirected = parse_graph({"nodes": nodes, "edges": edges})
    np.testing.assert_array_equal(undirected.adjacency.toarray(), [[0.0, 3.5], [3.5, 4.0]])
    assert directed.x.shape == (2, 0)


def test_int_and_str_ids_are_distinct() -> None:
    g = parse_graph({"nodes": [{"id": 1}, {"id": "1"}], "edges": [{"source": "1", "target": 1}]})
    assert g.node_ids == (1, "1")
    assert g.adjacency.nnz == 2


def test_both_fixture_forms_are_identical(fixtures_dir) -> None:
    nodes = parse_graph_json((fixtures_dir / "karate.json").read_bytes())
    compact = parse_graph_json((fixtures_dir / "karate_compact.json").read_text())
    assert nodes.node_ids == compact.node_ids
    assert (nodes.adjacency != compact.adjacency).nnz == 0
    np.testing.assert_array_equal(nodes.x, compact.x)
    assert nodes.method == compact.method


@pytest.mark.parametrize(
    ("obj", "field", "words"),
    [
        (node_form(edges=[{"source": "a", "target": "zz"}]), "edges[0].target", "unknown node"),
        (weighted(-1), "edges[0].weight", "greater than 0"),
        (weighted(0), "edges[0].weight", "greater than 0"),
        (weighted("x"), "edges[0].weight", ""),
        (weighted(1e400), "edges[0].weight", ""),
        (weighted(10**400), "edges[0].weight", ""),
        (
            node_form(nodes=[{"id": "a", "features": [1.0]}, {"id": "b", "features": [1.0, 2.0]}]),
            "nodes[1].features",
            "features",
        ),
        (
            node_form(nodes=[{"id": "a", "features": [1.0]}, {"id": "b", "features": [1e999]}]),
            "nodes[1].features[0]",
            "finite",
        ),
        (node_form(nodes=[{"id": "a"}, {"id": "a"}]), "nodes[1].id", "duplicates"),
        (node_form(nodes=[{"id": True}]), "nodes[0].id", "string or an integer"),
        (node_form(nodes=[{"id": "a", "colour": 1}]), "nodes[0].colour", "not a known"),
        (node_form(directed="yes"), "directed", "true or false"),
        (node_form(method={"kind": "magic"}), "method.kind", "one of"),
        (node_form(method={"alpha": 2}), "method.alpha", "[1e-06, 1]"),
        (node_form(method={"alpha": 5e-324}), "method.alpha", "[1e-06, 1]"),
        ({"num_nodes": 2, "edge_index": [[0], [5]]}, "edge_index[1][0]", "unknown node"),
        ({"num_nodes": 2, "edge_index": [[0, 1], [1]]}, "edge_index[1]", "entries"),
        ({"num_nodes": 2, "edge_index": [[0], [1]], "edge_weight": [-2]}, "edge_weight[0]", ""),
        ({"num_nodes": 2, "x": [[1.0]]}, "x", "rows"),
        ({"num_nodes": 2, "x": [[1.0], [1.0, 2.0]]}, "x[1]", "features"),
        ({"num_nodes": -1}, "num_nodes", "non-negative"),
        ([1, 2], "body", "object"),
        ({"foo": 1}, "nodes", "required"),
    ],
)
def test_refusals_name_the_field(obj: Any, field: str, words: str) -> None:
    err = refusal(obj)
    assert err.field == field
    assert err.code == "invalid"
    assert words in str(err)
    assert str(err).startswith(field)


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        ({"nodes": [{"id": i} for i in range(4)]}, "nodes"),
        ({"num_nodes": 4}, "num_nodes"),
        (node_form(edges=[{"source": "a", "target": "b"}] * 4), "edges"),
        ({"num_nodes": 2, "edge_index": [[0] * 4, [1] * 4]}, "edge_index"),
        (node_form(nodes=[{"id": "a", "features": [0.0] * 4}]), "nodes[0].features"),
    ],
)
def test_limits_are_too_large(obj: Any, field: str) -> None:
    err = refusal(obj, Limits(max_nodes=3, max_edges=3, max_features=3))
    assert (err.field, err.code) == (field, "too_large")


def test_body_byte_limit_and_bad_json() -> None:
    with pytest.raises(GraphError) as info:
        parse_graph_json(b"{" + b" " * 100 + b"}", Limits(max_body_bytes=50))
    assert (info.value.field, info.value.code) == ("body", "too_large")
    for text in ("{", '{"nodes": [{"id": 1, "features": [NaN]}]}', "[" * 100_000):
        with pytest.raises(GraphError) as info:
            parse_graph_json(text)
        assert info.value.field == "body"


json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                ["id", "features", "source", "target", "weight", "x", "nodes", "edges"]
            ),
            children,
            max_size=4,
        )
    ),
    max_leaves=20,
)
graphish = st.fixed_dictionaries(
    {},
    optional={
        "nodes": st.lists(
            st.fixed_dictionaries(
                {"id": json_scalars}, optional={"features": st.lists(json_scalars, max_size=3)}
            )
            | json_values,
            max_size=4,
        ),
        "edges": st.lists(
            st.fixed_dictionaries(
                {"source": json_scalars, "target": json_scalars},
                optional={"weight": json_scalars},
            )
            | json_values,
            max_size=4,
        ),
        "num_nodes": json_scalars,
        "edge_index": json_values,
        "edge_weight": json_values,
        "x": json_values,
        "directed": json_scalars,
        "method": json_values,
        "graph_id": json_scalars,
    },
)


@settings(max_examples=400, deadline=None)
@given(obj=graphish | json_values)
def test_parser_only_ever_raises_graph_error(obj: Any) -> None:
    try:
        g = parse_graph(obj)
    except GraphError as err:
        assert err.field
        assert err.code in ("invalid", "too_large")
        return
    assert g.x.shape[0] == g.n == g.adjacency.shape[0]
    assert np.isfinite(g.x).all()
    assert (g.adjacency.data > 0).all()


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=60) | graphish.map(json.dumps))
def test_json_entry_point_only_ever_raises_graph_error(text: str) -> None:
    with contextlib.suppress(GraphError):
        parse_graph_json(text)


# -- the vectorised happy path agrees with the value-by-value path -----------------------

node_ids = st.one_of(
    st.lists(st.integers(-5, 40), min_size=1, max_size=12, unique=True),
    st.lists(st.text(max_size=3), min_size=1, max_size=12, unique=True),
    st.integers(1, 12).map(lambda n: list(range(n))),  # ids that are their own rows
)
finite = st.one_of(
    st.floats(-1e6, 1e6, allow_nan=False), st.integers(-(2**70), 2**70), st.just(-0.0)
)


@settings(max_examples=150, deadline=None)
@given(ids=node_ids, data=st.data(), directed=st.booleans())
def test_happy_path_equals_the_checked_path(ids: list[Any], data: Any, directed: bool) -> None:
    from dgdm.kernels import graph as g

    width = data.draw(st.integers(0, 4))
    nodes = [{"id": i, "features": data.draw(st.lists(finite, min_size=width, max_size=width))}
             for i in ids]  # fmt: skip
    endpoint = st.sampled_from(ids)
    edges = data.draw(
        st.lists(
            st.fixed_dictionaries(
                {"source": endpoint, "target": endpoint},
                optional={"weight": st.one_of(st.floats(1e-3, 1e3), st.integers(1, 2**40))},
            ),
            max_size=30,
        )
    )
    parsed = parse_graph({"nodes": nodes, "edges": edges, "directed": directed})
    assert parsed.node_ids == tuple(g._checked_node_ids(nodes))
    features = [node["features"] for node in nodes]
    np.testing.assert_array_equal(parsed.x, g._checked_matrix(features, "f{}", Limits()))
    rows, cols, weights = g._checked_edges(edges, {node: i for i, node in enumerate(ids)})
    if not directed:
        off = rows != cols
        rows, cols = np.concatenate([rows, cols[off]]), np.concatenate([cols, rows[off]])
        weights = np.concatenate([weights, weights[off]])
    reference = sp.csr_matrix((weights, (rows, cols)), shape=(len(ids), len(ids)))
    reference.sum_duplicates()
    reference.sort_indices()
    np.testing.assert_array_equal(parsed.adjacency.indptr, reference.indptr)
    np.testing.assert_array_equal(parsed.adjacency.indices, reference.indices)
    np.testing.assert_allclose(parsed.adjacency.data, reference.data, rtol=1e-12)


@pytest.mark.parametrize(
    ("patch", "field", "words"),
    [
        (lambda b: b["nodes"][37]["features"].__setitem__(11, True), "nodes[37].features[11]",
         "number"),
        (lambda b: b["nodes"][37]["features"].__setitem__(11, "1"), "nodes[37].features[11]",
         "number"),
        (lambda b: b["nodes"][37]["features"].__setitem__(11, 10**400), "nodes[37].features[11]",
         "out of range"),
        (lambda b: b["nodes"][37]["features"].__setitem__(11, float("inf")),
         "nodes[37].features[11]", "finite"),
        (lambda b: b["edges"][73].__setitem__("target", 1.0), "edges[73].target", "node id"),
        (lambda b: b["edges"][73].__setitem__("source", True), "edges[73].source", "node id"),
        (lambda b: b["edges"][73].__setitem__("source", 99), "edges[73].source", "unknown node"),
        (lambda b: b["edges"][73].__setitem__("weight", 0), "edges[73].weight", "greater than 0"),
        (lambda b: b["edges"][73].__setitem__("weight", float("nan")), "edges[73].weight",
         "finite"),
        (lambda b: b["nodes"][37].__setitem__("id", 3), "nodes[37].id", "duplicates"),
    ],
)  # fmt: skip
def test_first_bad_value_in_a_large_body_is_named(patch: Any, field: str, words: str) -> None:
    body = {
        "nodes": [{"id": i, "features": [0.5] * 16} for i in range(60)],
        "edges": [{"source": i % 60, "target": (7 * i) % 60, "weight": 1.5} for i in range(120)],
    }
    patch(body)
    error = refusal(body)
    assert error.field == field
    assert words in error.message


def test_duplicate_edges_whose_weights_overflow_are_refused() -> None:
    # Found by the sanitizer fuzz: two finite weights summed to inf in the adjacency.
    body = (
        b'{"nodes":[{"id":0,"features":[1]},{"id":1,"features":[1]}],'
        b'"edges":[{"source":0,"target":1,"weight":1.7e308},'
        b'{"source":0,"target":1,"weight":1.7e308}]}'
    )
    with pytest.raises(GraphError, match="edges"):
        parse_graph_json(body)
