"""Engine: backend choice, fallback with re-probe backoff, registered topologies
(memory and disk), edge deltas, thread safety and per-call overhead."""

from __future__ import annotations

import ast
import dataclasses
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from dgdm.kernels.backends.base import Problem, RunOutput
from dgdm.kernels.backends.numpy_backend import NumpyBackend
from dgdm.kernels.backends.sparse_backend import SparseBackend
from dgdm.kernels.diffusion import diffuse
from dgdm.kernels.engine import Engine
from dgdm.kernels.errors import (
    BackendError,
    BackendUnavailable,
    GraphError,
    PrecisionExceeded,
    UnknownTopology,
)
from dgdm.kernels.graph import Graph, parse_graph_json
from dgdm.kernels.method import Method
from dgdm.kernels.operator import problem_for
from dgdm.kernels.registry import RegistryLimits

from .conftest import FIXTURES, geometric, graph_from_nx


class FlakyBackend:
    """A real backend (dense float64) that fails at run time while `broken` is set and
    refuses to probe while `unplugged` is set, like a USB Coral pulled out."""

    name = "flaky"

    def __init__(self) -> None:
        self.broken = False
        self.unplugged = False
        self.coarse = False
        self.runs = 0
        self.probes = 0

    def probe(self) -> None:
        self.probes += 1
        if self.unplugged:
            raise BackendUnavailable("the device is unplugged.")

    def load(self, problem: Problem) -> FlakyRunner:
        return FlakyRunner(self, NumpyBackend(dtype=np.float64).load(problem))


class FlakyRunner:
    backend = "flaky"

    def __init__(self, owner: FlakyBackend, inner) -> None:
        self.owner = owner
        self.inner = inner

    def run(self, x: np.ndarray) -> RunOutput:
        if self.owner.broken:
            raise RuntimeError("device vanished mid-invoke")
        if self.owner.coarse:
            raise PrecisionExceeded("this input needs a float backend")
        self.owner.runs += 1
        return self.inner.run(x)

    def close(self) -> None:
        self.inner.close()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def karate():
    return parse_graph_json((FIXTURES / "karate.json").read_bytes())


def expected_for(graph) -> np.ndarray:
    problem = problem_for(graph)
    return diffuse(problem.t, problem.method, graph.x)


def rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_diffuse_answers_with_the_result_fields(karate) -> None:
    engine = Engine()
    result = engine.diffuse(karate, backend="numpy")
    assert result.backend == "numpy"
    assert result.graph_id == "karate"
    assert result.node_ids == karate.node_ids
    assert result.embedding.dtype == np.float32
    assert result.embedding.shape == (34, 3)
    assert rel(result.embedding, expected_for(karate)) <= result.error_bound
    assert result.latency_ms > 0
    body = result.to_json()
    assert set(body) == {
        "job_id", "graph_id", "method", "backend", "latency_ms", "error_bound", "node_ids",
        "embedding",
    }  # fmt: skip
    assert json.loads(json.dumps(body))["method"]["kind"] == "ppr"


def test_status_lists_all_four_backends_with_reasons() -> None:
    engine = Engine()
    status = {s["name"]: s for s in engine.backends_status()}
    assert set(status) == {"numpy", "sparse", "tflite", "edgetpu"}
    assert status["numpy"]["available"]
    assert status["sparse"]["available"]
    for s in status.values():
        assert s["available"] or s["reason"]


def test_auto_prefers_dense_for_small_and_sparse_for_large_graphs() -> None:
    engine = Engine(backends=[NumpyBackend(), SparseBackend()])
    small = graph_from_nx(geometric(50, 1), np.ones((50, 2)), Method(k=10))
    large = graph_from_nx(geometric(3000, 1), np.ones((3000, 2)), Method(k=10))
    assert engine.diffuse(small).backend == "numpy"
    assert engine.diffuse(large).backend == "sparse"


