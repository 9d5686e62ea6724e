"""`dgdm diffuse GRAPH.json`: a one-off diffusion printed as JSON (SPEC §8).

Registration imports nothing heavy; the engine is imported when the command runs.
"""

from __future__ import annotations

import argparse
from typing import Any

BACKENDS = ("auto", "numpy", "sparse", "tflite", "edgetpu")
_METHOD_FLAGS = ("kind", "alpha", "t", "k", "normalization", "self_loops", "coefficients")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "diffuse",
        help="diffuse one graph (SPEC §3 JSON) and print the result as JSON",
        description="Diffuse the node features of one graph and print the result as JSON. "
        "Without GRAPH, the packaged demo graph (Zachary's karate club) is used.",
    )
    parser.add_argument(
        "graph", nargs="?", metavar="GRAPH.json", help="graph JSON file, '-' for stdin"
    )
    parser.add_argument("--backend", choices=BACKENDS, default="auto")
    parser.add_argument(
        "--method-json", metavar="JSON", help='the whole method block, e.g. \'{"kind": "heat"}\''
    )
    method = parser.add_argument_group("method fields (override the graph's own method)")
    method.add_argument("--kind", choices=("ppr", "heat", "poly"))
    method.add_argument("--alpha", type=float, help="ppr teleport probability")
    method.add_argument("--t", type=float, help="heat kernel time")
    method.add_argument("--k", type=int, help="truncate the series after k terms")
    method.add_argument("--normalization", choices=("sym", "col", "row"))
    method.add_argument("--no-self-loops", dest="self_loops", action="store_false", default=None)
    method.add_argument(
        "--coefficients", type=float, nargs="+", metavar="C", help="poly coefficients c0 c1 ..."
    )
    parser.add_argument("--indent", type=int, default=None, help="pretty-print the JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import json
    import os
    import sys

    from dgdm.kernels.engine import Engine
    from dgdm.kernels.graph import Limits, parse_graph_json

    limits = Limits()
    graph = parse_graph_json(_read(args.graph, limits.max_body_bytes), limits)
    method = _method_override(args, graph.method)
    if method is not None:
        graph = dataclasses.replace(graph, method=method)
    result = Engine(backend=args.backend).diffuse(graph)
    text = json.dumps(result.to_json(), indent=args.indent) + "\n"
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:  # e.g. `| head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _read(path: str | None, max_bytes: int) -> bytes:
    import sys
    from importlib import resources

    from dgdm.kernels.errors import GraphError

    if path is None:
        return resources.files("dgdm.kernels").joinpath("data/karate.json").read_bytes()
    try:
        if path == "-":
            return sys.stdin.buffer.read(max_bytes + 1)
        with open(path, "rb") as f:
            return f.read(max_bytes + 1)  # one byte over is enough to refuse it
    except OSError as exc:
        raise GraphError("GRAPH.json", f"cannot read {path}: {exc.strerror or exc}") from exc


def _method_override(args: argparse.Namespace, current: Any) -> Any:
    """The graph's method with --method-json or the single-field flags applied, or None."""
    import json

    from dgdm.kernels.errors import MethodError
    from dgdm.kernels.method import parse_method

    flags = {name: getattr(args, name) for name in _METHOD_FLAGS}
    flags = {name: value for name, value in flags.items() if value is not None}
    if args.method_json is not None:
        if flags:
            raise MethodError("--method-json", "cannot be combined with single method flags")
        try:
            return parse_method(json.loads(args.method_json), "--method-json")
        except ValueError as exc:
            raise MethodError("--method-json", f"is not valid JSON ({exc})") from exc
    if not flags:
        return None
    block = current.to_json()
    if flags.get("kind", block["kind"]) != block["kind"]:
        block = {"normalization": block["normalization"], "self_loops": block["self_loops"]}
    block |= flags
    if "coefficients" in block:
        block["coefficients"] = list(block["coefficients"])
    return parse_method(block, "method")
