"""`dgdm bench kernels`: median time per diffusion through the public Engine API.

Random geometric graphs (unit square, average degree ~8), ppr with k = 10, F = 16 and 64,
every backend present, single thread; in the same run the baselines a user would reach for:
networkx.pagerank (one vector) and PyTorch Geometric's APPNP propagation (K = 10, sparse
adjacency) when torch/torch_geometric import (the optional extra `bench`). With the compiled
extension, also: `sparse-steps`, the sparse series one compiled product per step (what the
fused wavefront replaced, the same float32 numbers), `sparse-values`, the fused series reading
T's values where `sparse` reads the compact operator (pattern + scale, sym normalisation of
an unweighted graph), and from 10,000 nodes `sparse-mt`, the fused series on `--threads`
threads (default: the CPUs the process may use). The variants call the backend's runner
directly, without the public API's per-call work (~0.1 ms at 10,000 nodes), so against
`sparse` they look that much faster.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

from dgdm.kernels import blas

DEFAULT_SIZES = (100, 1_000, 10_000, 100_000)
QUICK_SIZES = (100, 1_000)
BACKEND_ORDER = ("numpy", "sparse", "tflite", "edgetpu")
# ratios also against these (same run, our own baselines)
VARIANTS = ("sparse-steps", "sparse-values")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sizes",
        type=_int_list,
        default=None,
        help="node counts, e.g. 100,1000 (default: 100,1000,10000,100000)",
    )
    parser.add_argument("--features", type=_int_list, default=(16, 64), help="e.g. 16,64")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per case")
    parser.add_argument("--k", type=int, default=10, help="ppr series length")
    parser.add_argument("--backends", type=_str_list, default=None, help="e.g. sparse,numpy")
    parser.add_argument("--no-baselines", action="store_true", help="skip networkx and PyG")
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument("--json", dest="json_out", metavar="FILE", help="also write rows here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=0, help="sparse-mt's threads (0: the usable CPUs)"
    )


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("give positive integers")
    return values


def _str_list(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def main(args: argparse.Namespace) -> int:
    _single_thread()
    from dgdm.kernels import threads as kernel_threads

    mt_threads = args.threads or kernel_threads.available()
    kernel_threads.configure(1)
    sizes = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    repeats = args.repeats or (5 if args.quick else 20)
    rows: list[dict[str, Any]] = []
    print(
        f"dgdm bench kernels: ppr k={args.k}, random geometric graphs (avg degree ~8), "
        f"1 thread, median of {repeats}; {_load_note()}"
    )
    for n in sizes:
        rows += _bench_size(n, args, repeats, mt_threads)
    _print_ratios(rows)
    print(f"at the end: {_load_note()}")
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
    return 0


def _load_note() -> str:
    """The machine's load: on a shared host absolute times inflate with it, while ratios
    (every implementation timed round-robin in the same rounds) stay comparable."""
    try:
        one_minute = os.getloadavg()[0]
    except (AttributeError, OSError):  # not every platform has a load average
        return "load average unknown"
    return f"load average {one_minute:.2f} on {os.cpu_count()} CPUs"


def _single_thread() -> None:
    """One thread for BLAS/OpenMP (env before the libraries load; threadpoolctl if present)."""
    for var in blas.THREAD_VARS:
        os.environ[var] = "1"
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        if "numpy" in sys.modules:  # BLAS read the variables when numpy loaded
            print(
                "note: numpy was loaded before the bench, so its BLAS thread count may not "
                "be 1; run with OMP_NUM_THREADS=1 (or install threadpoolctl)"
            )
        return
    threadpool_limits(1)


def random_geometric(n: int, avg_degree: float = 8.0, seed: int = 0) -> Any:
    """(rows, cols) of an undirected random geometric graph in the unit square."""
    import numpy as np
    from scipy.spatial import cKDTree

    points = np.random.default_rng(seed).random((n, 2))
    radius = (avg_degree / (np.pi * n)) ** 0.5
    pairs = cKDTree(points).query_pairs(radius, output_type="ndarray")
    return pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64)


def _bench_size(
    n: int, args: argparse.Namespace, repeats: int, mt_threads: int = 1
) -> list[dict[str, Any]]:
    """All implementations for one N, timed round-robin so machine load hits them alike."""
    import numpy as np

    from dgdm.kernels.engine import Engine
    from dgdm.kernels.graph import Graph, build_adjacency
    from dgdm.kernels.method import Method

    rows, cols = random_geometric(n, seed=args.seed)
    adjacency = build_adjacency(n, rows, cols, np.ones(len(rows)), directed=False)
    method = Method(kind="ppr", alpha=0.15, k=args.k)
    graph = Graph(tuple(range(n)), adjacency, np.zeros((n, 0)), False, f"rgg-{n}", method)
    engine = Engine()
    graph_id = engine.register(graph)
    available = {s["name"] for s in engine.backends_status() if s["available"]}
    wanted = [b for b in (args.backends or BACKEND_ORDER) if b in available]
    print(f"\nN = {n:,} ({adjacency.nnz // 2:,} edges)")
    out: list[dict[str, Any]] = []
    if not args.no_baselines:
        nx_ms = _networkx_ms(n, rows, cols, 1 if n >= 10_000 else min(repeats, 5))
        if nx_ms is not None:
            print(f"  {'networkx':<9} {nx_ms:10.3f} ms   (pagerank, one vector, any F)")
            out += [{"n": n, "f": f, "impl": "networkx", "median_ms": nx_ms} for f in args.features]
    for f in args.features:
        x = np.random.default_rng(f).random((n, f)).astype(np.float32)
        calls: dict[str, Callable[[], Any]] = {}
        for name in wanted:
            call = _engine_call(engine, graph_id, x, name)
            if call is not None:
                calls[name] = call
        if "sparse" in calls:
            calls.update(_sparse_variants(graph, x, mt_threads))
        if not args.no_baselines:
            pyg = _pyg_call(n, rows, cols, x, k=args.k)
            if pyg is not None:
                calls["pyg_appnp"] = pyg
        for impl, median in _round_robin(calls, repeats).items():
            print(f"  F={f:<3} {impl:<12} {median:10.3f} ms")
            out.append({"n": n, "f": f, "impl": impl, "median_ms": median})
    return out


def _engine_call(engine: Any, graph_id: str, x: Any, name: str) -> Callable[[], Any] | None:
    """The public-API call for one backend, after a first call that builds its runner."""
    from dgdm.kernels.errors import KernelError

    f = x.shape[1]
    start = time.perf_counter()
    try:
        first = engine.diffuse_registered(graph_id, x, backend=name)
    except KernelError as exc:
        print(f"  F={f:<3} {name:<9} failed: {exc}")
        return None
    if first.backend != name:
        print(f"  F={f:<3} {name:<9} not usable for this graph (answered by {first.backend})")
        return None
    build_ms = (time.perf_counter() - start) * 1000
    print(
        f"  F={f:<3} {name:<9} first call (builds) {build_ms:.1f} ms, "
        f"error bound {first.error_bound:.1e}"
    )
    return lambda: engine.diffuse_registered(graph_id, x, backend=name)


def _sparse_variants(graph: Any, x: Any, mt_threads: int) -> dict[str, Callable[[], Any]]:
    """The compiled sparse series step by step, fused with T's values where the backend has
    the compact operator, and fused on several threads (N >= 10,000)."""
    from dgdm.kernels import threads as kernel_threads
    from dgdm.kernels.backends import sparse_backend
    from dgdm.kernels.diffusion import series_coefficients
    from dgdm.kernels.operator import problem_for

    coeffs = series_coefficients(graph.method)
    if sparse_backend._spmm is None or coeffs is None:
        return {}
    t = problem_for(graph).t
    steps = sparse_backend.SeriesRunner(t, coeffs, reorder=True, compiled=True, fuse=False)
    calls: dict[str, Callable[[], Any]] = {"sparse-steps": lambda: steps.run(x)}
    fused = sparse_backend.SeriesRunner(t, coeffs, reorder=True, compiled=True)
    if fused._scale is not None:
        values = sparse_backend.SeriesRunner(t, coeffs, reorder=True, compiled=True, compact=False)
        calls["sparse-values"] = lambda: values.run(x)
    if mt_threads > 1 and t.shape[0] >= sparse_backend.THREADS_MIN_NODES:

        def threaded() -> Any:
            kernel_threads.configure(mt_threads)
            try:
                return fused.run(x)
            finally:
                kernel_threads.configure(1)

        calls[f"sparse-mt{mt_threads}"] = threaded
    return calls


def _round_robin(calls: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median ms per implementation; each round calls every implementation once."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1000 for name, t in times.items()}


def _median_ms(call: Callable[[], Any], repeats: int) -> float:
    return _round_robin({"call": call}, repeats)["call"]


def _networkx_ms(n: int, rows: Any, cols: Any, repeats: int) -> float | None:
    try:
        import networkx as nx
    except ImportError:
        return None
    g = nx.Graph()
    g.add_nodes_from(range(n))
    g.add_edges_from(zip(rows.tolist(), cols.tolist(), strict=True))
    return _median_ms(lambda: nx.pagerank(g, alpha=0.85), repeats)


def _pyg_call(n: int, rows: Any, cols: Any, x: Any, *, k: int) -> Callable[[], Any] | None:
    """PyG's APPNP propagation (K steps, cached gcn normalisation, CSR adjacency)."""
    try:
        with warnings.catch_warnings():  # deprecation notices from torch/PyG internals
            warnings.simplefilter("ignore")
            import torch
            from torch_geometric.nn import APPNP
            from torch_geometric.utils import to_torch_csr_tensor
    except ImportError:
        return None
    torch.set_num_threads(1)
    src = torch.from_numpy(rows)
    dst = torch.from_numpy(cols)
    edge_index = torch.stack([torch.cat([src, dst]), torch.cat([dst, src])])
    with warnings.catch_warnings():  # torch's "sparse CSR is beta" notices
        warnings.simplefilter("ignore", UserWarning)
        adj = to_torch_csr_tensor(edge_index, size=(n, n))
    prop = APPNP(K=k, alpha=0.15, cached=True)
    features = torch.from_numpy(x)

    def call() -> Any:
        with torch.no_grad():
            return prop(features, adj)

    call()  # builds and caches the normalised adjacency
    return call