def test_failing_backend_is_skipped_counted_and_reprobed_with_backoff(karate) -> None:
    flaky, clock = FlakyBackend(), Clock()
    engine = Engine(backends=[flaky, NumpyBackend()], clock=clock)
    assert engine.diffuse(karate).backend == "flaky"
    flaky.broken = True
    first = engine.diffuse(karate)
    assert (first.backend, first.fallbacks) == ("numpy", ("flaky",))
    assert rel(first.embedding, expected_for(karate)) <= first.error_bound
    status = {s["name"]: s for s in engine.backends_status()}
    assert status["flaky"]["failures"] == 1
    assert not status["flaky"]["healthy"]
    assert status["numpy"]["fallbacks"] == 1
    # Within the backoff the flaky backend is not even tried.
    assert engine.diffuse(karate).fallbacks == ()
    assert engine.stats()["failures"]["flaky"] == 1
    # After 1 s it is re-probed and tried again: still broken, so the backoff doubles.
    clock.now += 1.0
    assert engine.diffuse(karate).fallbacks == ("flaky",)
    assert engine.stats()["failures"]["flaky"] == 2
    clock.now += 1.5
    assert engine.diffuse(karate).fallbacks == ()
    # Repaired, but unplugged: the probe fails, so it stays out.
    flaky.broken, flaky.unplugged = False, True
    clock.now += 0.6
    assert engine.diffuse(karate).backend == "numpy"
    assert "unplugged" in {s["name"]: s for s in engine.backends_status()}["flaky"]["reason"]
    flaky.unplugged = False
    clock.now += 10.0
    back = engine.diffuse(karate)
    assert (back.backend, back.fallbacks) == ("flaky", ())
    assert engine.stats()["reprobes"] >= 3
    assert engine.active_backend() == "flaky"


def test_all_backends_failing_is_a_backend_error(karate) -> None:
    flaky = FlakyBackend()
    flaky.broken = True
    engine = Engine(backends=[flaky])
    with pytest.raises(BackendError, match="device vanished"):
        engine.diffuse(karate)


def test_excluded_backend_is_not_used(karate) -> None:
    engine = Engine(backends=[FlakyBackend(), NumpyBackend()])
    engine.set_excluded({"flaky"})
    assert engine.diffuse(karate).backend == "numpy"
    assert engine.diffuse(karate, backend="flaky").backend == "numpy"
    assert engine.active_backend() == "numpy"
    engine.set_excluded(())
    assert engine.diffuse(karate).backend == "flaky"


def test_unknown_backend_name_is_refused() -> None:
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        Engine(backend="gpu")


def test_registered_topology_diffuses_new_features(karate) -> None:
    engine = Engine(backend="numpy")
    graph_id = engine.register(karate)
    assert graph_id == "karate"
    x = np.random.default_rng(0).random((34, 16))
    result = engine.diffuse_registered(graph_id, x)
    problem = problem_for(karate)
    assert rel(result.embedding, diffuse(problem.t, problem.method, x)) <= result.error_bound
    assert engine.topologies()[0]["nodes"] == 34
    with pytest.raises(GraphError, match="shape"):
        engine.diffuse_registered(graph_id, np.ones((33, 2)))
    with pytest.raises(GraphError, match="finite"):
        engine.diffuse_registered(graph_id, np.full((34, 2), np.nan))
    engine.unregister(graph_id)
    with pytest.raises(UnknownTopology):
        engine.diffuse_registered(graph_id, x)


def test_registry_survives_a_restart_from_disk(tmp_path: Path, karate) -> None:
    Engine(cache_dir=tmp_path, backends=[NumpyBackend()]).register(karate)
    files = list((tmp_path / "topologies").glob("*.npz"))
    assert len(files) == 1
    engine = Engine(cache_dir=tmp_path, backends=[NumpyBackend()])
    assert [t["graph_id"] for t in engine.topologies()] == ["karate"]
    result = engine.diffuse_registered("karate", karate.x)
    assert rel(result.embedding, expected_for(karate)) <= result.error_bound
    engine.unregister("karate")
    assert not list((tmp_path / "topologies").glob("*.npz"))


def test_registered_feature_width_is_kept_across_patch_and_restart(tmp_path: Path, karate) -> None:
    """The width a topology was registered with (SPEC §4.1 OIP metadata); None without."""
    engine = Engine(cache_dir=tmp_path, backends=[NumpyBackend()])
    engine.register(karate)
    engine.register(dataclasses.replace(karate, graph_id="bare", x=np.zeros((34, 0))))
    engine.update_edges("karate", add=[(0, 5)])
    widths = {t["graph_id"]: t["features"] for t in engine.topologies()}
    assert widths == {"karate": karate.x.shape[1], "bare": None}
    again = Engine(cache_dir=tmp_path, backends=[NumpyBackend()])
    assert {t["graph_id"]: t["features"] for t in again.topologies()} == widths


