"""The diffusion engine: backends chosen by config or cost, fallback, registered topologies.

Thread-safe: the agent calls it from worker threads. One `RLock` guards the small shared
state (registry, backend health, runner cache); the numerics run outside it, each cached
runner behind its own lock (runners own buffers, TFLite interpreters are single-threaded).

Fallback: a backend that raises at load or run time is marked unhealthy, counted, and
skipped; the call goes on with the next backend in order. An unhealthy or unavailable
backend is re-probed when its backoff (1 s doubling to 60 s) has passed; `probe()`
succeeding puts it back in the rotation, a successful run resets its backoff.

Bounds (`EngineBounds`): before a backend builds or runs anything, its working memory for
this problem and F is estimated (`work_bytes`); a backend over `max_diffusion_bytes` is
skipped, and when every one is, the call is refused (GraphError, 413) before any work. The
caches of runners and one-off problems are bounded by their estimated bytes together
(`cache_bytes`), least recently used first out. A diffusion past its deadline
(`dgdm.kernels.deadline`) ends with DeadlineExceeded, which is never a backend failure.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import math
import os
import re
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from dgdm.kernels import deadline
from dgdm.kernels.backends.base import Backend, Problem, Runner, RunOutput
from dgdm.kernels.diffusion import FLOAT32_UNIT, PPR_RTOL, series_coefficients
from dgdm.kernels.errors import (
    BackendError,
    BackendUnavailable,
    DeadlineExceeded,
    GraphError,
    KernelError,
    PrecisionExceeded,
    UnknownTopology,
)
from dgdm.kernels.graph import Graph, Limits, NodeId, build_adjacency, parse_weight
from dgdm.kernels.method import Method, parse_method
from dgdm.kernels.operator import problem_for, problem_key

log = logging.getLogger(__name__)

BACKEND_NAMES = ("edgetpu", "tflite", "numpy", "sparse")
_BACKEND_CLASSES = {
    "numpy": ("dgdm.kernels.backends.numpy_backend", "NumpyBackend"),
    "sparse": ("dgdm.kernels.backends.sparse_backend", "SparseBackend"),
    "tflite": ("dgdm.kernels.backends.tflite_backend", "TFLiteBackend"),
    "edgetpu": ("dgdm.kernels.backends.edgetpu_backend", "EdgeTPUBackend"),
}
_WITH_CACHE_DIR = frozenset({"tflite", "edgetpu"})
FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 60.0
MAX_RUNNERS = 32
MAX_PROBLEMS = 64  # one-off topologies whose operator (and runners) are kept, LRU
MIB = 1 << 20
_SAFE_ID = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class DiffusionResult:
    job_id: str
    graph_id: str | None
    method: Method
    backend: str
    latency_ms: float
    error_bound: float
    node_ids: tuple[NodeId, ...]
    embedding: np.ndarray
    fallbacks: tuple[str, ...] = ()  # backends that failed before `backend` answered

    def to_json(self) -> dict[str, Any]:
        """The HTTP / CLI answer (embedding as nested lists)."""
        return {
            "job_id": self.job_id,
            "graph_id": self.graph_id,
            "method": self.method.to_json(),
            "backend": self.backend,
            "latency_ms": self.latency_ms,
            "error_bound": self.error_bound,
            "node_ids": list(self.node_ids),
            "embedding": self.embedding.tolist(),
        }


@dataclass
class _Slot:
    """One backend and what the engine knows about its health."""

    name: str
    backend: Backend | None
    available: bool
    reason: str
    healthy: bool = True
    failures: int = 0
    fallbacks: int = 0
    # Its last run failed (a re-probe makes it eligible again; only a run clears this).
    failing: bool = False
    last_error: str = ""
    backoff: float = FIRST_BACKOFF_S
    next_probe: float = 0.0

    @property
    def eligible(self) -> bool:
        return self.backend is not None and self.available and self.healthy


@dataclass
class _Topology:
    graph_id: str
    node_ids: tuple[NodeId, ...]
    adjacency: sp.csr_matrix
    directed: bool
    problem: Problem
    # F of the features it was registered with (None: none); OIP metadata shows it (§4.1).
    features: int | None = None

    @property
    def nbytes(self) -> int:
        """What it holds in memory (A and T in CSR, the node ids); its file is about half."""
        arrays = (self.adjacency, self.problem.t)
        csr = sum(a.data.nbytes + a.indices.nbytes + a.indptr.nbytes for a in arrays)
        return int(csr) + len(json.dumps(list(self.node_ids)))

    def describe(self) -> dict[str, Any]:
        return {
            "graph_id": self.graph_id,
            "key": self.problem.key,
            "nodes": len(self.node_ids),
            "edges": int(self.adjacency.nnz),
            "directed": self.directed,
            "method": self.problem.method.to_json(),
            "features": self.features,
        }


@dataclass(frozen=True)
class EngineBounds:
    """Memory bounds, named as the agent's config keys (kernels.*). None: unbounded."""

    max_diffusion_bytes: int | None = 768 * MIB
    cache_bytes: int | None = 256 * MIB


