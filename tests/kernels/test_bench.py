"""`dgdm bench kernels` smoke test: a tiny run produces medians for each backend asked."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from dgdm.kernels import bench


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_tiny_run_reports_medians(tmp_path, capsys) -> None:
    out = tmp_path / "rows.json"
    args = parse(
        "--sizes", "60", "--features", "4", "--repeats", "2", "--backends", "numpy,sparse",
        "--json", str(out), "--no-baselines",
    )  # fmt: skip
    assert bench.main(args) == 0
    rows = json.loads(out.read_text())
    impls = {r["impl"] for r in rows}
    assert {"numpy", "sparse"} <= impls
    assert all(r["median_ms"] > 0 for r in rows if r["impl"] in ("numpy", "sparse"))
    text = capsys.readouterr().out
    assert "N = 60" in text
    assert "ratios" in text
    assert text.count("load average") == 2  # start and end: how noisy the figures are


def test_random_geometric_has_the_asked_average_degree() -> None:
    rows, cols = bench.random_geometric(5000, avg_degree=8.0, seed=1)
    assert 2 * len(rows) / 5000 == pytest.approx(8.0, rel=0.1)
    assert np.all(rows != cols)


def test_bad_sizes_are_a_usage_error() -> None:
    with pytest.raises(SystemExit):
        parse("--sizes", "ten")


def test_run_with_baselines(capsys) -> None:
    """networkx always (a test dependency); PyG APPNP too when torch_geometric imports."""
    rows = bench._bench_size(80, parse("--features", "4", "--backends", "sparse"), repeats=2)
    impls = {r["impl"] for r in rows}
    assert {"networkx", "sparse"} <= impls
    assert all(r["median_ms"] > 0 for r in rows)
    assert "networkx" in capsys.readouterr().out
