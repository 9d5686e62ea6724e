"""Engine calls, each run where it costs least: on the loop, in a worker, or in the parser
process. `EngineJobs` is what the agent and its HTTP handlers call; it never blocks the loop
for longer than a small body's parse and a sub-millisecond diffusion.

Lanes: a diffusion the engine's cost model puts above HEAVY_S (or a body above
LARGE_BODY_BYTES, parsed in the parser process) runs in the heavy lane, everything else in
the light one (agent/work.py), so small requests never queue behind a heavy one. Every call
carries one deadline from its arrival (`kernels.deadline_s`, or the request's lower
`deadline_s`) through parsing, waiting and diffusing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dgdm.agent import topologies
from dgdm.agent.jsonio import loads
from dgdm.agent.work import GraphParser, WorkQueue, parse_graph_body
from dgdm.kernels.deadline import Deadline
from dgdm.kernels.deadline import check as deadline_check

if TYPE_CHECKING:
    # The engine (numpy, scipy, the backends) is imported in a thread at start-up.
    from dgdm.agent.config import AgentConfig
    from dgdm.kernels.engine import DiffusionResult, Engine
    from dgdm.kernels.graph import Graph, Limits


def open_engine(config: AgentConfig) -> tuple[Engine, Limits]:
    """The engine the config asks for, with its registry loaded from kernels.cache_dir, and
    the graph limits it applies (slow: imports numpy, scipy, probes the backends)."""
    from dgdm.kernels import threads
    from dgdm.kernels.engine import Engine, EngineBounds, RegistryLimits
    from dgdm.kernels.graph import Limits

    k = config.kernels
    limits = Limits(
        max_nodes=k.max_nodes,
        max_edges=k.max_edges,
        max_features=k.max_features,
        max_body_bytes=config.http.max_body_bytes,
    )
    cache_dir = k.cache_dir or config.device.data_dir / "cache"
    registry = RegistryLimits(k.max_topologies, k.max_topology_bytes)
    bounds = EngineBounds(k.max_diffusion_bytes or None, k.cache_bytes)
    threads.configure(k.threads)
    engine = Engine(
        backend=k.backend, cache_dir=cache_dir, limits=limits, registry=registry, bounds=bounds
    )
    return engine, limits


# JSON decoding and graph validation hold the GIL for their whole run (~40 ms per MB), so in
# a thread they would still stall the event loop; bodies above this size are parsed in a
# separate process, started on first use so that small installations never pay for it.
LARGE_BODY_BYTES = 512 * 1024
# A body up to this size (a 100-node, 16-feature graph is ~27 KB) is parsed on the event loop
# (~0.06 ms by the compiled scanner, ~0.4 ms decoded the general way), and diffused there
# too when the engine has the runner loaded and free and its measured run takes
# <= INLINE_MAX_MS (a repeated small topology: ~0.05 ms).
# A thread hop would cost more than the work: on two cores the loop and a worker then trade
# the GIL at every syscall. Anything else goes to a worker.
INLINE_BODY_BYTES = 64 * 1024
INLINE_MAX_MS = 1.0
# Estimated diffusions above this go to the heavy lane: a first 100-node graph costs ~1 ms,
# a first exact ppr at 5,000 nodes ~60 ms.
HEAVY_S = 0.02


@dataclass(frozen=True)
class EngineJobs:
    engine: Engine
    limits: Limits
    work: WorkQueue
    parser: GraphParser

    async def diffuse(
        self, data: bytes | dict[str, Any], deadline_s: float | None = None
    ) -> DiffusionResult:
        """Parse and diffuse a graph body (or an already decoded graph object)."""
        deadline = self.work.deadline(deadline_s)
        if isinstance(data, bytes) and len(data) <= INLINE_BODY_BYTES:
            return await self._diffuse_small(data, deadline)
        if isinstance(data, bytes) and len(data) > LARGE_BODY_BYTES:
            return await self.work.run(self._diffuse_large, data, deadline=deadline, heavy=True)
        done = await self.work.run(self._parse_then_light, data, deadline=deadline)
        if isinstance(done, _Heavy):
            return await self.work.run(done.run, deadline=deadline, heavy=True)
        return done

    async def diffuse_registered(
        self, graph_id: str, data: bytes | dict[str, Any], deadline_s: float | None = None
    ) -> DiffusionResult:
        deadline = self.work.deadline(deadline_s)
        done = await self.work.run(self._features_then_light, graph_id, data, deadline=deadline)
        if isinstance(done, _Heavy):
            return await self.work.run(done.run, deadline=deadline, heavy=True)
        return done

    async def register(self, graph_id: str, data: bytes) -> dict[str, Any]:
        return await self.work.run(self._register_blocking, graph_id, data)

    async def update(self, graph_id: str, data: bytes) -> dict[str, Any]:
        return await self.work.run(self._update_blocking, graph_id, data)

    async def unregister(self, graph_id: str) -> dict[str, Any]:
        await self.work.run(self.engine.unregister, graph_id)
        return {"graph_id": graph_id, "deleted": True}

    async def _diffuse_small(self, data: bytes, deadline: Deadline) -> DiffusionResult:
        """A small body: parsed here, diffused here if that is quick, else in a worker."""
        self.work.check_accepting()
        graph = parse_graph_body(data, self.limits)
        result = self.engine.diffuse_ready(graph, max_ms=INLINE_MAX_MS)
        if result is not None:
            return result
        return await self._diffuse_parsed(graph, deadline)

    async def _diffuse_parsed(self, graph: Graph, deadline: Deadline) -> DiffusionResult:
        heavy = self.engine.estimate_seconds(graph) > HEAVY_S
        return await self.work.run(self.engine.diffuse, graph, deadline=deadline, heavy=heavy)

    def _diffuse_large(self, data: bytes) -> DiffusionResult:
        graph = self.parser.parse(data, self.limits)
        deadline_check()  # the parse cannot be interrupted: see whether time is left
        return self.engine.diffuse(graph)

    # In a light worker: parse, then diffuse there too unless the cost model calls it heavy
    # (one thread hop for the common case, a second into the heavy lane otherwise).

    def _parse_then_light(self, data: bytes | dict[str, Any]) -> DiffusionResult | _Heavy:
        graph = parse_graph_body(data, self.limits)
        if self.engine.estimate_seconds(graph) > HEAVY_S:
            return _Heavy(functools.partial(self.engine.diffuse, graph))
        return self.engine.diffuse(graph)

    def _features_then_light(
        self, graph_id: str, data: bytes | dict[str, Any]
    ) -> DiffusionResult | _Heavy:
        obj = loads(data) if isinstance(data, (bytes, str)) else data
        n = len(self.engine.topology(graph_id).node_ids)
        x = topologies.parse_features(obj, n, self.limits.max_features)
        if self.engine.estimate_registered_seconds(graph_id, x.shape[1]) > HEAVY_S:
            return _Heavy(functools.partial(self.engine.diffuse_registered, graph_id, x))
        return self.engine.diffuse_registered(graph_id, x)

    def _register_blocking(self, graph_id: str, data: bytes) -> dict[str, Any]:
        from dgdm.kernels.graph import parse_graph

        obj = topologies.registration(loads(data), graph_id)
        self.engine.register(parse_graph(obj, self.limits))
        return self.engine.topology(graph_id).describe()

    def _update_blocking(self, graph_id: str, data: bytes) -> dict[str, Any]:
        changes = topologies.parse_edge_changes(loads(data))
        return dict(self.engine.update_edges(graph_id, **changes))


@dataclass(frozen=True)
class _Heavy:
    """What a light worker hands back for the heavy lane: the engine call to make there."""

    run: Callable[[], DiffusionResult]
