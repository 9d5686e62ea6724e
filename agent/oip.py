"""The Open Inference Protocol v2 on the agent (SPEC §4.1): a registered topology is a model.

`add_oip_routes(app, host)` adds the `/v2` routes and one outer middleware that gives every
`/v2` answer the protocol's error form `{"error": "<sentence>"}`: refusals raised here, and
the app's own (401 from its auth middleware, 404/405 from the router) rewritten. The health
routes are answered before the app's auth (open, as `/healthz` is), with the app's Host
check repeated; everything else under `/v2` goes through both. Diffusions go through a
`Batcher`, so concurrent requests on one topology share a backend call; a PATCH between a
request's version check and its run is caught by a second check after the run (the answer
would otherwise name the wrong version).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import numpy as np
from aiohttp import web

from dgdm.agent import __version__, hosts
from dgdm.agent.answers import result_body
from dgdm.agent.batcher import Batcher, sets_of, side_by_side
from dgdm.agent.diffusion import HEAVY_S
from dgdm.agent.errors import BadJson, NoOutbox, QueueFull, ShuttingDown
from dgdm.agent.jsonio import dumps, loads
from dgdm.agent.oip_codec import (
    DATATYPE,
    INPUT,
    OUTPUT,
    InferRequest,
    OipRequestError,
    encode_infer,
    error_body,
    parse_infer,
)
from dgdm.kernels.errors import BackendError, GraphError, UnknownTopology
from dgdm.sync.errors import OutboxError

if TYPE_CHECKING:
    from dgdm.agent.config import AgentConfig
    from dgdm.agent.tally import Tally
    from dgdm.agent.work import WorkQueue
    from dgdm.kernels.engine import Engine
    from dgdm.kernels.registry import Topology
    from dgdm.sync.envelope import Kind
    from dgdm.sync.outbox import Outbox

HEADER_LENGTH = "Inference-Header-Content-Length"
OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})
BODY_TYPES = frozenset({"application/json", "application/octet-stream"})
# Bodies and answers above these sizes are decoded / encoded in a thread: JSON numbers cost
# ~1 us each, which would stall every other request on the loop.
INLINE_BODY_BYTES = 64 * 1024
INLINE_ENCODE_VALUES = 20_000
INLINE_MAX_MS = 0.5
MAX_REMEMBERED = 256
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Key = tuple[str, str]  # graph id, operator version


class OipError(Exception):
    """A refusal on a `/v2` path: status and the sentence the client shows."""

    def __init__(self, status: int, sentence: str, **headers: str) -> None:
        super().__init__(sentence)
        self.status = status
        self.sentence = sentence
        self.headers = headers


class OipHost(Protocol):
    """What the routes use of the process serving them: the agent, or one of its serving
    processes (agent/serving.py), whose registry follows the agent's and which passes a
    request to queue on to the agent."""

    @property
    def config(self) -> AgentConfig: ...
    @property
    def engine(self) -> Engine: ...
    @property
    def work(self) -> WorkQueue: ...
    @property
    def outbox(self) -> Outbox | None: ...
    @property
    def tally(self) -> Tally: ...
    async def enqueue(self, kind: Kind, body: dict[str, Any]) -> int: ...
    async def health(self) -> tuple[bool, dict[str, Any]]: ...


# A serving process's hand-off of a request it does not answer itself (its body read).
Forward = Callable[[web.Request, bytes], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class _Models:
    host: OipHost
    batcher: Batcher[Key, Any]
    follow: Callable[[], None]  # the registry as of now (a serving process re-reads it)
    forward: Forward | None  # where a request to queue goes (None: queued here)


MODELS: web.AppKey[_Models] = web.AppKey("oip_models")


def add_oip_routes(
    app: web.Application,
    host: OipHost,
    *,
    follow: Callable[[], None] = lambda: None,
    forward: Forward | None = None,
    routes: tuple[web.RouteDef, ...] | None = None,
) -> None:
    kernels = host.config.kernels
    window_s = kernels.batch_window_us / 1e6
    batcher: Batcher[Key, Any] = Batcher(_Runs(host, follow), window_s, kernels.max_features)
    app[MODELS] = _Models(host, batcher, follow, forward)
    app.middlewares.insert(0, oip_middleware)
    app.add_routes(ROUTES if routes is None else routes)


# -- errors -------------------------------------------------------------------------------


def oip_error(status: int, sentence: str, headers: Any = None) -> web.Response:
    return web.Response(
        status=status, body=error_body(sentence), content_type="application/json", headers=headers
    )


@web.middleware
async def oip_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not request.path.startswith("/v2"):
        return await handler(request)
    if request.path in OPEN_PATHS:
        if not _host_allowed(request):
            return oip_error(421, "the Host header must name this box (see http.allowed_hosts)")
        try:
            return await request.match_info.handler(request)
        except web.HTTPException as exc:  # 405: another method on an open path
            if exc.status < 400:
                raise
            return oip_error(exc.status, exc.reason, _kept_headers(exc.headers))
    response = await handler(request)
    if response.status < 400 or not isinstance(response, web.Response):
        return response
    return _rewritten(response)


def _host_allowed(request: web.Request) -> bool:
    """The app's DNS-rebinding check, which the open paths skip along with its auth."""
    http = request.app[MODELS].host.config.http
    return hosts.addressed_here(request.headers.get("Host"), http.bind, http.allowed_hosts)