def test_edge_deltas_build_a_new_operator(tmp_path: Path) -> None:
    text = (FIXTURES / "triangle_directed.json").read_text()
    graph = parse_graph_json(text)
    engine = Engine(cache_dir=tmp_path, backends=[NumpyBackend(dtype=np.float64)])
    engine.register(graph)
    before = engine.topologies()[0]
    after = engine.update_edges(
        "triangle-directed",
        add=[{"source": "a", "target": "c", "weight": 0.5}, ("b", "a")],
        remove=[{"source": "b", "target": "c"}],
        reweight=[["c", "a", 3.0]],
    )
    assert after["key"] != before["key"]
    body = json.loads(text)
    body["edges"] = [
        {"source": "a", "target": "b", "weight": 0.8},
        {"source": "c", "target": "a", "weight": 3.0},
        {"source": "a", "target": "c", "weight": 0.5},
        {"source": "b", "target": "a"},
    ]
    expected = parse_graph_json(json.dumps(body))
    result = engine.diffuse_registered("triangle-directed", graph.x)
    assert rel(result.embedding, expected_for(expected)) <= 1e-6
    assert len(list((tmp_path / "topologies").glob("*.npz"))) == 1
    for bad, field in [
        ({"remove": [("b", "c")]}, "remove[0]"),
        ({"add": [("a", "zz")]}, "add[0].target"),
        ({"reweight": [("a", "b", -1)]}, "reweight[0].weight"),
        ({"add": ["ab"]}, "add[0]"),
        # graph.py's own edge checks: the same fields and sentences as a graph body's edges
        ({"add": [{"source": "a", "target": "b", "zeta": 1, "colour": 2}]}, "add[0].colour"),
        ({"remove": [(True, "b")]}, "remove[0].source"),
    ]:
        with pytest.raises(GraphError) as info:
            engine.update_edges("triangle-directed", **bad)
        assert info.value.field == field
    with pytest.raises(GraphError, match="must be a node id"):
        engine.update_edges("triangle-directed", add=[("a", 1.5)])


def test_undirected_deltas_touch_both_directions(karate) -> None:
    engine = Engine(backends=[NumpyBackend(dtype=np.float64)])
    engine.register(karate)
    engine.update_edges("karate", remove=[(0, 1)], add=[(5, 20, 2.0)])
    a = engine._topologies["karate"].adjacency.toarray()
    assert a[0, 1] == a[1, 0] == 0
    assert a[5, 20] == a[20, 5] == 2.0


def test_concurrent_callers_get_correct_answers(karate) -> None:
    engine = Engine(backends=[SparseBackend(), NumpyBackend()])
    engine.register(karate)
    problem = problem_for(karate)
    errors: list[float] = []

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(30):
            x = rng.random((34, 4))
            z = engine.diffuse_registered("karate", x).embedding
            errors.append(rel(z, diffuse(problem.t, problem.method, x)))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 180
    assert max(errors) < 1e-5
    assert engine.stats()["diffusions"] == 180


def test_registered_call_overhead_is_small() -> None:
    """The public API adds little to the runner's own P @ X (interleaved medians)."""
    graph = graph_from_nx(geometric(1000, 2), np.ones((1000, 16)), Method(k=10))
    engine = Engine(backend="numpy")
    graph_id = engine.register(graph)
    x = np.random.default_rng(0).random((1000, 16)).astype(np.float32)
    engine.diffuse_registered(graph_id, x)
    runner = NumpyBackend().load(problem_for(graph))
    api, raw = [], []
    for _ in range(60):
        start = time.perf_counter()
        engine.diffuse_registered(graph_id, x)
        api.append(time.perf_counter() - start)
        start = time.perf_counter()
        runner.run(x)
        raw.append(time.perf_counter() - start)
    assert np.median(api) < 2.0 * np.median(raw) + 0.0002


def test_a_graph_without_features_is_refused_not_counted() -> None:
    engine = Engine(backends=[NumpyBackend()])
    graph = graph_from_nx(geometric(20, 1))
    with pytest.raises(GraphError) as info:
        engine.diffuse(graph)
    assert info.value.field == "features"
    assert engine.stats()["failures"] == {"numpy": 0}