def _print_ratios(rows: list[dict[str, Any]]) -> None:
    """Speed-up of our best backend over each baseline (baseline time / ours)."""
    cases = sorted({(r["n"], r["f"]) for r in rows})
    print("\nratios (baseline / ours; > 1 means dgdm is faster)")
    for n, f in cases:
        here = [r for r in rows if (r["n"], r["f"]) == (n, f) and r.get("median_ms")]
        ours = [r for r in here if r["impl"] in BACKEND_ORDER]
        if not ours:
            continue
        best = min(ours, key=lambda r: r["median_ms"])
        exact = [r for r in ours if r["impl"] in ("numpy", "sparse")]
        best_float = min(exact, key=lambda r: r["median_ms"]) if exact else best
        parts = []
        for base in (r for r in here if r["impl"] in ("networkx", "pyg_appnp", *VARIANTS)):
            parts.append(
                f"{base['impl']} / {best['impl']} = {base['median_ms'] / best['median_ms']:.1f}x"
            )
            if best_float is not best:
                ratio = base["median_ms"] / best_float["median_ms"]
                parts.append(f"{base['impl']} / {best_float['impl']} = {ratio:.1f}x")
        sparse = [r for r in here if r["impl"] == "sparse"]
        for mt in (r for r in here if r["impl"].startswith("sparse-mt") and sparse):
            ratio = sparse[0]["median_ms"] / mt["median_ms"]
            parts.append(f"sparse / {mt['impl']} = {ratio:.2f}x")
        if parts:
            print(f"  N={n:<7,} F={f:<3} " + ", ".join(parts))