def _refusals(handler: Handler) -> Handler:
    """A handler whose `OipError` becomes its answer (the app's own error middleware would
    take any other exception for a bug)."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except OipError as exc:
            return oip_error(exc.status, exc.sentence, exc.headers)

    return wrapped


def _rewritten(response: web.Response) -> web.Response:
    """The app's `{"error": code, "message": sentence}` as `{"error": sentence}`."""
    try:
        sentence = str(loads(response.body)["message"])  # type: ignore[arg-type]
    except (BadJson, KeyError, TypeError):
        return response
    return oip_error(response.status, sentence, _kept_headers(response.headers))


def _kept_headers(headers: Any) -> dict[str, str]:
    kept = ("Allow", "WWW-Authenticate", "Retry-After")
    return {k: headers[k] for k in kept if k in headers}


def _refusal(exc: Exception) -> OipError:
    """What the agent and the engine raise, as a protocol refusal."""
    if isinstance(exc, GraphError):
        return OipError(413 if exc.code == "too_large" else 400, str(exc))
    if isinstance(exc, (BadJson, NoOutbox)):
        return OipError(400, str(exc))
    if isinstance(exc, UnknownTopology):
        return OipError(404, str(exc))
    if isinstance(exc, QueueFull):
        return OipError(503, str(exc), **{"Retry-After": str(QueueFull.retry_after_s)})
    if isinstance(exc, (ShuttingDown, BackendError)):
        return OipError(503, str(exc), **{"Retry-After": "5"})
    if isinstance(exc, OutboxError):  # StorageFull, OutboxFull: computed but not stored
        return OipError(503, f"the results could not be queued: {exc}", **{"Retry-After": "60"})
    raise exc


_REFUSED = (
    GraphError,
    BadJson,
    NoOutbox,
    UnknownTopology,
    QueueFull,
    ShuttingDown,
    BackendError,
    OutboxError,
)


# -- models -------------------------------------------------------------------------------


def _model(host: OipHost, follow: Callable[[], None], name: str, version: str | None) -> Topology:
    """The registered topology `name`, which must be at `version` when one is asked."""
    follow()
    try:
        topo = host.engine.topology(name)
    except UnknownTopology:
        raise OipError(
            404, f"unknown model {name!r}: register it with PUT /graphs/{{id}}"
        ) from None
    at = topo.problem.key
    if version is not None and version != at:
        raise OipError(404, f"model {name!r} has no version {version!r} (it is at {at})")
    return topo


def _feature_width(topo: Topology) -> int:
    """The registered feature width, or -1 (any) when the topology came without features."""
    width = topo.features
    return width if type(width) is int and width > 0 else -1