@dataclass
class _Loaded:
    runner: Runner
    nbytes: int = 0  # estimated, for the cache's byte bound
    lock: threading.Lock = field(default_factory=threading.Lock)
    # The fastest run seen, per feature column: a runner's cost for its fixed N is steady,
    # only a preempted run is slower, and one such run must not make it look expensive.
    ms_per_feature: float = math.inf

    def run(self, x: np.ndarray) -> RunOutput:
        """Run (the caller holds `lock`) and remember how long it took."""
        start = time.perf_counter()
        out = self.runner.run(x)
        ms = (time.perf_counter() - start) * 1000.0 / max(x.shape[1], 1)
        self.ms_per_feature = min(self.ms_per_feature, ms)
        return out


class Engine:
    """Runs diffusions on the best available backend; see the module docstring."""

    def __init__(
        self,
        backend: str = "auto",
        cache_dir: Path | None = None,
        limits: Limits | None = None,
        *,
        backends: Sequence[Backend] | None = None,
        clock: Callable[[], float] = time.monotonic,
        registry: RegistryLimits | None = None,
        bounds: EngineBounds | None = None,
    ) -> None:
        self.limits = limits or Limits()
        self.registry = registry or RegistryLimits()
        self.bounds = bounds or EngineBounds()
        self._cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._clock = clock
        self._lock = threading.RLock()
        now = clock()
        self._slots = _discover(self._cache_dir, now) if backends is None else _given(backends, now)
        self._default = self._check_name(backend)
        self._excluded: frozenset[str] = frozenset()
        self._runners: OrderedDict[tuple[str, str], _Loaded] = OrderedDict()
        self._topologies: dict[str, _Topology] = {}
        # Cached topologies left unloaded at start-up (over the limits): graph_id -> key.
        # They stay in the index and on disk, for a restart with larger limits.
        self._unloaded: dict[str, str] = {}
        self._problems: OrderedDict[str, Problem] = OrderedDict()
        self._counts = {"diffusions": 0, "reprobes": 0, "precision_skips": 0}
        self._orders: dict[tuple[str, str], tuple[int, list[_Slot]]] = {}
        self._version = 0  # bumped on every health or exclusion change
        self._last_backend: str | None = None
        self._load_registry()

    # -- diffusion -------------------------------------------------------------------------

    def diffuse(self, graph: Graph, backend: str | None = None) -> DiffusionResult:
        """One-off diffusion of a parsed graph. Its Problem and runners stay cached by
        topology + method key, so a topology sent again builds nothing."""
        problem, seen = self._problem(graph)
        return self._run(problem, graph.x, graph.graph_id, graph.node_ids, backend, seen=seen)

    def _problem(self, graph: Graph) -> tuple[Problem, bool]:
        """The graph's Problem and whether it was seen before (cached or registered)."""
        key = problem_key(graph.adjacency, graph.method)
        known = self._known_problem(key)
        if known is not None:
            return known, True
        problem = problem_for(graph, key=key)  # builds T: outside the lock
        with self._lock:
            self._problems[key] = problem
            evicted = self._trim_caches()
        _close_all(evicted)
        return problem, False

    def _trim_caches(self) -> list[_Loaded]:
        """Evict (under the lock) least recently used runners, then one-off problems (and
        their runners), until both fit MAX_RUNNERS / MAX_PROBLEMS and together fit
        `cache_bytes`; the newest entry of each stays. Returns the runners to close."""
        evicted: list[_Loaded] = []
        budget = self.bounds.cache_bytes
        used = sum(e.nbytes for e in self._runners.values()) + sum(
            _csr_bytes(p.t) for p in self._problems.values()
        )
        while len(self._runners) > MAX_RUNNERS or (
            budget is not None and used > budget and len(self._runners) > 1
        ):
            entry = self._runners.popitem(last=False)[1]
            used -= entry.nbytes
            evicted.append(entry)
        while len(self._problems) > MAX_PROBLEMS or (
            budget is not None and used > budget and len(self._problems) > 1
        ):
            old, problem = self._problems.popitem(last=False)
            used -= _csr_bytes(problem.t)
            if not any(t.problem.key == old for t in self._topologies.values()):
                evicted += self._pop_runners(old)
        return evicted

    def _known_problem(self, key: str) -> Problem | None:
        with self._lock:
            problem = self._problems.get(key)
            if problem is not None:
                self._problems.move_to_end(key)
                return problem
            for topology in self._topologies.values():
                if topology.problem.key == key:
                    return topology.problem
        return None

    def diffuse_ready(
        self, graph: Graph, backend: str | None = None, *, max_ms: float = 1.0
    ) -> DiffusionResult | None:
        """`diffuse`, but only when it is quick: the topology was seen before, the backend
        it would use has its runner loaded and free, and that runner's fastest measured run
        scaled to this F takes at most `max_ms`. Otherwise None, with nothing built, waited
        for or counted; the caller then uses `diffuse` where waiting is fine. Lets the agent
        answer a small repeated graph without a thread hop (which costs more than the
        diffusion). A runner failing here is recorded like in `diffuse`, and None returned."""
        found = self._ready_runner(graph, backend, max_ms)
        if found is None:
            return None
        problem, slot, loaded = found  # loaded.lock is held
        start = time.perf_counter()
        try:
            out = loaded.run(graph.x)
        except DeadlineExceeded:
            raise
        except (BackendUnavailable, PrecisionExceeded):
            return None
        except Exception as exc:  # noqa: BLE001 - as in _run: `diffuse` tries the next one
            self._record_failure(slot, problem, exc)
            return None
        finally:
            loaded.lock.release()
        self._record_success(slot, fell_back=False)
        return self._result(
            problem, slot, out, start, graph_id=graph.graph_id, node_ids=graph.node_ids, failed=()
        )

    def _ready_runner(
        self, graph: Graph, backend: str | None, max_ms: float
    ) -> tuple[Problem, _Slot, _Loaded] | None:
        """What `diffuse_ready` may use, with the runner's lock taken; None if anything
        would have to be built or waited for."""
        if graph.x.shape[1] == 0:
            return None
        problem = self._known_problem(problem_key(graph.adjacency, graph.method))
        slots = self._order(problem, backend, None) if problem is not None else []
        if problem is None or not slots:
            return None
        with self._lock:
            loaded = self._runners.get((problem.key, slots[0].name))
        if loaded is None or loaded.ms_per_feature * graph.x.shape[1] > max_ms:
            return None
        if not loaded.lock.acquire(blocking=False):
            return None
        return problem, slots[0], loaded

    def diffuse_registered(
        self, graph_id: str, x: np.ndarray, backend: str | None = None
    ) -> DiffusionResult:
        """Diffuse new features over a registered topology: no parsing, no operator build."""
        topology = self._topology(graph_id)
        x = self._check_features(x, len(topology.node_ids))
        return self._run(topology.problem, x, graph_id, topology.node_ids, backend, seen=True)

    def _run(
        self,
        problem: Problem,
        x: np.ndarray,
        graph_id: str | None,
        node_ids: tuple[NodeId, ...],
        backend: str | None,
        *,
        seen: bool,
    ) -> DiffusionResult:
        if x.shape[1] == 0:  # nothing to diffuse; never let it count against a backend
            raise GraphError("features", "the graph has no node features to diffuse")
        start = time.perf_counter()
        failed: list[str] = []
        reasons: list[str] = []
        over_memory: list[str] = []
        for slot in self._order(problem, backend, None if seen else x.shape[1]):
            deadline.check()
            needs = self._work_bytes(slot, problem, x.shape[1])
            if (
                self.bounds.max_diffusion_bytes is not None
                and needs > self.bounds.max_diffusion_bytes
            ):
                over_memory.append(f"{slot.name} needs ~{needs // MIB + 1} MiB")
                continue
            try:
                loaded = self._loaded(slot, problem)
                with loaded.lock:
                    out = loaded.run(x)
            except DeadlineExceeded:
                raise
            except (BackendUnavailable, PrecisionExceeded) as exc:
                # Not for this problem (too large) or this input (int8 too coarse): the
                # backend is healthy, so skip it without counting a failure.
                self._count_skip(exc)
                reasons.append(f"{slot.name}: {exc}")
                continue
            except Exception as exc:  # noqa: BLE001 - any backend failure means "try the next"
                self._record_failure(slot, problem, exc)
                failed.append(slot.name)
                reasons.append(f"{slot.name}: {exc}")
                continue
            self._record_success(slot, fell_back=bool(failed))
            return self._result(
                problem,
                slot,
                out,
                start,
                graph_id=graph_id,
                node_ids=node_ids,
                failed=tuple(failed),
            )
        if over_memory and not failed:
            raise GraphError(
                "graph",
                f"this diffusion would pass kernels.max_diffusion_bytes "
                f"({self.bounds.max_diffusion_bytes} bytes): {'; '.join(over_memory)}",
                code="too_large",
            )
        detail = "; ".join(reasons) or "every backend is excluded, unavailable or unhealthy"
        raise BackendError(f"no backend could run this diffusion ({detail})")

    def _work_bytes(self, slot: _Slot, problem: Problem, features: int) -> int:
        """What running `problem` on `slot` costs in memory now: its build when the runner
        is not cached, plus the call's arrays."""
        with self._lock:
            built = (problem.key, slot.name) in self._runners
        return work_bytes(slot.name, problem, features, built=built)

    def estimate_seconds(self, graph: Graph) -> float:
        """A rough time for `diffuse(graph)` on the backend it would use (for the agent to
        pick a lane): the build counted when the topology is new. Costs from the model
        below, on A for a new topology (T has the same pattern, self loops aside)."""
        key = problem_key(graph.adjacency, graph.method)
        problem = self._known_problem(key)
        features = max(int(graph.x.shape[1]), 1)
        if problem is None:
            problem = Problem(key, sp.csr_matrix(graph.adjacency), graph.method)
            slots = self._order(problem, None, features)
            new = True
        else:
            slots = self._order(problem, None, None)
            new = False
        if not slots:
            return 0.0
        name = slots[0].name
        with self._lock:
            new = new or (key, name) not in self._runners
        cost = _cost(name, problem) * features + (_build_cost(name, problem) if new else 0.0)
        return cost / MULTIPLY_ADDS_PER_S

    def estimate_registered_seconds(self, graph_id: str, features: int) -> float:
        topology = self._topology(graph_id)
        slots = self._order(topology.problem, None, None)
        if not slots:
            return 0.0
        name = slots[0].name
        with self._lock:
            new = (topology.problem.key, name) not in self._runners
        cost = _cost(name, topology.problem) * max(features, 1)
        if new:
            cost += _build_cost(name, topology.problem)
        return cost / MULTIPLY_ADDS_PER_S

    @staticmethod
    def _result(
        problem: Problem,
        slot: _Slot,
        out: RunOutput,
        start: float,
        *,
        graph_id: str | None,
        node_ids: tuple[NodeId, ...],
        failed: tuple[str, ...],
    ) -> DiffusionResult:
        return DiffusionResult(
            job_id=os.urandom(16).hex(),
            graph_id=graph_id,
            method=problem.method,
            backend=slot.name,
            latency_ms=(time.perf_counter() - start) * 1000.0,
            error_bound=_as_float32_bound(out.z, out.error_bound),
            node_ids=node_ids,
            embedding=np.asarray(out.z, dtype=np.float32),
            fallbacks=failed,
        )

    def _check_features(self, x: Any, n: int) -> np.ndarray:
        x = np.asarray(x)
        if x.dtype not in (np.float32, np.float64):  # float32 passes through: no copy per call
            try:
                x = x.astype(np.float64)
            except (TypeError, ValueError) as exc:
                raise GraphError("x", "must be an N x F array of numbers") from exc
        if x.ndim != 2 or x.shape[0] != n:
            raise GraphError("x", f"must have shape ({n}, F), got {x.shape}")
        if x.shape[1] > self.limits.max_features:
            raise GraphError(
                "x", f"has more than {self.limits.max_features} features", code="too_large"
            )
        if not np.isfinite(x).all():
            raise GraphError("x", "must be finite")
        return x

    # -- backend choice and health ---------------------------------------------------------

    def _order(
        self, problem: Problem, preferred: str | None, first_features: int | None
    ) -> list[_Slot]:
        """Eligible backends, the preferred one first, the rest cheapest first.

        A topology seen for the first time (`first_features` is its F) is ranked by build
        plus one call: one int8 model build costs more than many dense calls. A repeated or
        registered one by per-call cost; that order is cached per (problem, preference)
        until any backend's health or the exclusions change, so a steady call does no sorting.
        """
        name = self._check_name(preferred) if preferred else self._default
        with self._lock:
            self._reprobe_due()
            cached = self._orders.get((problem.key, name))
            if first_features is None and cached is not None and cached[0] == self._version:
                return cached[1]
            slots = [s for s in self._slots if s.eligible and s.name not in self._excluded]
            position = {s.name: i for i, s in enumerate(slots)}

            def rank(s: _Slot) -> tuple[bool, float, int]:
                cost = _cost(s.name, problem)
                if first_features is not None:
                    cost = cost * first_features + _build_cost(s.name, problem)
                return s.name != name, cost, position[s.name]

            slots.sort(key=rank)
            if first_features is None:
                if len(self._orders) > 4 * MAX_RUNNERS:
                    self._orders.clear()
                self._orders[(problem.key, name)] = (self._version, slots)
            return slots

    def _reprobe_due(self) -> None:
        now = self._clock()
        for slot in self._slots:
            if slot.backend is None or slot.eligible or now < slot.next_probe:
                continue
            self._counts["reprobes"] += 1
            try:
                slot.backend.probe()
            except Exception as exc:  # noqa: BLE001 - a failed probe only delays the next one
                slot.available = False
                slot.reason = str(exc) or type(exc).__name__
                self._back_off(slot, now)
                continue
            slot.available, slot.healthy, slot.reason = True, True, ""
            self._version += 1
            log.info("backend %s usable again after re-probe", slot.name)

    def _back_off(self, slot: _Slot, now: float) -> None:
        slot.next_probe = now + slot.backoff
        slot.backoff = min(slot.backoff * 2.0, MAX_BACKOFF_S)

    def _record_failure(self, slot: _Slot, problem: Problem, exc: Exception) -> None:
        log.warning("backend %s failed, falling back: %s", slot.name, exc, exc_info=exc)
        with self._lock:
            slot.failures += 1
            slot.healthy = False
            slot.failing = True
            slot.last_error = str(exc) or type(exc).__name__
            self._version += 1
            slot.reason = f"failed at run time: {slot.last_error}"
            self._back_off(slot, self._clock())
            loaded = self._runners.pop((problem.key, slot.name), None)
        if loaded is not None:
            _close_quietly(loaded.runner)

    def _count_skip(self, exc: Exception) -> None:
        if isinstance(exc, PrecisionExceeded):
            with self._lock:
                self._counts["precision_skips"] += 1

    def _record_success(self, slot: _Slot, *, fell_back: bool) -> None:
        with self._lock:
            self._counts["diffusions"] += 1
            self._last_backend = slot.name
            slot.backoff = FIRST_BACKOFF_S
            slot.failing = False
            if fell_back:
                slot.fallbacks += 1

    def _loaded(self, slot: _Slot, problem: Problem) -> _Loaded:
        cache_key = (problem.key, slot.name)
        with self._lock:
            loaded = self._runners.get(cache_key)
            if loaded is not None:
                self._runners.move_to_end(cache_key)
                return loaded
        assert slot.backend is not None
        runner = slot.backend.load(problem)  # slow (builds P or a model): unlocked
        loaded = _Loaded(runner, runner_bytes(slot.name, problem))
        with self._lock:
            self._runners[cache_key] = loaded
            evicted = self._trim_caches()
        _close_all(evicted)
        return loaded

    def _check_name(self, name: str) -> str:
        if name != "auto" and name not in {s.name for s in self._slots}:
            known = ", ".join(["auto", *(s.name for s in self._slots)])
            raise BackendUnavailable(f"unknown backend {name!r}; use one of {known}.")
        return name

    def close(self) -> None:
        """Release every cached runner (interpreters, buffers); registered topologies stay."""
        with self._lock:
            loaded = list(self._runners.values())
            self._runners.clear()
        for entry in loaded:
            # Let a call in flight finish first, but not for long: a stopping agent must
            # not wait on a diffusion that cannot be interrupted (its memory goes at exit).
            if entry.lock.acquire(timeout=CLOSE_WAIT_S):
                try:
                    _close_quietly(entry.runner)
                finally:
                    entry.lock.release()

    def set_excluded(self, names: Iterable[str]) -> None:
        """Keep these backends out of every choice (e.g. a hot Edge TPU) until changed."""
        with self._lock:
            self._excluded = frozenset(names)
            self._version += 1

    def backends_status(self) -> list[dict[str, Any]]:
        with self._lock:
            return [
                {
                    "name": s.name,
                    "available": s.available,
                    "reason": s.reason,
                    "failures": s.failures,
                    "fallbacks": s.fallbacks,
                    "healthy": s.healthy,
                    "failing": s.failing,
                    "last_error": s.last_error,
                    "excluded": s.name in self._excluded,
                }
                for s in self._slots
            ]

    def active_backend(self) -> str:
        """The backend that answered last; before any call, the configured one when it is
        usable, else the one auto would try first on a small repeated graph."""
        with self._lock:
            if self._last_backend is not None and self._last_backend not in self._excluded:
                return self._last_backend
            configured = [s for s in self._slots if s.name == self._default]
            for slot in configured + self._slots:
                if slot.eligible and slot.name not in self._excluded:
                    return slot.name
        return "none"

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "diffusions": self._counts["diffusions"],
                "reprobes": self._counts["reprobes"],
                "precision_skips": self._counts["precision_skips"],
                "failures": {s.name: s.failures for s in self._slots},
                "fallbacks": {s.name: s.fallbacks for s in self._slots},
            }

    # -- registered topologies -------------------------------------------------------------

    def register(self, graph: Graph) -> str:
        """Keep a topology + method (its operator built now) under a graph_id; returns it."""
        problem = problem_for(graph)
        graph_id = graph.graph_id or f"g-{problem.key[:16]}"
        features = int(graph.x.shape[1]) if graph.x.ndim == 2 and graph.x.shape[1] else None
        topology = _Topology(
            graph_id, graph.node_ids, graph.adjacency, graph.directed, problem, features
        )
        self._store(topology)
        return graph_id

    def update_edges(
        self,
        graph_id: str,
        add: Sequence[Any] = (),
        remove: Sequence[Any] = (),
        reweight: Sequence[Any] = (),
    ) -> dict[str, Any]:
        """Apply edge deltas; the topology gets a new operator (and key). Returns its summary."""
        old = self._topology(graph_id)
        index = {node: i for i, node in enumerate(old.node_ids)}
        if len(add) + len(remove) + len(reweight) > self.limits.max_edges:
            raise GraphError("add", "too many edge deltas in one update", code="too_large")
        adjacency = _apply_deltas(
            old.adjacency,
            directed=old.directed,
            index=index,
            add=add,
            remove=remove,
            reweight=reweight,
        )
        if adjacency.nnz > 2 * self.limits.max_edges:
            raise GraphError("add", "the topology would exceed the edge limit", code="too_large")
        problem = problem_for(
            Graph(old.node_ids, adjacency, np.zeros((0, 0)), old.directed, graph_id),
            old.problem.method,
        )
        self._store(
            _Topology(graph_id, old.node_ids, adjacency, old.directed, problem, old.features)
        )
        return self._topology(graph_id).describe()

    def unregister(self, graph_id: str) -> None:
        with self._lock:
            topology = self._topologies.pop(graph_id, None)
            key = topology.problem.key if topology else self._unloaded.pop(graph_id, None)
            if key is None:
                raise UnknownTopology(f"no topology is registered as {graph_id!r}")
            self._drop_runners(key)
            self._write_index()
        self._remove_file(key)

    def topologies(self) -> list[dict[str, Any]]:
        with self._lock:
            return [t.describe() for t in self._topologies.values()]

    def _topology(self, graph_id: str) -> _Topology:
        try:
            return self._topologies[graph_id]
        except KeyError:
            raise UnknownTopology(f"no topology is registered as {graph_id!r}") from None

    def _store(self, topology: _Topology) -> None:
        with self._lock:
            self._check_room(topology)
        self._save(topology)
        with self._lock:
            try:
                self._check_room(topology)  # again: another registration may have won
            except GraphError:
                self._remove_file(topology.problem.key)
                raise
            old = self._topologies.get(topology.graph_id)
            old_key = old.problem.key if old else self._unloaded.pop(topology.graph_id, None)
            self._topologies[topology.graph_id] = topology
            self._write_index()
        if old_key is not None and old_key != topology.problem.key:
            with self._lock:
                self._drop_runners(old_key)
            self._remove_file(old_key)

    def _check_room(self, topology: _Topology) -> None:
        """GraphError (413) naming the limit a new or replaced topology would pass."""
        others = [t for gid, t in self._topologies.items() if gid != topology.graph_id]
        refusal = self.registry.refusal(len(others), sum(t.nbytes for t in others), topology.nbytes)
        if refusal is not None:
            raise GraphError("graph_id", refusal, code="too_large")

    def _drop_runners(self, key: str) -> None:
        for entry in self._pop_runners(key):
            _close_quietly(entry.runner)

    def _pop_runners(self, key: str) -> list[_Loaded]:
        return [self._runners.pop(k) for k in [k for k in self._runners if k[0] == key]]

    # -- on-disk registry: <cache_dir>/topologies/<key>.npz + index.json (graph_id -> key) --

    def _registry_dir(self) -> Path | None:
        return None if self._cache_dir is None else self._cache_dir / "topologies"

    def _save(self, topology: _Topology) -> None:
        folder = self._registry_dir()
        if folder is None:
            return
        folder.mkdir(parents=True, exist_ok=True)
        a = topology.adjacency
        arrays = {
            "indptr": a.indptr,
            "indices": a.indices,
            "data": a.data,
            "meta": np.array(
                json.dumps(
                    {
                        "graph_id": topology.graph_id,
                        "node_ids": list(topology.node_ids),
                        "directed": topology.directed,
                        "method": topology.problem.method.to_json(),
                        "features": topology.features,
                    }
                )
            ),
        }
        _atomic_write(folder / f"{topology.problem.key}.npz", lambda f: np.savez(f, **arrays))

    def _write_index(self) -> None:
        folder = self._registry_dir()
        if folder is None:
            return
        folder.mkdir(parents=True, exist_ok=True)
        index = {**self._unloaded, **{gid: t.problem.key for gid, t in self._topologies.items()}}
        payload = json.dumps(index, sort_keys=True).encode()
        _atomic_write(folder / "index.json", lambda f: f.write(payload))

    def _remove_file(self, key: str) -> None:
        folder = self._registry_dir()
        with self._lock:
            in_use = key in self._unloaded.values() or any(
                t.problem.key == key for t in self._topologies.values()
            )
        if folder is not None and not in_use:
            (folder / f"{key}.npz").unlink(missing_ok=True)

    def _load_registry(self) -> None:
        folder = self._registry_dir()
        if folder is None or not (folder / "index.json").exists():
            return
        try:
            index = json.loads((folder / "index.json").read_text())
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable topology index %s: %s", folder, exc)
            return
        over: dict[str, list[str]] = {}
        for graph_id, key in index.items():
            path = folder / f"{_safe(key)}.npz"
            try:
                # The file's size first: one too large for what is left is never read.
                limit = self._room_for(path.stat().st_size)
                if limit is None:
                    topology = _read_topology(path)
                    limit = self._room_for(topology.nbytes)
            except (OSError, ValueError, KeyError, KernelError) as exc:
                log.warning("ignoring cached topology %s: %s", graph_id, exc)
                continue
            if limit is None:
                self._topologies[graph_id] = topology
            else:
                self._unloaded[graph_id] = key
                over.setdefault(limit, []).append(graph_id)
        for limit, graph_ids in over.items():
            log.warning(
                "cached topologies not loaded: over %s (kept on disk for larger limits)",
                limit,
                extra={"graph_ids": graph_ids, "limit": limit},
            )

    def _room_for(self, nbytes: int) -> str | None:
        """The limit one more topology of `nbytes` would pass at start-up, or None."""
        used = sum(t.nbytes for t in self._topologies.values())
        refusal = self.registry.refusal(len(self._topologies), used, nbytes)
        return None if refusal is None else refusal.split(" ", 1)[0]


