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

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import scipy.sparse as sp

from dgdm.kernels import deadline
from dgdm.kernels.backends.base import Backend, Problem, RunOutput
from dgdm.kernels.backends.discovery import FIRST_BACKOFF_S, Slot, discover, given
from dgdm.kernels.caches import LoadedRunner, close_all, close_quietly
from dgdm.kernels.costs import (
    MULTIPLY_ADDS_PER_S,
    build_cost,
    call_cost,
    csr_bytes,
    runner_bytes,
    work_bytes,
)
from dgdm.kernels.deltas import apply_edge_deltas
from dgdm.kernels.diffusion import FLOAT32_UNIT
from dgdm.kernels.errors import (
    BackendError,
    BackendUnavailable,
    DeadlineExceeded,
    GraphError,
    KernelError,
    PrecisionExceeded,
    UnknownTopology,
)
from dgdm.kernels.graph import Graph, Limits, NodeId
from dgdm.kernels.method import Method
from dgdm.kernels.operator import problem_for, problem_key
from dgdm.kernels.registry import RegistryLimits, Topology, TopologyFiles, read_topology

__all__ = ["DiffusionResult", "Engine", "EngineBounds", "RegistryLimits"]

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 60.0
MAX_RUNNERS = 32
MAX_PROBLEMS = 64  # one-off topologies whose operator (and runners) are kept, LRU
MIB = 1 << 20
CLOSE_WAIT_S = 1.0


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