class _Runs:
    """The batcher's backend call. A call whose last measured cost, scaled to this width,
    is at most INLINE_MAX_MS runs on the loop, as `EngineJobs` does for small graphs: a
    thread hop costs more than a 100-node diffusion, and on two cores a worker and the
    loop then trade the GIL. Anything else, and the first call on a version, goes to a
    worker, in the heavy lane when the engine's cost model puts it above HEAVY_S (as the
    JSON routes choose); a slow inline run sends the next one back there."""

    def __init__(self, host: OipHost, follow: Callable[[], None]) -> None:
        self.host = host
        self.follow = follow
        self._ms_per_column: dict[Key, float] = {}

    async def __call__(self, key: Key, x: np.ndarray) -> Any:
        graph_id, version = key
        host = self.host
        _model(host, self.follow, graph_id, version)
        cost = self._ms_per_column.get(key)
        if cost is not None and cost * x.shape[1] <= INLINE_MAX_MS:
            host.work.check_accepting()
            result = host.engine.diffuse_registered(graph_id, x)
        else:
            engine = host.engine
            heavy = engine.estimate_registered_seconds(graph_id, x.shape[1]) > HEAVY_S
            result = await host.work.run(engine.diffuse_registered, graph_id, x, heavy=heavy)
        self._remember(key, result.latency_ms / x.shape[1])
        _model(host, self.follow, graph_id, version)  # a PATCH during the run: not this version
        return result

    def _remember(self, key: Key, ms_per_column: float) -> None:
        if key not in self._ms_per_column and len(self._ms_per_column) >= MAX_REMEMBERED:
            self._ms_per_column.clear()  # old versions and deleted graphs: start afresh
        self._ms_per_column[key] = ms_per_column


# -- handlers -----------------------------------------------------------------------------


async def server_metadata(request: web.Request) -> web.Response:
    body = {"name": "dgdm", "version": __version__, "extensions": ["binary_tensor_data"]}
    return _json(body)


async def live(request: web.Request) -> web.Response:
    return _json({"live": True})


async def ready(request: web.Request) -> web.Response:
    ok, checks = await request.app[MODELS].host.health()
    if not ok:
        failing = ", ".join(sorted(name for name, good in checks.items() if not good))
        raise OipError(503, f"the agent is not ready (failing checks: {failing})")
    return _json({"ready": True})


async def model_metadata(request: web.Request) -> web.Response:
    name, version = _path(request)
    models = request.app[MODELS]
    topo = _model(models.host, models.follow, name, version)
    shape = [-1, len(topo.node_ids), _feature_width(topo)]
    tensor = {"datatype": DATATYPE, "shape": shape}
    return _json(
        {
            "name": name,
            "versions": [topo.problem.key],
            "platform": "dgdm",
            "inputs": [{"name": INPUT, **tensor}],
            "outputs": [{"name": OUTPUT, **tensor}],
        }
    )


async def model_ready(request: web.Request) -> web.Response:
    name, version = _path(request)
    models = request.app[MODELS]
    topo = _model(models.host, models.follow, name, version)
    return _json({"name": name, "version": topo.problem.key, "ready": True})


