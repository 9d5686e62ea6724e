"""The agent service: starts the parts in order, runs them, and stops them within 10 s.

Start-up order: data dir -> diffusion engine -> keys and outbox -> HTTP endpoint -> MQTT
link -> monitors (TPU, telemetry, spool, broker, watchdog) -> READY=1. Diffusion runs in a
worker pool behind a bounded admission count (`WorkQueue`): a request that finds it full
is refused at once (HTTP 503 + Retry-After) instead of piling up. SIGTERM stops admission,
drains in-flight work, flushes telemetry into the outbox and closes everything; SIGHUP
reloads the settings in `config.RELOADABLE`.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from dgdm.agent import __version__, logs
from dgdm.agent.alerts import INFO, WARNING, Alert, AlertPolicy, Alerts
from dgdm.agent.config import RELOADABLE, AgentConfig, load_config
from dgdm.agent.errors import AgentError
from dgdm.agent.metrics import AgentMetrics, Snapshot
from dgdm.agent.sdnotify import Notifier
from dgdm.agent.telemetry import LatencyWindow, SampleInputs, Sampler, TelemetryBatcher
from dgdm.agent.tpu import TpuMonitor
from dgdm.kernels.errors import DgdmError, GraphError

log = logging.getLogger("dgdm.agent")
T = TypeVar("T")
STOP_BUDGET_S = 10.0
LOOP_LAG_UNHEALTHY_S = 5.0


class QueueFull(AgentError):
    """The diffusion queue is full; the caller should retry after `retry_after_s`."""

    retry_after_s = 1


class ShuttingDown(AgentError):
    """The agent is draining for shutdown and takes no new work."""


class NoOutbox(AgentError):
    """Queuing was asked for but no outbox is configured (sync.coordinator_public_key)."""


class BadJson(AgentError):
    """A request body is not valid JSON."""


# -- JSON ---------------------------------------------------------------------------------

try:  # orjson is optional: 2-3x faster on the hot path when a box has it
    import orjson as _orjson
except ImportError:  # pragma: no cover - depends on the installation
    _orjson = None


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def loads(data: bytes | str) -> Any:
    """Decode JSON (no NaN/Infinity); any failure is `BadJson` with the parser's reason."""
    try:
        if _orjson is not None:
            return _orjson.loads(data)
        if isinstance(data, bytes):  # as json.loads does, without its per-call decoder
            data = data.decode(json.detect_encoding(data), "surrogatepass")
        return _DECODER.decode(data)
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:
        raise BadJson(f"body is not valid JSON: {exc}") from exc


def dumps(obj: Any) -> bytes:
    if _orjson is not None:
        return _orjson.dumps(obj, default=_plain, option=_orjson.OPT_SERIALIZE_NUMPY)
    return _stdlib_dumps(obj).encode()


def _stdlib_dumps(obj: Any) -> str:
    """json's encoder, except for a float32 embedding (alone or in an answer): written with
    9 significant digits, which round-trip float32 exactly, instead of the 17 of its float64
    repr (half the bytes, ~2x faster)."""
    if _is_float32_matrix(obj):
        return _float32_matrix(obj)
    if isinstance(obj, dict) and _is_float32_matrix(obj.get("embedding")):
        head = _ENCODER.encode({k: v for k, v in obj.items() if k != "embedding"})
        sep = "," if len(obj) > 1 else ""
        return f'{head[:-1]}{sep}"embedding":{_float32_matrix(obj["embedding"])}}}'
    return _ENCODER.encode(obj)


def _is_float32_matrix(value: Any) -> bool:
    return getattr(value, "ndim", None) == 2 and str(value.dtype) == "float32"


def _float32_matrix(z: Any) -> str:
    import numpy as np

    if not np.isfinite(z).all():  # json's own spelling (Infinity, NaN), as before
        return _ENCODER.encode(z.tolist())
    if z.shape[0] == 0:
        return "[]"
    rows = "],[".join(",".join(map(_FLOAT32.format, row)) for row in z.tolist())
    return f"[[{rows}]]"