@dataclass(frozen=True)
class RegistryLimits:
    """Bounds on registered topologies, named as the agent's config keys. None: unbounded."""

    max_topologies: int | None = None
    max_bytes: int | None = None

    def refusal(self, count: int, used_bytes: int, new_bytes: int) -> str | None:
        """Why one more topology of `new_bytes` beside `count` of `used_bytes` does not fit;
        the sentence starts with the key to raise. None when it fits."""
        if self.max_topologies is not None and count >= self.max_topologies:
            return (
                f"kernels.max_topologies ({self.max_topologies}) topologies are registered: "
                "delete one first"
            )
        if self.max_bytes is not None and used_bytes + new_bytes > self.max_bytes:
            return (
                f"kernels.max_topology_bytes ({self.max_bytes}) would be passed: this "
                f"topology needs {new_bytes} bytes and {used_bytes} are in use"
            )
        return None


def _read_topology(path: Path) -> _Topology:
    with np.load(path, allow_pickle=False) as npz:
        meta = json.loads(str(npz["meta"]))
        n = len(meta["node_ids"])
        adjacency = sp.csr_matrix((npz["data"], npz["indices"], npz["indptr"]), shape=(n, n))
    method = parse_method(meta["method"])
    node_ids = tuple(meta["node_ids"])
    graph = Graph(node_ids, adjacency, np.zeros((n, 0)), bool(meta["directed"]), meta["graph_id"])
    features = meta.get("features")
    return _Topology(
        meta["graph_id"],
        node_ids,
        adjacency,
        graph.directed,
        problem_for(graph, method),
        features if type(features) is int and features > 0 else None,
    )