async def infer(request: web.Request) -> web.StreamResponse:
    name, version = _path(request)
    models = request.app[MODELS]
    host = models.host
    topo = _model(host, models.follow, name, version)
    body, req = await _request(request)
    max_features = host.config.kernels.max_features
    sets = _feature_sets(req.x, topo, max_features)
    if req.queue and models.forward is not None:
        return await models.forward(request, body)  # the agent's outbox, not this process's
    if req.queue and host.outbox is None:
        raise OipError(400, "parameters.queue needs an outbox: set sync.coordinator_public_key")
    key = (name, topo.problem.key)
    try:
        pieces = await models.batcher.diffuse(key, side_by_side(sets, max_features))
        z = sets_of([z for _, z in pieces], sets.shape[2])
        per_block = max(1, max_features // sets.shape[2])
        _count(host.tally, name, pieces, per_block, len(z))
        seqs = []
        if req.queue:
            per_set = [(pieces[b // per_block][0], z[b]) for b in range(len(z))]
            seqs = await _queue(host, per_set)
    except _REFUSED as exc:
        raise _refusal(exc) from exc
    return await _answer(name, key[1], req, z if req.x.ndim == 3 else z[0], seqs)


def _path(request: web.Request) -> tuple[str, str | None]:
    return request.match_info["name"], request.match_info.get("version")


async def _request(request: web.Request) -> tuple[bytes, InferRequest]:
    header_length = _header_length(request)
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise OipError(413, "the request body is larger than http.max_body_bytes") from None
    try:
        if len(body) > INLINE_BODY_BYTES and header_length is None:
            return body, await asyncio.to_thread(parse_infer, body, header_length)
        return body, parse_infer(body, header_length)
    except OipRequestError as exc:
        raise OipError(400, str(exc)) from None


def _header_length(request: web.Request) -> int | None:
    """Inference-Header-Content-Length, once the request passed the cross-site checks."""
    _check_same_site(request)
    raw = request.headers.get(HEADER_LENGTH)
    if raw is None:  # tritonclient.http.aio sends a JSON-only body as octet-stream too
        return None
    if not raw.isdigit():
        raise OipError(400, f"{HEADER_LENGTH} must be a number of bytes, not {raw!r}")
    return int(raw)


def _check_same_site(request: web.Request) -> None:
    """A web page may POST to a loopback agent without a token: browsers send the form and
    text/plain types without asking first, and every cross-site POST carries Origin.
    Inference clients send neither (tritonclient sends no Content-Type at all)."""
    if "Content-Type" in request.headers and request.content_type not in BODY_TYPES:
        raise OipError(
            400, f"unsupported content type {request.content_type!r}: send application/json"
        )
    origin = request.headers.get("Origin")
    if origin is not None and urlsplit(origin).netloc != request.host:
        raise OipError(400, f"cross-site requests are refused (Origin {origin!r})")


def _feature_sets(x: np.ndarray, topo: Topology, max_features: int) -> np.ndarray:
    """x as (B, N, F) feature sets, checked against the model."""
    n, f = x.shape[-2], x.shape[-1]
    if n != len(topo.node_ids):
        raise OipError(
            400,
            f"input {INPUT} has N = {n} rows but model {topo.graph_id!r} has "
            f"{len(topo.node_ids)} nodes",
        )
    width = _feature_width(topo)
    if width > 0 and f != width:
        raise OipError(400, f"input {INPUT} has F = {f} features but the model takes {width}")
    if f > max_features:
        raise OipError(413, f"input {INPUT} has F = {f} features, over kernels.max_features")
    return x if x.ndim == 3 else x[None]


def _count(
    tally: Tally, graph_id: str, pieces: list[tuple[Any, np.ndarray]], per_block: int, sets: int
) -> None:
    """Each block's call once in the latency figures, its feature sets in the counter. The
    calls that served this request alone feed `latency_anomaly` as the JSON routes' do: a
    fused call's width, and so its latency, follows the load, not the box's health."""
    for i, (result, z) in enumerate(pieces):
        tally.diffusions(result.backend, min(per_block, sets - i * per_block), result.latency_ms)
        if result.embedding.shape[1] == z.shape[1]:
            tally.lone_call(graph_id, int(z.shape[1]), result.latency_ms, result.backend)


async def _queue(host: OipHost, per_set: list[tuple[Any, np.ndarray]]) -> list[int]:
    """One result message (SPEC §6) per feature set, committed before the answer."""
    from dgdm.sync.envelope import Kind

    results = [
        dataclasses.replace(r, job_id=os.urandom(16).hex(), embedding=np.ascontiguousarray(z))
        for r, z in per_set
    ]
    return list(await asyncio.gather(*(host.enqueue(Kind.RESULT, result_body(r)) for r in results)))


async def _answer(
    name: str, version: str, req: InferRequest, z: np.ndarray, seqs: list[int]
) -> web.Response:
    params = {"outbox_seq": seqs} if seqs else None
    args = (name, version, req.request_id, z)
    if req.binary_output or z.size <= INLINE_ENCODE_VALUES:
        body, length = encode_infer(*args, binary=req.binary_output, parameters=params)
    else:
        body, length = await asyncio.to_thread(
            lambda: encode_infer(*args, binary=False, parameters=params)
        )
    if length is None:
        return web.Response(body=body, content_type="application/json")
    headers = {HEADER_LENGTH: str(length)}
    return web.Response(body=body, content_type="application/octet-stream", headers=headers)


def _json(obj: Any) -> web.Response:
    return web.Response(body=dumps(obj), content_type="application/json")


_MODEL = "/v2/models/{name}"
_VERSION = _MODEL + "/versions/{version}"
ROUTES = (
    web.get("/v2", _refusals(server_metadata)),
    web.get("/v2/health/live", _refusals(live)),
    web.get("/v2/health/ready", _refusals(ready)),
    web.get(_MODEL, _refusals(model_metadata)),
    web.get(_VERSION, _refusals(model_metadata)),
    web.get(_MODEL + "/ready", _refusals(model_ready)),
    web.get(_VERSION + "/ready", _refusals(model_ready)),
    web.post(_MODEL + "/infer", _refusals(infer)),
    web.post(_VERSION + "/infer", _refusals(infer)),
)