@dataclass(frozen=True)
class EngineBounds:
    """Memory bounds, named as the agent's config keys (kernels.*). None: unbounded."""

    max_diffusion_bytes: int | None = 768 * MIB
    cache_bytes: int | None = 256 * MIB


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
        self._files = (
            None if self._cache_dir is None else TopologyFiles(self._cache_dir / "topologies")
        )
        self._clock = clock
        self._lock = threading.RLock()
        now = clock()
        self._slots = discover(self._cache_dir, now) if backends is None else given(backends, now)
        self._default = self._check_name(backend)
        self._excluded: frozenset[str] = frozenset()
        self._runners: OrderedDict[tuple[str, str], LoadedRunner] = OrderedDict()
        self._topologies: dict[str, Topology] = {}
        # Cached topologies left unloaded at start-up (over the limits): graph_id -> key.
        # They stay in the index and on disk, for a restart with larger limits.
        self._unloaded: dict[str, str] = {}
        self._problems: OrderedDict[str, Problem] = OrderedDict()
        self._counts = {"diffusions": 0, "reprobes": 0, "precision_skips": 0}
        self._orders: dict[tuple[str, str], tuple[int, list[Slot]]] = {}
        self._version = 0  # bumped on every health or exclusion change
        self._last_backend: str | None = None
        self._held_index: IO[bytes] | None = None  # follow_registry's
        self._held_inode: int | None = -1
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
        close_all(evicted)
        return problem, False

    def _trim_caches(self) -> list[LoadedRunner]:
        """Evict (under the lock) least recently used runners, then one-off problems (and
        their runners), until both fit MAX_RUNNERS / MAX_PROBLEMS and together fit
        `cache_bytes`; the newest entry of each stays. Returns the runners to close."""
        evicted: list[LoadedRunner] = []
        budget = self.bounds.cache_bytes
        used = sum(e.nbytes for e in self._runners.values()) + sum(
            csr_bytes(p.t) for p in self._problems.values()
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
            used -= csr_bytes(problem.t)
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
    ) -> tuple[Problem, Slot, LoadedRunner] | None:
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

    def _work_bytes(self, slot: Slot, problem: Problem, features: int) -> int:
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
        cost = call_cost(name, problem) * features + (build_cost(name, problem) if new else 0.0)
        return cost / MULTIPLY_ADDS_PER_S

    def estimate_registered_seconds(self, graph_id: str, features: int) -> float:
        topology = self._topology(graph_id)
        slots = self._order(topology.problem, None, None)
        if not slots:
            return 0.0
        name = slots[0].name
        with self._lock:
            new = (topology.problem.key, name) not in self._runners
        cost = call_cost(name, topology.problem) * max(features, 1)
        if new:
            cost += build_cost(name, topology.problem)
        return cost / MULTIPLY_ADDS_PER_S

    @staticmethod
    def _result(
        problem: Problem,
        slot: Slot,
        out: RunOutput,
        start: float,
        *,
        graph_id: str | None,
        node_ids: tuple[NodeId, ...],
        failed: tuple[str, ...],
    ) -> DiffusionResult:
        embedding = np.asarray(out.z, dtype=np.float32)
        if not np.isfinite(embedding).all():
            # float64 features near or past float32's range diffuse to inf: an answer with
            # Infinity would not be JSON, and a stored one no use.
            raise GraphError("x", "the embedding overflowed float32: scale the features down")
        return DiffusionResult(
            job_id=os.urandom(16).hex(),
            graph_id=graph_id,
            method=problem.method,
            backend=slot.name,
            latency_ms=(time.perf_counter() - start) * 1000.0,
            error_bound=_as_float32_bound(out.z, out.error_bound),
            node_ids=node_ids,
            embedding=embedding,
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
    ) -> list[Slot]:
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

            def rank(s: Slot) -> tuple[bool, float, int]:
                cost = call_cost(s.name, problem)
                if first_features is not None:
                    cost = cost * first_features + build_cost(s.name, problem)
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

    def _back_off(self, slot: Slot, now: float) -> None:
        slot.next_probe = now + slot.backoff
        slot.backoff = min(slot.backoff * 2.0, MAX_BACKOFF_S)

    def _record_failure(self, slot: Slot, problem: Problem, exc: Exception) -> None:
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
            close_quietly(loaded.runner)

    def _count_skip(self, exc: Exception) -> None:
        if isinstance(exc, PrecisionExceeded):
            with self._lock:
                self._counts["precision_skips"] += 1

    def _record_success(self, slot: Slot, *, fell_back: bool) -> None:
        with self._lock:
            self._counts["diffusions"] += 1
            self._last_backend = slot.name
            slot.backoff = FIRST_BACKOFF_S
            slot.failing = False
            if fell_back:
                slot.fallbacks += 1

    def _loaded(self, slot: Slot, problem: Problem) -> LoadedRunner:
        cache_key = (problem.key, slot.name)
        with self._lock:
            loaded = self._runners.get(cache_key)
            if loaded is not None:
                self._runners.move_to_end(cache_key)
                return loaded
        assert slot.backend is not None
        runner = slot.backend.load(problem)  # slow (builds P or a model): unlocked
        loaded = LoadedRunner(runner, runner_bytes(slot.name, problem))
        with self._lock:
            self._runners[cache_key] = loaded
            evicted = self._trim_caches()
        close_all(evicted)
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
            if self._held_index is not None:
                self._held_index.close()
                self._held_index, self._held_inode = None, -1
        # Let a call in flight finish first, but not for long.
        close_all(loaded, wait_s=CLOSE_WAIT_S)

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
        topology = Topology(
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
        adjacency = apply_edge_deltas(
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
            Topology(graph_id, old.node_ids, adjacency, old.directed, problem, old.features)
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

    def topology(self, graph_id: str) -> Topology:
        """The topology registered as `graph_id`, to read (an inference request is checked
        against its key, node count and feature width on every call: no description is
        built). Raises UnknownTopology."""
        return self._topology(graph_id)

    def _topology(self, graph_id: str) -> Topology:
        try:
            return self._topologies[graph_id]
        except KeyError:
            raise UnknownTopology(f"no topology is registered as {graph_id!r}") from None

    def _store(self, topology: Topology) -> None:
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

    def _check_room(self, topology: Topology) -> None:
        """GraphError (413) naming the limit a new or replaced topology would pass."""
        others = [t for gid, t in self._topologies.items() if gid != topology.graph_id]
        refusal = self.registry.refusal(len(others), sum(t.nbytes for t in others), topology.nbytes)
        if refusal is not None:
            raise GraphError("graph_id", refusal, code="too_large")

    def _drop_runners(self, key: str) -> None:
        for entry in self._pop_runners(key):
            close_quietly(entry.runner)

    def _pop_runners(self, key: str) -> list[LoadedRunner]:
        return [self._runners.pop(k) for k in [k for k in self._runners if k[0] == key]]

    # -- on-disk registry (dgdm.kernels.registry.TopologyFiles) -----------------------------

    def _save(self, topology: Topology) -> None:
        if self._files is not None:
            self._files.save(topology)

    def _write_index(self) -> None:
        if self._files is not None:
            self._files.write_index(
                {**self._unloaded, **{gid: t.problem.key for gid, t in self._topologies.items()}}
            )

    def _remove_file(self, key: str) -> None:
        with self._lock:
            in_use = key in self._unloaded.values() or any(
                t.problem.key == key for t in self._topologies.values()
            )
        if self._files is not None and not in_use:
            self._files.remove(key)

    def _load_registry(self) -> None:
        if self._files is None:
            return
        index = self._files.read_index()
        over: dict[str, list[str]] = {}
        for graph_id, key in index.items():
            path = self._files.path(key)
            try:
                # The file's size first: one too large for what is left is never read.
                limit = self._room_for(path.stat().st_size)
                if limit is None:
                    topology = read_topology(path)
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

    def follow_registry(self) -> None:
        """Take up the registry as another process left it (a serving process follows the
        agent's, http.processes): one stat of the index while it is unchanged. A topology
        whose file cannot be read (replaced meanwhile) is read again at the next call."""
        if self._files is None or self._files.index_inode() == self._held_inode:
            return
        index, held = self._files.hold_index()
        fresh: dict[str, Topology] = {}
        complete = True
        for graph_id, key in index.items():
            topology = self._topologies.get(graph_id)
            try:
                if topology is None or topology.problem.key != key:
                    topology = read_topology(self._files.path(key))
            except (OSError, ValueError, KeyError, KernelError):
                complete = False
                continue
            used = sum(t.nbytes for t in fresh.values())
            if self.registry.refusal(len(fresh), used, topology.nbytes) is None:
                fresh[graph_id] = topology  # as the agent loads them: within the limits
        with self._lock:
            kept = {t.problem.key for t in fresh.values()}
            gone = {t.problem.key for t in self._topologies.values()} - kept
            self._topologies = fresh
            for key in gone:
                self._drop_runners(key)
        if self._held_index is not None:
            self._held_index.close()
        self._held_index = held
        inode = None if held is None else os.fstat(held.fileno()).st_ino
        self._held_inode = inode if complete else -1

    def _room_for(self, nbytes: int) -> str | None:
        """The limit one more topology of `nbytes` would pass at start-up, or None."""
        used = sum(t.nbytes for t in self._topologies.values())
        refusal = self.registry.refusal(len(self._topologies), used, nbytes)
        return None if refusal is None else refusal.split(" ", 1)[0]


def _as_float32_bound(z: np.ndarray, bound: float) -> float:
    """The embedding is float32: a float64 result gains one rounding."""
    return bound if z.dtype == np.float32 else bound + FLOAT32_UNIT