def _atomic_write(path: Path, write: Callable[[Any], Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _safe(key: str) -> str:
    return _SAFE_ID.sub("_", key)


def _close_all(entries: list[_Loaded]) -> None:
    """Close evicted runners that no call is using; one in use is left to the garbage
    collector once its call ends (waiting for it would hold a small diffusion up behind a
    heavy one)."""
    for entry in entries:
        if entry.lock.acquire(blocking=False):
            try:
                _close_quietly(entry.runner)
            finally:
                entry.lock.release()


def _close_quietly(runner: Runner) -> None:
    try:
        runner.close()
    except Exception as exc:  # noqa: BLE001 - closing a broken runner must not fail a call
        log.debug("closing runner failed: %s", exc)


def _as_float32_bound(z: np.ndarray, bound: float) -> float:
    """The embedding is float32: a float64 result gains one rounding."""
    return bound if z.dtype == np.float32 else bound + FLOAT32_UNIT


_TFLITE_PER_CALL = 1e5
# A sparse gather costs ~4x a dense multiply-add with scipy's kernel, ~2.2x with the
# compiled one (dgdm.kernels._spmm, optional): looked up without importing it.
_SPARSE_GATHER = 2.2 if importlib.util.find_spec("dgdm.kernels._spmm") else 4.0


def _cost(name: str, problem: Problem) -> float:
    """Rough per-call cost per feature column in multiply-adds, to order CPU backends by
    speed; accelerators/unknown first."""
    n, nnz = problem.n, problem.t.nnz
    if name == "numpy":
        return float(n) * n
    if name == "tflite":
        # int8 GEMM ~5x numpy float32 here, plus a fixed ~0.2 ms per call (quantise, invoke,
        # dequantise), spread over a typical 16 columns: below N ~ 350 dense numpy wins.
        return float(n) * n / 5.0 + _TFLITE_PER_CALL
    if name == "sparse":
        return _SPARSE_GATHER * nnz * _products(problem)
    return 0.0


# Build costs in the same units (~2e10 multiply-adds/s for float32 BLAS here), fitted to
# loads measured at N = 50 .. 3,000: fixed Python overhead ~0.2 ms dense and ~0.5 ms sparse
# (+ its reordering), and an int8 model written, loaded and calibrated ~20 ms.
_DENSE_FIXED = 4e6
_SPARSE_FIXED = 1e7
_INT8_MODEL_FIXED = 4e8


def _build_cost(name: str, problem: Problem) -> float:
    """Rough cost of `Backend.load` for a topology seen for the first time."""
    n, nnz = float(problem.n), float(problem.t.nnz)
    exact = series_coefficients(problem.method) is None
    if name == "numpy":
        if exact:  # a dense solve or expm
            return _DENSE_FIXED + (10.0 if problem.method.kind == "heat" else 3.0) * n**3
        return _DENSE_FIXED + 16.0 * nnz * n * _products(problem)  # sparse T @ dense P
    if name == "tflite":
        return _INT8_MODEL_FIXED + _build_cost("numpy", problem) + 10.0 * n * n
    if name == "sparse":
        # the series reorders T (RCM); the exact forms build nothing beyond T
        return _SPARSE_FIXED + (0.0 if exact else 1e4 * nnz)
    return 0.0


# What the costs above come to per second on one core of an x86-64 box (float32 BLAS does
# ~2e10; the sparse gathers are already weighted): used only to pick the agent's lane.
MULTIPLY_ADDS_PER_S = 1e10
CLOSE_WAIT_S = 1.0
_F64, _F32, _INDEX = 8, 4, 4


def _csr_bytes(m: sp.csr_matrix) -> int:
    return int(m.data.nbytes + m.indices.nbytes + m.indptr.nbytes)


def _exact(method: Method) -> bool:
    """`series_coefficients(method) is None`, without computing them (once per call)."""
    return method.kind != "poly" and method.k is None


def runner_bytes(name: str, problem: Problem) -> int:
    """What a cached runner keeps: a dense float32 P (numpy), an int8 model and its
    interpreter's copy (tflite, edgetpu), a float32 reordered T with its permutations and
    three N x 16 buffers (sparse series); the exact sparse forms keep only T, which the
    problem already holds."""
    n, nnz = problem.n, problem.t.nnz
    if name == "numpy":
        return _F32 * n * n
    if name in ("tflite", "edgetpu"):
        return 2 * n * n
    if name == "sparse" and not _exact(problem.method):
        return (_F32 + _INDEX) * nnz + 4 * 8 * n + 3 * _F32 * n * 16
    return 0


def work_bytes(name: str, problem: Problem, features: int, *, built: bool) -> int:
    """Peak working memory of one call on `name`: the runner's build unless `built`, and
    the call's own arrays (inputs, outputs, iteration vectors)."""
    n, nnz = problem.n, problem.t.nnz
    call = n * features
    exact = _exact(problem.method)
    if name == "sparse":
        if exact:
            # ppr: CG's six N x F float64 arrays, T's transpose for the symmetry test;
            # heat: expm_multiply's shifted copy of T and its handful of N x F arrays
            return 2 * (_F64 + _INDEX) * nnz + 8 * _F64 * call
        build = 0 if built else runner_bytes(name, problem) + (_F64 + _INDEX) * nnz
        return build + 6 * _F32 * call
    # dense: T, the system or the running P, the result and its float32 copy (expm: more)
    dense = (6 if exact and problem.method.kind == "heat" else 3) * _F64 * n * n
    build = 0 if built else dense + runner_bytes(name, problem)
    return build + 3 * _F64 * call


def _products(problem: Problem) -> int:
    """Products with T per call: the series' k; for the exact forms what their solvers
    take, so that a slow one is costed as slow: conjugate gradients ~sqrt(cond) ln(2/tol) / 2
    (sym), the fixed-point iteration ln(tol) / ln(1 - alpha) (col, row), expm_multiply
    ~11 t (its degree-55 steps of norm ~10, on a generator of norm up to 2 t)."""
    method = problem.method
    coeffs = series_coefficients(method)
    if coeffs is not None:
        return max(len(coeffs) - 1, 1)
    if method.kind == "heat":
        return max(int(11 * method.t), 40)
    if method.alpha >= 1.0:
        return 1
    if method.normalization == "sym":
        condition = (2.0 - method.alpha) / method.alpha
        return int(math.sqrt(condition) * math.log(2.0 / PPR_RTOL) / 2) + 1
    return int(math.log(PPR_RTOL) / math.log1p(-method.alpha)) + 1


def _discover(cache_dir: Path | None, now: float) -> list[_Slot]:
    return [_construct(name, cache_dir, now) for name in BACKEND_NAMES]


def _construct(name: str, cache_dir: Path | None, now: float) -> _Slot:
    args = (cache_dir / name if cache_dir else None,) if name in _WITH_CACHE_DIR else ()
    if name in _CHEAP_PROBES:
        return _probed(name, _DeferredBackend(name, args, _CHEAP_PROBES[name]), now)
    try:
        backend = _backend_class(name)(*args)
    except ImportError as exc:
        return _Slot(name, None, False, f"{name} is not installed ({exc}).")
    except Exception as exc:  # noqa: BLE001 - a backend that cannot start is only unavailable
        return _Slot(name, None, False, f"{name} could not start: {exc}")
    return _probed(name, backend, now)


def _backend_class(name: str) -> Any:
    module_name, class_name = _BACKEND_CLASSES[name]
    return getattr(importlib.import_module(module_name), class_name)


class _DeferredBackend:
    """A backend whose module is imported on its first `load`, not when the engine starts:
    the int8 ones bring the TFLite schema and runtime (~11 MB), sparse brings scipy's csgraph
    and linalg (~11 MB); an agent that only diffuses small graphs on numpy never pays for
    them. Until then `probe` is a cheap check that the packages are installed (and, for the
    Edge TPU, that one is attached); after, it is the backend's own."""

    def __init__(self, name: str, args: tuple[Any, ...], cheap_probe: Callable[[], None]) -> None:
        self.name = name
        self._args = args
        self._cheap_probe = cheap_probe
        self._backend: Backend | None = None
        self._lock = threading.Lock()

    def probe(self) -> None:
        backend = self._backend
        if backend is None:
            self._cheap_probe()
        else:
            backend.probe()

    def load(self, problem: Problem) -> Runner:
        return self._loaded().load(problem)

    def _loaded(self) -> Backend:
        with self._lock:
            if self._backend is None:
                try:
                    backend = _backend_class(self.name)(*self._args)
                except ImportError as exc:
                    raise BackendUnavailable(f"{self.name} is not installed ({exc}).") from exc
                backend.probe()
                self._backend = backend
            return self._backend


def _tflite_installed() -> None:
    for package in ("flatbuffers", "tflite"):  # the model writer
        if importlib.util.find_spec(package) is None:
            raise BackendUnavailable(f"tflite is not installed (no {package} package).")
    if not any(importlib.util.find_spec(m) for m in ("ai_edge_litert", "tflite_runtime")):
        raise BackendUnavailable("neither ai-edge-litert nor tflite-runtime is installed.")


def _edgetpu_attached() -> None:
    from dgdm.kernels import edgetpu

    state = edgetpu.discover()
    if not state.present:
        raise BackendUnavailable(state.reason)
    _tflite_installed()


def _always() -> None:
    """scipy.sparse is a dependency; only its csgraph (~11 MB with scipy.linalg) waits."""


_CHEAP_PROBES: dict[str, Callable[[], None]] = {
    "sparse": _always,
    "tflite": _tflite_installed,
    "edgetpu": _edgetpu_attached,
}


def _given(backends: Sequence[Backend], now: float) -> list[_Slot]:
    return [_probed(b.name, b, now) for b in backends]


def _probed(name: str, backend: Backend, now: float) -> _Slot:
    try:
        backend.probe()
    except Exception as exc:  # noqa: BLE001 - BackendUnavailable or a runtime's own error
        slot = _Slot(name, backend, False, str(exc) or type(exc).__name__)
        slot.next_probe = now + slot.backoff
        return slot
    return _Slot(name, backend, True, "")


def _edge(item: Any, field: str, index: Mapping[NodeId, int]) -> tuple[int, int, Any]:
    """(source row, target row, weight or None) from {"source","target","weight"} or a tuple."""
    if isinstance(item, Mapping):
        unknown = set(item) - {"source", "target", "weight"}
        if unknown:
            raise GraphError(f"{field}.{sorted(unknown)[0]}", "is not a known edge field")
        parts = (item.get("source"), item.get("target"), item.get("weight"))
    elif isinstance(item, list | tuple) and len(item) in (2, 3):
        parts = (item[0], item[1], item[2] if len(item) == 3 else None)
    else:
        raise GraphError(field, "must be an edge object or [source, target, weight?]")
    rows = []
    for name, node in zip(("source", "target"), parts[:2], strict=True):
        if isinstance(node, bool) or not isinstance(node, str | int) or node not in index:
            raise GraphError(f"{field}.{name}", f"names the unknown node {node!r}")
        rows.append(index[node])
    return rows[0], rows[1], parts[2]


def _apply_deltas(
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