def test_backend_missing_at_start_is_picked_up_when_it_appears(karate) -> None:
    """Like a Coral plugged in after the agent started: re-probed with backoff, then used."""
    flaky, clock = FlakyBackend(), Clock()
    flaky.unplugged = True
    engine = Engine(backends=[flaky, NumpyBackend()], clock=clock)
    assert not engine.backends_status()[0]["available"]
    assert engine.diffuse(karate).backend == "numpy"
    flaky.unplugged = False
    assert engine.diffuse(karate).backend == "numpy"  # backoff not over yet
    clock.now += 1.0
    assert engine.diffuse(karate).backend == "flaky"
    assert engine.backends_status()[0]["available"]


def test_precision_refusal_moves_on_without_marking_the_backend_unhealthy(karate) -> None:
    flaky = FlakyBackend()
    flaky.coarse = True
    engine = Engine(backends=[flaky, NumpyBackend()])
    result = engine.diffuse(karate)
    assert (result.backend, result.fallbacks) == ("numpy", ())
    stats = engine.stats()
    assert stats["failures"]["flaky"] == 0
    assert stats["precision_skips"] == 1
    flaky.coarse = False
    assert engine.diffuse(karate).backend == "flaky"


def test_close_releases_runners_and_keeps_topologies(karate) -> None:
    engine = Engine(backends=[NumpyBackend()])
    engine.register(karate)
    engine.diffuse_registered("karate", karate.x)
    engine.close()
    assert engine.topologies()[0]["graph_id"] == "karate"
    result = engine.diffuse_registered("karate", karate.x)  # rebuilt on demand
    assert rel(result.embedding, expected_for(karate)) <= result.error_bound


class CountingBackend(NumpyBackend):
    """The real dense backend, counting how often a runner is built."""

    def __init__(self, name: str = "numpy") -> None:
        super().__init__()
        self.name = name
        self.loads = 0

    def load(self, problem: Problem):
        self.loads += 1
        return super().load(problem)


def test_a_repeated_one_off_topology_builds_nothing(karate, monkeypatch) -> None:
    from dgdm.kernels import engine as engine_module

    backend = CountingBackend()
    engine = Engine(backends=[backend])
    builds = []
    real = engine_module.problem_for
    monkeypatch.setattr(
        engine_module, "problem_for", lambda *a, **k: builds.append(1) or real(*a, **k)
    )
    x = np.random.default_rng(1).random(karate.x.shape)
    first = engine.diffuse(karate)
    again = engine.diffuse(Graph(karate.node_ids, karate.adjacency.copy(), x, False, None))
    assert (len(builds), backend.loads) == (1, 1)
    assert (
        rel(again.embedding, diffuse(problem_for(karate).t, karate.method, x)) <= again.error_bound
    )
    assert first.backend == again.backend == "numpy"


def test_one_off_graphs_first_run_on_the_cpu_then_int8_once_repeated(tmp_path) -> None:
    """An int8 model costs ~20 ms to build: never for a graph seen once."""
    from dgdm.kernels.backends.tflite_backend import TFLiteBackend

    graph = graph_from_nx(geometric(600, 3), np.random.default_rng(3).random((600, 16)))
    engine = Engine(backends=[TFLiteBackend(tmp_path), NumpyBackend()])
    assert engine.diffuse(graph).backend == "numpy"
    assert not list(tmp_path.glob("*.tflite"))
    assert engine.diffuse(graph).backend == "tflite"
    assert engine.diffuse(graph, backend="numpy").backend == "numpy"


def test_small_repeated_graphs_stay_on_dense_numpy(tmp_path) -> None:
    """Below a few hundred nodes int8's fixed per-call cost (~0.2 ms) outweighs its GEMM."""
    from dgdm.kernels.backends.tflite_backend import TFLiteBackend

    graph = graph_from_nx(geometric(100, 3), np.random.default_rng(3).random((100, 16)))
    engine = Engine(backends=[TFLiteBackend(tmp_path), NumpyBackend()])
    assert [engine.diffuse(graph).backend for _ in range(3)] == ["numpy"] * 3
    assert engine.diffuse(graph, backend="tflite").backend == "tflite"