def dumps_answer_chunked(answer: dict[str, Any], values_per_chunk: int = 20_000) -> bytes:
    """`dumps(answer)` for a large embedding, encoded a block of rows at a time: each
    encoder call holds the GIL only briefly, so the event loop thread keeps getting it."""
    z = answer["embedding"]
    head = dumps({k: v for k, v in answer.items() if k != "embedding"})
    rows = max(1, values_per_chunk // max(1, z.shape[1]))
    blocks = [dumps(z[i : i + rows])[1:-1] for i in range(0, z.shape[0], rows)]
    return head[:-1] + b',"embedding":[' + b",".join(blocks) + b"]}"


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy arrays and scalars: one C conversion to lists
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


# The stdlib path, when orjson is absent: json.loads/dumps with options build a new decoder
# or encoder on every call; these are made once (both are stateless and thread-safe).
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
_ENCODER = json.JSONEncoder(separators=(",", ":"), default=_plain)
_FLOAT32 = "{:.9g}"


# -- work queue ---------------------------------------------------------------------------


# -- parsing ------------------------------------------------------------------------------

# JSON decoding and graph validation hold the GIL for their whole run (~40 ms per MB), so in
# a thread they would still stall the event loop; bodies above this size are parsed in a
# separate process, started on first use so that small installations never pay for it.
LARGE_BODY_BYTES = 512 * 1024
# A body up to this size (a 100-node, 16-feature graph is ~27 KB) is parsed on the event loop
# (~0.3 ms; a few ms at worst), and diffused there too when the engine has the runner loaded
# and free and its measured run takes <= INLINE_MAX_MS (a repeated small topology: ~0.05 ms).
# A thread hop would cost more than the work: on two cores the loop and a worker then trade
# the GIL at every syscall. Anything else goes to a worker.
INLINE_BODY_BYTES = 64 * 1024
INLINE_MAX_MS = 1.0


def parse_graph_body(data: bytes | str | dict[str, Any], limits: Any) -> Any:
    from dgdm.kernels.graph import parse_graph

    obj = loads(data) if isinstance(data, (bytes, str)) else data
    return parse_graph(obj, limits)


def _parse_in_child(data: bytes, limits: Any) -> tuple[str, Any]:
    """Runs in the parser process. Errors come back as values: GraphError's constructor
    does not survive pickling."""
    try:
        return "ok", parse_graph_body(data, limits)
    except GraphError as exc:
        return "graph_error", (exc.field, exc.message, exc.code)
    except BadJson as exc:
        return "bad_json", str(exc)


class GraphParser:
    """A one-process pool for large bodies; `parse` blocks the calling worker thread only."""

    def __init__(self) -> None:
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def parse(self, data: bytes, limits: Any) -> Any:
        status, value = self._executor().submit(_parse_in_child, data, limits).result()
        if status == "graph_error":
            field, message, code = value
            raise GraphError(field, message, code=code)
        if status == "bad_json":
            raise BadJson(value)
        return value

    def _executor(self) -> concurrent.futures.ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                import multiprocessing

                context = multiprocessing.get_context("forkserver")
                self._pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=context)
            return self._pool

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
                self._pool = None


class WorkQueue:
    """A worker pool that admits at most `capacity` jobs (running + waiting)."""

    def __init__(self, workers: int, queue_size: int) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="dgdm-work"
        )
        self.capacity = workers + queue_size
        self.in_flight = 0
        self.accepting = True
        self.completed = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        if not self.accepting:
            raise ShuttingDown("the agent is shutting down")
        if self.in_flight >= self.capacity:
            raise QueueFull(f"all {self.capacity} diffusion slots are busy")
        loop = asyncio.get_running_loop()
        self.in_flight += 1
        self._idle.clear()
        future = self._executor.submit(fn, *args)
        # Count the slot free when the thread is done, not when an awaiting request goes
        # away: a cancelled request does not stop a running diffusion.
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(self._release))
        return await asyncio.wrap_future(future)

    def _release(self) -> None:
        self.in_flight -= 1
        self.completed += 1
        if self.in_flight == 0:
            self._idle.set()

    async def drain(self, timeout_s: float) -> bool:
        self.accepting = False
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


# -- result encodings ---------------------------------------------------------------------


def http_answer(result: Any, seq: int | None) -> dict[str, Any]:
    """The `POST /diffuse` answer (SPEC §4)."""
    import numpy as np

    answer = {
        "job_id": result.job_id,
        "graph_id": result.graph_id,
        "backend": result.backend,
        "latency_ms": round(result.latency_ms, 4),
        "error_bound": result.error_bound,
        "node_ids": list(result.node_ids),
        "embedding": np.ascontiguousarray(result.embedding),
    }
    if seq is not None:
        answer["outbox_seq"] = seq
    return answer


def result_body(result: Any) -> dict[str, Any]:
    """The result message body (SPEC §6): the embedding as little-endian float32 base64."""
    z = result.embedding.astype("<f4", copy=False)
    return {
        "job_id": result.job_id,
        "graph_id": result.graph_id,
        "method": result.method.to_json() if hasattr(result.method, "to_json") else result.method,
        "backend": result.backend,
        "latency_ms": result.latency_ms,
        "error_bound": result.error_bound,
        "node_ids": list(result.node_ids),
        "embedding": {
            "dtype": "<f4",
            "shape": list(z.shape),
            "b64": base64.b64encode(z.tobytes()).decode(),
        },
    }


