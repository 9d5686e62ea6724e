"""`dgdm diffuse`: JSON out, both file forms, stdin, method overrides, bad input -> GraphError."""

from __future__ import annotations

import argparse
import io
import json
import sys

import numpy as np
import pytest

from dgdm.kernels import cli
from dgdm.kernels.errors import GraphError, MethodError

from .conftest import FIXTURES


def run(capsys, *argv: str) -> dict:
    parser = argparse.ArgumentParser(prog="dgdm")
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["diffuse", *argv])
    assert args.func(args) == 0
    return json.loads(capsys.readouterr().out)


def test_both_forms_give_the_same_embedding(capsys) -> None:
    nodes = run(capsys, str(FIXTURES / "karate.json"), "--backend", "numpy")
    compact = run(capsys, str(FIXTURES / "karate_compact.json"), "--backend", "numpy")
    assert nodes["backend"] == compact["backend"] == "numpy"
    assert nodes["node_ids"] == compact["node_ids"] == list(range(34))
    np.testing.assert_array_equal(nodes["embedding"], compact["embedding"])
    assert np.array(nodes["embedding"]).shape == (34, 3)


def test_default_graph_and_method_flags(capsys) -> None:
    out = run(capsys, "--backend", "sparse", "--kind", "heat", "--t", "2", "--k", "8")
    assert out["graph_id"] == "karate"
    assert out["method"] == {
        "kind": "heat", "t": 2.0, "k": 8, "normalization": "sym", "self_loops": True,
    }  # fmt: skip
    poly = run(capsys, "--kind", "poly", "--coefficients", "1", "0.5", "--backend", "numpy")
    assert poly["method"]["coefficients"] == [1.0, 0.5]
    whole = run(capsys, "--method-json", '{"kind": "ppr", "alpha": 0.3, "normalization": "col"}')
    assert (whole["method"]["alpha"], whole["method"]["normalization"]) == (0.3, "col")


def test_stdin(capsys, monkeypatch) -> None:
    data = (FIXTURES / "triangle_directed.json").read_bytes()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    out = run(capsys, "-", "--backend", "numpy")
    assert out["node_ids"] == ["a", "b", "c"]
    assert out["method"]["kind"] == "heat"


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["/nonexistent/graph.json"], "GRAPH.json"),
        ([str(FIXTURES / "karate.json"), "--alpha", "7"], "method.alpha"),
        (["--method-json", "{bad"], "--method-json"),
        (["--method-json", "{}", "--k", "3"], "--method-json"),
        (["--method-json", '{"kind": "nope"}'], "--method-json.kind"),
    ],
)
def test_bad_input_is_a_graph_error(capsys, argv, field) -> None:
    with pytest.raises(GraphError) as info:
        run(capsys, *argv)
    assert info.value.field == field


def test_unknown_node_through_the_dgdm_entry_point(tmp_path, capsys) -> None:
    """Exit 2 with the field on stderr, no traceback (needs every package's CLI present)."""
    pytest.importorskip("dgdm.sync.cli")
    from dgdm.agent.cli import main

    bad = tmp_path / "bad.json"
    bad.write_text('{"nodes": [{"id": 1}], "edges": [{"source": 1, "target": 2}]}')
    assert main(["diffuse", str(bad)]) == 2
    assert "edges[0].target" in capsys.readouterr().err


def test_method_error_is_a_graph_error() -> None:
    assert issubclass(MethodError, GraphError)