def test_diffuse_ready_only_answers_what_needs_no_build(karate) -> None:
    backend = CountingBackend()
    engine = Engine(backends=[backend])
    assert engine.diffuse_ready(karate) is None
    assert (backend.loads, engine.stats()["diffusions"]) == (0, 0)
    engine.diffuse(karate)
    assert engine.diffuse_ready(karate, max_ms=0.0) is None  # its measured run is longer
    ready = engine.diffuse_ready(karate)
    assert ready is not None
    assert ready.backend == "numpy"
    assert rel(ready.embedding, expected_for(karate)) <= ready.error_bound
    assert (backend.loads, engine.stats()["diffusions"]) == (1, 2)


def test_active_backend_before_any_call_is_the_configured_one() -> None:
    assert Engine(backend="numpy").active_backend() == "numpy"
    assert Engine(backend="sparse").active_backend() == "sparse"
    engine = Engine(backend="numpy", backends=[CountingBackend("fast"), CountingBackend()])
    assert engine.active_backend() == "numpy"
    assert Engine(backends=[CountingBackend("fast"), CountingBackend()]).active_backend() == "fast"


def test_engine_start_imports_no_tflite_or_scipy_linalg() -> None:
    """~20 MB an agent serving small graphs on numpy never needs (they load on first use).
    Some scipy releases (1.15 on Python 3.10) load csgraph and the linalgs from `import
    scipy.sparse` itself; what a bare import of scipy.sparse loads is not the engine's doing."""
    heavy = (
        "ai_edge_litert",
        "tflite_runtime",
        "tflite",
        "scipy.linalg",
        "scipy.sparse.linalg",
        "scipy.sparse.csgraph",
    )
    loaded = f"[m for m in {heavy!r} if m in sys.modules]"
    bare = subprocess.run(
        [sys.executable, "-c", f"import sys, scipy.sparse; print({loaded})"],
        capture_output=True,
        text=True,
        check=True,
    )
    code = (
        "import sys; from dgdm.kernels.engine import Engine; e = Engine(); "
        "s = {b['name']: b['available'] for b in e.backends_status()}; "
        f"print({loaded}, s['tflite'], s['sparse'])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    by_scipy = set(ast.literal_eval(bare.stdout.strip()))
    engine_loaded, tflite, sparse = out.stdout.strip().rsplit(" ", 2)
    assert sorted(set(ast.literal_eval(engine_loaded)) - by_scipy) == []
    assert (tflite, sparse) == ("True", "True")


def test_registry_limits_hold_under_concurrent_registrations(tmp_path: Path, karate) -> None:
    engine = Engine(
        cache_dir=tmp_path, backends=[NumpyBackend()], registry=RegistryLimits(max_topologies=3)
    )
    refused: list[str] = []

    def register(i: int) -> None:
        graph = Graph(karate.node_ids, karate.adjacency * (1.0 + i), karate.x, False, f"g{i}")
        try:
            engine.register(graph)
        except GraphError as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=register, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(engine.topologies()) == 3
    assert len(refused) == 9
    assert all("kernels.max_topologies (3)" in reason for reason in refused)
    # No file is left behind by a refused registration, and the index names only the three.
    assert len(list((tmp_path / "topologies").glob("*.npz"))) == 3
    index = json.loads((tmp_path / "topologies" / "index.json").read_text())
    assert sorted(index) == sorted(t["graph_id"] for t in engine.topologies())


def test_registry_bytes_cap_counts_a_replacement_once(karate) -> None:
    probe = Engine(backends=[NumpyBackend()])
    probe.register(karate)
    size = probe._topologies["karate"].nbytes
    engine = Engine(backends=[NumpyBackend()], registry=RegistryLimits(max_bytes=size + size // 2))
    engine.register(karate)
    engine.register(karate)  # the same id again: replaces, fits
    other = Graph(karate.node_ids, karate.adjacency * 2.0, karate.x, False, "other")
    with pytest.raises(GraphError, match=r"kernels.max_topology_bytes"):
        engine.register(other)


def test_a_failing_backend_stays_failing_until_it_answers(karate) -> None:
    flaky, clock = FlakyBackend(), Clock()
    engine = Engine(backends=[flaky, NumpyBackend()], clock=clock)
    flaky.broken = True
    engine.diffuse(karate)
    status = {s["name"]: s for s in engine.backends_status()}["flaky"]
    assert status["failing"]
    assert status["last_error"]
    clock.now += 1.0
    flaky.broken = False
    engine.diffuse(karate)  # the re-probe passed and the run works: no longer failing
    assert not {s["name"]: s for s in engine.backends_status()}["flaky"]["failing"]