def parse_features(obj: Any, n: int, max_features: int) -> Any:
    """`{"x": [[...] * F] * N}` for a registered topology of N nodes -> float64 (N, F)."""
    import numpy as np

    if not isinstance(obj, dict):
        raise GraphError("body", "must be a JSON object")
    unknown = set(obj) - {"x"}
    if unknown:
        raise GraphError(str(sorted(unknown)[0]), "is not a known field (only x)")
    x = obj.get("x")
    if not isinstance(x, list) or len(x) != n:
        raise GraphError("x", f"must be a list of {n} feature rows, one per node")
    width = len(x[0]) if n and isinstance(x[0], list) else 0
    if n and not 1 <= width <= max_features:
        raise GraphError("x[0]", f"must hold 1..{max_features} numbers", code="invalid")
    for i, row in enumerate(x):
        if type(row) is not list or len(row) != width:
            raise GraphError(f"x[{i}]", f"must be a list of {width} numbers")
        for j, value in enumerate(row):
            if type(value) not in (int, float):
                raise GraphError(f"x[{i}][{j}]", "must be a number")
    try:
        array = np.array(x, dtype=np.float64).reshape(n, width)
    except OverflowError as exc:
        raise GraphError("x", "holds a number too large for float64") from exc
    if not np.isfinite(array).all():
        raise GraphError("x", "must hold finite numbers only")
    return array


# -- the service --------------------------------------------------------------------------


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        config_path: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.env = env
        self.started_wall = time.time()
        self._started = time.monotonic()
        self.metrics = AgentMetrics()
        self.latency = LatencyWindow()
        self.notifier = Notifier(env)
        self.work = WorkQueue(config.kernels.workers, config.kernels.queue_size)
        self._parser = GraphParser()
        self.alerts = Alerts(
            AlertPolicy(config.alerts.repeat_s, config.alerts.max_per_minute), self._queue_alert
        )
        self.engine: Any = None
        self.limits: Any = None
        self.outbox: Any = None
        self.link: Any = None
        self.tpu: TpuMonitor | None = None
        self.http_port: int | None = None
        self.loop_lag_s = 0.0
        self.telemetry: TelemetryBatcher | None = None
        self._runner: Any = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._side_tasks: set[asyncio.Task[Any]] = set()
        self._offline_since: float | None = time.monotonic()

    # -- lifecycle ------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self.reload()))
        try:
            await self.start()
            await self._stop.wait()
        finally:
            await self.stop()
        return 0

    def request_stop(self) -> None:
        if not self._stop.is_set():
            log.info("stop requested")
            self._stop.set()

    async def start(self) -> None:
        cfg = self.config
        self._loop = asyncio.get_running_loop()
        cfg.device.data_dir.mkdir(parents=True, exist_ok=True)
        # The engine (numpy, scipy, TFLite imports and backend probes) loads in a thread
        # while this one imports and builds the HTTP app: both are needed before listening.
        engine = asyncio.create_task(asyncio.to_thread(self._open_engine))
        try:
            await asyncio.to_thread(self._open_outbox)
            await self._prepare_http()
        finally:
            await engine
        await self._listen()
        await self._start_link()
        self.tpu = TpuMonitor(
            self.alerts,
            self.engine.set_excluded,
            cfg.tpu.temperature_limit_c,
            cfg.tpu.hysteresis_c,
        )
        self.telemetry = TelemetryBatcher(cfg.telemetry.batch_s)
        for job in (self._tpu_loop, self._telemetry_loop, self._lag_loop, self._broker_loop):
            self._tasks.append(asyncio.create_task(job()))
        if cfg.spool.dir is not None:
            self._tasks.append(asyncio.create_task(self._spool_loop(cfg.spool.dir)))
        if self.notifier.watchdog_interval_s:
            self._tasks.append(asyncio.create_task(self._watchdog_loop()))
        status = f"serving on {cfg.http.bind}:{self.http_port}, backend {self.active_backend()}"
        self.notifier.ready(status)
        log.info(
            "agent ready",
            extra={
                "device_id": cfg.device.id,
                "http": f"{cfg.http.bind}:{self.http_port}",
                "backend": self.active_backend(),
                "startup_s": round(time.monotonic() - self._started, 3),
            },
        )

    async def stop(self) -> None:
        """Drain and close everything within STOP_BUDGET_S of the stop request."""
        deadline = time.monotonic() + STOP_BUDGET_S - 0.5
        self.notifier.stopping("draining")
        drained = await self.work.drain(max(0.1, deadline - time.monotonic() - 2.0))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._flush_telemetry()
        await self._wait_side_tasks(max(0.1, deadline - time.monotonic() - 1.5))
        if self.link is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.link.stop(), max(0.1, deadline - time.monotonic() - 1))
        if self._runner is not None:
            await self._runner.cleanup()
        if self.outbox is not None:
            await asyncio.to_thread(self.outbox.close)
        self.work.close()
        await asyncio.to_thread(self._parser.close)
        if self.engine is not None and hasattr(self.engine, "close"):
            await asyncio.to_thread(self.engine.close)
        self.notifier.close()
        log.info("agent stopped", extra={"drained": drained, "in_flight": self.work.in_flight})

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)
        task.add_done_callback(_log_failure)

    async def _wait_side_tasks(self, timeout_s: float) -> None:
        if self._side_tasks:
            await asyncio.wait(set(self._side_tasks), timeout=timeout_s)

    # -- parts ----------------------------------------------------------------------------

    def _open_engine(self) -> None:
        from dgdm.kernels.engine import Engine
        from dgdm.kernels.graph import Limits

        k = self.config.kernels
        self.limits = Limits(
            max_nodes=k.max_nodes,
            max_edges=k.max_edges,
            max_features=k.max_features,
            max_body_bytes=self.config.http.max_body_bytes,
        )
        cache_dir = k.cache_dir or self.config.device.data_dir / "cache"
        self.engine = Engine(backend=k.backend, cache_dir=cache_dir, limits=self.limits)

    def _open_outbox(self) -> None:
        """The outbox needs the link keys (it stores sealed envelopes), so it exists only
        when a coordinator key is configured; without one the agent serves HTTP only."""
        sync = self.config.sync
        if not sync.coordinator_public_key:
            return
        from dgdm.sync.envelope import Kind, seal
        from dgdm.sync.outbox import Outbox

        self.keys = self._link_keys()
        device_id = self.config.device.id
        keys = self.keys

        def sealer(kind: Kind, seq: int, created_ms: int, body: Any) -> bytes:
            plain = kind == Kind.TELEMETRY and not self.config.sync.encrypt_telemetry
            key = None if plain else keys.up
            return seal(kind, seq, created_ms, device_id, body, key=key, key_id=keys.key_id)

        self.outbox = Outbox(
            self.config.device.data_dir / "outbox.db",
            device_id=device_id,
            sealer=sealer,
            max_bytes=sync.max_outbox_bytes,
            on_evict=self._on_evict,
        )

    def _link_keys(self) -> Any:
        from dgdm.sync.crypto import (
            derive_link_keys,
            load_private_key,
            load_public_key,
            raw_public,
        )

        own = load_private_key(self.config.device.private_key)
        peer = load_public_key(self.config.sync.coordinator_public_key or "")
        self.device_public_raw = raw_public(own)
        return derive_link_keys(own, peer, self.config.device.id, raw_public(own), raw_public(peer))

    async def _prepare_http(self) -> None:
        from aiohttp import web

        from dgdm.agent.http import make_app

        app = make_app(self)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()

    async def _listen(self) -> None:
        from aiohttp import web

        http = self.config.http
        site = web.TCPSite(self._runner, http.bind, http.port)
        try:
            await site.start()
        except OSError as exc:
            raise AgentError(f"cannot listen on {http.bind}:{http.port}: {exc.strerror}") from exc
        server = site._server  # aiohttp keeps the listening socket here; port 0 needs it
        sockets = getattr(server, "sockets", None) or []
        self.http_port = sockets[0].getsockname()[1] if sockets else self.config.http.port

    async def _start_link(self) -> None:
        if not self.config.sync.broker_url or self.outbox is None:
            return
        from dgdm.sync.link import DeviceLink
        from dgdm.sync.mqtt import options_from_settings

        sync = self.config.sync
        options = options_from_settings(sync, client_id=f"dgdm-agent-{self.config.device.id}")
        self.link = DeviceLink(
            self.outbox,
            options,
            device_id=self.config.device.id,
            keys=self.keys,
            on_command=self.on_command,
            agent_version=__version__,
            backend=self.active_backend,
            receipt_timeout_s=sync.receipt_timeout_s,
        )
        await self.link.start()

    async def enqueue(self, kind: Any, body: dict[str, Any]) -> int:
        """Durably queue a message and wake the sender so it goes out at once."""
        if self.link is not None:
            return int(await self.link.enqueue(kind, body))
        return int(await asyncio.to_thread(self.outbox.enqueue, kind, body))

    # -- work -----------------------------------------------------------------------------

    async def diffuse(
        self, source: str, data: bytes | dict[str, Any], *, queue: bool
    ) -> tuple[Any, int | None]:
        """Parse and diffuse a graph in a worker; optionally commit the result to the outbox."""
        if queue and self.outbox is None:
            raise NoOutbox("queue=1 needs an outbox: set sync.coordinator_public_key")
        if isinstance(data, bytes) and len(data) <= INLINE_BODY_BYTES:
            result = await self._diffuse_small(data)
        else:
            result = await self.work.run(self._diffuse_blocking, data)
        self._observe(result, source)
        seq = await self._queue_result(result) if queue else None
        return result, seq

    async def diffuse_registered(
        self, source: str, graph_id: str, data: bytes | dict[str, Any], *, queue: bool
    ) -> tuple[Any, int | None]:
        if queue and self.outbox is None:
            raise NoOutbox("queue=1 needs an outbox: set sync.coordinator_public_key")
        result = await self.work.run(self._diffuse_registered_blocking, graph_id, data)
        self._observe(result, source)
        seq = await self._queue_result(result) if queue else None
        return result, seq

    async def _diffuse_small(self, data: bytes) -> Any:
        """A small body: parsed here, diffused here if that is quick, else in a worker."""
        if not self.work.accepting:
            raise ShuttingDown("the agent is shutting down")
        graph = parse_graph_body(data, self.limits)
        result = self.engine.diffuse_ready(graph, max_ms=INLINE_MAX_MS)
        if result is not None:
            return result
        return await self.work.run(self.engine.diffuse, graph)

    def _diffuse_blocking(self, data: bytes | dict[str, Any]) -> Any:
        if isinstance(data, bytes) and len(data) > LARGE_BODY_BYTES:
            return self.engine.diffuse(self._parser.parse(data, self.limits))
        return self.engine.diffuse(parse_graph_body(data, self.limits))

    def _diffuse_registered_blocking(self, graph_id: str, data: bytes | dict[str, Any]) -> Any:
        obj = loads(data) if isinstance(data, (bytes, str)) else data
        n = self._topology_size(graph_id)
        x = parse_features(obj, n, self.limits.max_features)
        return self.engine.diffuse_registered(graph_id, x)

    def _topology_size(self, graph_id: str) -> int:
        from dgdm.kernels.errors import UnknownTopology

        for topo in self.engine.topologies():
            if topo.get("graph_id") == graph_id:
                return int(topo["nodes"])
        raise UnknownTopology(f"no topology is registered as {graph_id!r}")

    def _observe(self, result: Any, source: str) -> None:
        self.latency.record(result.latency_ms)
        self.metrics.diffusions.labels(result.backend, source).inc()
        self.metrics.duration.labels(result.backend).observe(result.latency_ms / 1000.0)

    async def _queue_result(self, result: Any) -> int:
        from dgdm.sync.envelope import Kind

        return await self.enqueue(Kind.RESULT, result_body(result))

    async def register_graph(self, graph_id: str, data: bytes) -> dict[str, Any]:
        def job() -> dict[str, Any]:
            from dgdm.kernels.graph import parse_graph

            obj = loads(data)
            if isinstance(obj, dict):
                if obj.get("graph_id", graph_id) != graph_id:
                    raise GraphError("graph_id", "must match the graph id in the path")
                obj = {**obj, "graph_id": graph_id}
            self.engine.register(parse_graph(obj, self.limits))
            return next(t for t in self.engine.topologies() if t["graph_id"] == graph_id)

        return await self.work.run(job)

    async def update_graph(self, graph_id: str, data: bytes) -> dict[str, Any]:
        def job() -> dict[str, Any]:
            obj = loads(data)
            return dict(self.engine.update_edges(graph_id, **parse_edge_changes(obj)))

        return await self.work.run(job)

    async def unregister_graph(self, graph_id: str) -> dict[str, Any]:
        await self.work.run(self.engine.unregister, graph_id)
        return {"graph_id": graph_id, "deleted": True}

    def active_backend(self) -> str:
        try:
            return str(self.engine.active_backend())
        except DgdmError:
            return "none"

    # -- state for HTTP -------------------------------------------------------------------

    async def outbox_stats(self) -> Any:
        if self.outbox is None:
            return None
        return await asyncio.to_thread(self.outbox.stats)

    async def status(self) -> dict[str, Any]:
        from dgdm.sync.settings import summary

        stats = await self.outbox_stats()
        return {
            "device_id": self.config.device.id,
            "agent_version": __version__,
            "uptime_s": round(time.monotonic() - self._started, 3),
            "started_ms": int(self.started_wall * 1000),
            "active_backend": self.active_backend(),
            "backends": self.engine.backends_status(),
            "tpu": self.tpu_json(),
            "broker": self.broker_json(),
            "outbox": outbox_json(stats),
            "queue": {"in_flight": self.work.in_flight, "capacity": self.work.capacity},
            "diffusions": self.latency.count,
            "latency_ms": self.latency.recent_percentiles(),
            "recent_latency_ms": [round(ms, 3) for _, ms in list(self.latency.recent)[-60:]],
            "alerts": list(self.alerts.recent)[-10:],
            "config": summary(self.config),
        }

    def tpu_json(self) -> dict[str, Any]:
        reading = self.tpu.reading.to_json() if self.tpu else {"present": False}
        limit = self.config.tpu.temperature_limit_c
        protecting = bool(self.tpu and self.tpu.protecting)
        return {**reading, "temperature_limit_c": limit, "thermal_protection": protecting}

    def broker_json(self) -> dict[str, Any]:
        if self.link is None:
            return {"configured": bool(self.config.sync.broker_url), "connected": False}
        last = getattr(self.link, "last_sync_ms", None)
        return {"configured": True, "connected": bool(self.link.connected), "last_sync_ms": last}

    async def health(self) -> tuple[bool, dict[str, Any]]:
        checks: dict[str, Any] = {"loop": self.loop_lag_s < LOOP_LAG_UNHEALTHY_S}
        checks["store"] = await self._store_ok()
        checks["backend"] = any(
            b.get("available") and b.get("healthy", True) for b in self.engine.backends_status()
        )
        return all(checks.values()), checks

    async def _store_ok(self) -> bool:
        if self.outbox is None:
            return True
        try:
            stats = await asyncio.wait_for(asyncio.to_thread(self.outbox.stats), 2.0)
        except (TimeoutError, DgdmError) as exc:
            log.warning("outbox check failed", extra={"error": str(exc)})
            return False
        return not stats.storage_full

    async def metrics_text(self) -> bytes:
        stats = await self.outbox_stats()
        reading = self.tpu.reading if self.tpu else None
        snapshot = Snapshot(
            outbox_messages={k: v.messages for k, v in stats.kinds.items()} if stats else {},
            outbox_bytes={k: v.bytes for k, v in stats.kinds.items()} if stats else {},
            outbox_dropped=stats.dropped if stats else 0,
            mqtt_connected=bool(self.link.connected) if self.link is not None else None,
            last_sync_s=_seconds(getattr(self.link, "last_sync_ms", None)),
            tpu_present=bool(reading and reading.present),
            tpu_temp_c=reading.temp_c if reading else None,
            queue_depth=self.work.in_flight,
        )
        self.metrics.thermal_throttled.set(int(bool(self.tpu and self.tpu.protecting)))
        return self.metrics.render(snapshot)

    # -- background loops -----------------------------------------------------------------

    async def _lag_loop(self) -> None:
        """Measures how late the loop wakes up: a blocked loop shows up here and in health."""
        period = 0.25
        while True:
            before = time.monotonic()
            await asyncio.sleep(period)
            self.loop_lag_s = max(0.0, time.monotonic() - before - period)

    async def _watchdog_loop(self) -> None:
        interval = self.notifier.watchdog_interval_s or 1.0
        while True:
            healthy, checks = await self.health()
            if healthy:
                self.notifier.watchdog()
            else:
                log.warning("health check failed: no watchdog ping", extra={"checks": checks})
            await asyncio.sleep(interval)

    async def _tpu_loop(self) -> None:
        assert self.tpu is not None
        while True:
            try:
                await self.tpu.poll()
            except DgdmError as exc:
                log.warning("TPU poll failed", extra={"error": str(exc)})
            self.tpu.limit_c = self.config.tpu.temperature_limit_c
            self.tpu.hysteresis_c = self.config.tpu.hysteresis_c
            await asyncio.sleep(self.config.tpu.poll_s)

    async def _telemetry_loop(self) -> None:
        sampler = await asyncio.to_thread(Sampler, self.config.device.data_dir)
        while True:
            await asyncio.sleep(self.config.telemetry.interval_s)
            sample = await self._sample(sampler)
            self._check_disk(sample["disk_free_bytes"])
            assert self.telemetry is not None
            self.telemetry.batch_s = self.config.telemetry.batch_s
            body = self.telemetry.add(sample)
            if body is not None:
                await self._queue_telemetry(body)

    async def _sample(self, sampler: Sampler) -> dict[str, Any]:
        stats = await self.outbox_stats()
        outbox = (
            {"messages": stats.messages, "bytes": stats.bytes, "dropped": stats.dropped}
            if stats
            else {}
        )
        reading = self.tpu.reading if self.tpu else None
        inputs = SampleInputs(
            tpu_present=bool(reading and reading.present),
            tpu_temp_c=reading.temp_c if reading else None,
            outbox=outbox,
            diffusions=self.latency.count,
            latencies_ms=self.latency.take(),
        )
        return await asyncio.to_thread(sampler.sample, inputs)

    async def _queue_telemetry(self, body: dict[str, Any]) -> None:
        if self.outbox is None:
            return
        from dgdm.sync.envelope import Kind

        try:
            await self.enqueue(Kind.TELEMETRY, body)
        except DgdmError as exc:
            log.warning("telemetry not queued", extra={"error": str(exc)})
            return
        self.metrics.telemetry_batches.inc()

    async def _flush_telemetry(self) -> None:
        body = self.telemetry.flush() if self.telemetry else None
        if body is not None:
            await self._queue_telemetry(body)

    def _check_disk(self, free: int) -> None:
        limit = self.config.alerts.disk_min_free_bytes
        details = {
            "free_bytes": free,
            "min_free_bytes": limit,
            "path": str(self.config.device.data_dir),
        }
        if free < limit:
            self.alerts.condition(
                Alert("disk_low", WARNING, f"Disk low: {free} bytes free.", details)
            )
        else:
            self.alerts.resolved("disk_low", Alert("disk_ok", INFO, "Disk space is back.", details))

    async def _broker_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self._check_broker(time.monotonic())

    def _check_broker(self, now: float) -> None:
        if self.link is None:
            return
        if self.link.connected:
            self._offline_since = None
            self.alerts.resolved(
                "broker_unreachable", Alert("broker_reachable", INFO, "Broker reachable again.")
            )
            return
        if self._offline_since is None:
            self._offline_since = now
        offline_s = now - self._offline_since
        if offline_s > self.config.sync.offline_alert_s:
            message = f"Broker unreachable for {int(offline_s)} s."
            details = {"offline_s": round(offline_s, 1)}
            self.alerts.condition(Alert("broker_unreachable", WARNING, message, details))

    def _on_evict(self, kind: Any, count: int) -> None:
        """Called by the outbox writer thread: hop onto the loop."""
        name = getattr(kind, "name", str(kind)).lower()
        alert = Alert(
            "outbox_evicting",
            WARNING,
            f"Outbox full: evicted {count} {name} message(s).",
            {"kind": name, "count": count},
        )
        with contextlib.suppress(RuntimeError):  # the loop is already closed at shutdown
            self._loop.call_soon_threadsafe(self.alerts.condition, alert)

    def _queue_alert(self, alert: Alert) -> None:
        self.metrics.alerts.labels(alert.code).inc()
        if self.outbox is None:
            return
        from dgdm.sync.envelope import Kind

        self._spawn(self.enqueue(Kind.ALERT, alert.body()))

    # -- spool ----------------------------------------------------------------------------

    async def _spool_loop(self, spool: Path) -> None:
        for sub in ("done", "failed"):
            (spool / sub).mkdir(parents=True, exist_ok=True)
        while True:
            for path in await asyncio.to_thread(_spool_files, spool):
                if not await self._spool_one(path):
                    break  # queue full or shutting down: try again on the next round
            await asyncio.sleep(self.config.spool.poll_s)

    async def _spool_one(self, path: Path) -> bool:
        """Process one spool file; False if it must wait (queue full) and stays in place."""
        try:
            data = await asyncio.to_thread(path.read_bytes)
            result, _ = await self.diffuse("spool", data, queue=self.outbox is not None)
        except (QueueFull, ShuttingDown):
            return False
        except (GraphError, BadJson) as exc:
            await asyncio.to_thread(_move_failed, path, str(exc))
            self.metrics.spool_files.labels("failed").inc()
            log.warning("spool file refused", extra={"file": path.name, "error": str(exc)})
            return True
        except OSError as exc:  # vanished or unreadable: skip, try again next round
            log.warning("spool file unreadable", extra={"file": path.name, "error": str(exc)})
            return True
        answer = None if self.outbox is not None else dumps(http_answer(result, None))
        await asyncio.to_thread(_move_done, path, answer)
        self.metrics.spool_files.labels("done").inc()
        return True

    # -- commands (MQTT cmd topic) --------------------------------------------------------

    async def on_command(self, cmd_seq: int, body: dict[str, Any]) -> dict[str, Any]:
        """Execute one command; the reply body (SPEC §6) never raises for bad input."""
        cmd = body.get("cmd")
        args = body.get("args") or {}
        try:
            data = await self._command(str(cmd), args)
        except (DgdmError, ValueError, TypeError) as exc:
            self.metrics.commands.labels(str(cmd)[:32], "false").inc()
            return {"cmd_seq": cmd_seq, "ok": False, "error": str(exc), "data": None}
        self.metrics.commands.labels(str(cmd), "true").inc()
        return {"cmd_seq": cmd_seq, "ok": True, "error": None, "data": data}

    async def _command(self, cmd: str, args: Any) -> Any:
        if cmd == "ping":
            return {"pong": True, "ts_ms": int(time.time() * 1000)}
        if cmd == "status":
            return await self.status()
        if cmd == "diffuse":
            if not isinstance(args, dict):
                raise GraphError("args", "must be a graph object")
            graph = args.get("graph", args)
            result, seq = await self.diffuse("command", graph, queue=True)
            return {
                "job_id": result.job_id,
                "result_seq": seq,
                "backend": result.backend,
                "latency_ms": result.latency_ms,
                "error_bound": result.error_bound,
            }
        raise AgentError(f"unknown command {cmd!r} (known: ping, status, diffuse)")

    # -- SIGHUP ---------------------------------------------------------------------------

    async def reload(self) -> None:
        try:
            new = await asyncio.to_thread(load_config, self.config_path, self.env)
        except DgdmError as exc:
            log.error("reload refused, keeping the running config", extra={"error": str(exc)})
            return
        applied, ignored = changed_settings(self.config, new)
        self.config = merge_reloadable(self.config, new)
        logs.set_level(self.config.log.level)
        self.alerts.policy.repeat_s = self.config.alerts.repeat_s
        self.alerts.policy.max_per_minute = self.config.alerts.max_per_minute
        log.info("config reloaded", extra={"applied": applied, "needs_restart": ignored})
        self.notifier.status(f"reloaded: {', '.join(applied) or 'nothing changed'}")


def changed_settings(old: AgentConfig, new: AgentConfig) -> tuple[list[str], list[str]]:
    """Keys whose value differs, split into (reloadable, needs restart)."""
    changed = [
        f"{section.name}.{f.name}"
        for section in dataclasses.fields(old)
        for f in dataclasses.fields(getattr(old, section.name))
        if getattr(getattr(old, section.name), f.name)
        != getattr(getattr(new, section.name), f.name)
    ]
    return [k for k in changed if k in RELOADABLE], [k for k in changed if k not in RELOADABLE]


def merge_reloadable(old: AgentConfig, new: AgentConfig) -> AgentConfig:
    sections = {}
    for section in dataclasses.fields(old):
        current, fresh = getattr(old, section.name), getattr(new, section.name)
        updates = {
            f.name: getattr(fresh, f.name)
            for f in dataclasses.fields(current)
            if f"{section.name}.{f.name}" in RELOADABLE
        }
        sections[section.name] = dataclasses.replace(current, **updates)
    return dataclasses.replace(old, **sections)


def parse_edge_changes(obj: Any) -> dict[str, list[Any]]:
    """`{"add": [...], "remove": [...], "reweight": [...]}` for PATCH /graphs/{id}; the engine
    checks each edge (known nodes, weights) and names the bad one."""
    if not isinstance(obj, dict):
        raise GraphError("body", "must be a JSON object")
    unknown = set(obj) - {"add", "remove", "reweight"}
    if unknown:
        raise GraphError(str(sorted(unknown)[0]), "is not a known field (add, remove, reweight)")
    changes: dict[str, list[Any]] = {}
    for name in ("add", "remove", "reweight"):
        edges = obj.get(name, [])
        if not isinstance(edges, list):
            raise GraphError(name, "must be a list of edges")
        changes[name] = edges
    if not any(changes.values()):
        raise GraphError("body", "must change at least one edge (add, remove or reweight)")
    return changes


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("background job failed", extra={"error": str(task.exception())})


def _seconds(ms: int | None) -> float | None:
    return None if ms is None else ms / 1000.0


def outbox_json(stats: Any) -> dict[str, Any]:
    """Depth, bytes and oldest age per kind, never payloads (SPEC §4 /outbox)."""
    if stats is None:
        return {"enabled": False}
    return {
        "enabled": True,
        "messages": stats.messages,
        "bytes": stats.bytes,
        "dropped": stats.dropped,
        "max_bytes": stats.max_bytes,
        "storage_full": stats.storage_full,
        "kinds": {name: dataclasses.asdict(k) for name, k in stats.kinds.items()},
    }


def _spool_files(spool: Path) -> list[Path]:
    """JSON files not touched for a second (a writer may still be busy with newer ones)."""
    now = time.time()
    files = [p for p in spool.glob("*.json") if p.is_file() and now - p.stat().st_mtime > 1.0]
    return sorted(files, key=lambda p: p.stat().st_mtime)


def _move_done(path: Path, answer: bytes | None) -> None:
    target = path.parent / "done" / path.name
    if answer is not None:
        target.with_suffix(".result.json").write_bytes(answer)
    path.replace(target)


def _move_failed(path: Path, reason: str) -> None:
    target = path.parent / "failed" / path.name
    target.with_suffix(".error.txt").write_text(reason + "\n", encoding="utf-8")
    path.replace(target)


async def serve(config: AgentConfig, config_path: Path | None) -> int:
    """Run the agent until SIGTERM/SIGINT; the `dgdm agent` entry point."""
    agent = Agent(config, config_path)
    return await agent.run()
