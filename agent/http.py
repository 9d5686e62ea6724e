"""The local HTTP endpoint (SPEC §4): an aiohttp app built by `make_app(agent)`.

Handlers check what they can cheaply (content type, query flags, path ids, size) and hand
the body to the agent, which parses and diffuses it in a worker thread. Every refusal is a
JSON `{"error", "message"}` with a 4xx status chosen by what was wrong; 503 means "busy or
stopping, retry" and 507 "the disk is full, nothing stored", both with Retry-After. The
Host header (421 unless this box's) and the bearer token, when required, are checked
before a body is read; bodies in memory and their pace are bounded (sync/http_guard.py).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import hmac
import importlib.resources
import logging
import math
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from dgdm.agent import __version__, hosts
from dgdm.agent import status as state
from dgdm.agent.answers import http_answer, outbox_json
from dgdm.agent.errors import BadJson, NoOutbox, QueueFull, ShuttingDown
from dgdm.agent.jsonio import dumps, dumps_answer_chunked
from dgdm.agent.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from dgdm.agent.oip import add_oip_routes
from dgdm.agent.openapi import openapi_document
from dgdm.kernels.errors import BackendError, DeadlineExceeded, GraphError, UnknownTopology
from dgdm.sync.errors import OutboxError, OutboxFull, StorageFull
from dgdm.sync.http_guard import HttpGuard
from dgdm.sync.settings import is_loopback

if TYPE_CHECKING:
    from dgdm.agent.config import AgentConfig, HttpSettings
    from dgdm.agent.diffusion import EngineJobs
    from dgdm.agent.metrics import AgentMetrics
    from dgdm.agent.runtime import Agent
    from dgdm.agent.tally import Tally
    from dgdm.sync.http_limits import BodyBudget, ConnectionTable

log = logging.getLogger(__name__)


class HttpHost(Protocol):
    """What the middlewares use of the process serving: the agent, or a serving process."""

    @property
    def config(self) -> AgentConfig: ...
    @property
    def metrics(self) -> AgentMetrics: ...
    @property
    def tally(self) -> Tally: ...
    @property
    def connections(self) -> ConnectionTable: ...
    @property
    def body_budget(self) -> BodyBudget: ...


HOST: web.AppKey[HttpHost] = web.AppKey("http_host")
AGENT: web.AppKey[Agent] = web.AppKey("agent")
GRAPH_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
JSON_TYPES = frozenset({"application/json"})
_FLAGS = {"": True, "1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
    421: "bad_host",
    422: "invalid",
    500: "internal",
    503: "unavailable",
}
# Up to this many embedding values are encoded on the loop (well under a millisecond);
# beyond it the thread hop is cheaper than blocking every other request.
INLINE_ENCODE_VALUES = 20_000
# A body must keep http.body_min_bytes_per_s from this long after its headers.
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Asked on every request about the one configured bind address (ipaddress parses it).
_is_loopback = functools.lru_cache(maxsize=16)(is_loopback)


class ApiError(Exception):
    """A refusal with its status, code and one human sentence."""

    def __init__(self, status: int, code: str, message: str, **headers: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def error_response(status: int, code: str, message: str, headers: Any = None) -> web.Response:
    body = dumps({"error": code, "message": message})
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


def json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=dumps(obj), content_type="application/json")


async def answer_response(result: Any, seq: int | None) -> web.Response:
    """A diffusion answer; a big embedding is encoded off the loop (it takes milliseconds)."""
    answer = http_answer(result, seq)
    if result.embedding.size <= INLINE_ENCODE_VALUES:
        return json_response(answer)
    body = await asyncio.to_thread(dumps_answer_chunked, answer)
    return web.Response(body=body, content_type="application/json")


# -- middlewares --------------------------------------------------------------------------


def _translate(exc: Exception) -> ApiError:
    """Map what the agent and kernels raise to an HTTP refusal (first matching type wins)."""
    if isinstance(exc, GraphError) and exc.code == "too_large":
        return ApiError(413, "too_large", str(exc))
    for kind, status, code, retry_after in _REFUSALS:
        if isinstance(exc, kind):
            headers = {"Retry-After": retry_after} if retry_after else {}
            return ApiError(status, code, str(exc), **headers)
    raise exc


_REFUSALS: tuple[tuple[type[Exception], int, str, str], ...] = (
    (GraphError, 422, "invalid_graph", ""),
    (UnknownTopology, 404, "unknown_graph", ""),
    (BadJson, 400, "bad_json", ""),
    (NoOutbox, 400, "no_outbox", ""),
    (QueueFull, 503, "busy", str(QueueFull.retry_after_s)),
    (ShuttingDown, 503, "shutting_down", "5"),
    (DeadlineExceeded, 504, "deadline_exceeded", ""),
    (BackendError, 503, "backend_unavailable", "5"),
    # 507: the result was computed but could not be stored; everything stored before stays.
    (StorageFull, 507, "storage_full", "60"),
    (OutboxFull, 507, "outbox_full", "60"),
    (OutboxError, 503, "store_unavailable", "5"),
)
# A write that finds no room (a registered topology's file): the same answer as the outbox's.
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
_REFUSED = tuple(kind for kind, *_ in _REFUSALS)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.code, exc.message, exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "WWW-Authenticate")}
        code = _HTTP_CODES.get(exc.status, "http_error")
        return error_response(exc.status, code, _sentence(exc), headers)
    except _REFUSED as exc:
        api = _translate(exc)
    except ConnectionError:
        raise  # the client went away mid-request: nobody to answer, aiohttp closes it
    except OSError as exc:
        if exc.errno not in _NO_SPACE:
            return _internal(request, exc)
        api = ApiError(507, "storage_full", "the disk is full: nothing was stored", **_LATER)
    except Exception as exc:  # noqa: BLE001 - a bug still answers JSON, and is logged
        return _internal(request, exc)
    if request.path.endswith("/diffuse"):
        request.app[HOST].metrics.diffusion_errors.labels(api.code).inc()
    return error_response(api.status, api.code, api.message, api.headers)


_LATER = {"Retry-After": "60"}


def _internal(request: web.Request, exc: Exception) -> web.Response:
    log.error("request failed", extra={"path": request.path, "error": repr(exc)}, exc_info=exc)
    return error_response(500, "internal", "the agent failed on this request (see its log)")


def _sentence(exc: web.HTTPException) -> str:
    if exc.status == 404:
        return "no such path"
    if exc.status == 405:
        return f"method not allowed here (allowed: {exc.headers.get('Allow', '')})"
    if exc.status == 413:
        return "request body is larger than http.max_body_bytes"
    return exc.reason


@web.middleware
async def host_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """DNS rebinding: answer only requests addressed to this box by a name it trusts."""
    http = request.app[HOST].config.http
    if not hosts.addressed_here(request.headers.get("Host"), http.bind, http.allowed_hosts):
        raise ApiError(
            421,
            "bad_host",
            "the Host header must name a loopback address, http.bind or one of http.allowed_hosts",
        )
    return await handler(request)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    http = request.app[HOST].config.http
    token = http.token
    if request.path == "/healthz" or not _token_required(http):
        return await handler(request)
    given = request.headers.get("Authorization", "")
    expected = f"Bearer {token}"
    if not token or not hmac.compare_digest(given.encode(), expected.encode()):
        raise ApiError(
            401,
            "unauthorized",
            "a valid bearer token is required",
            **{"WWW-Authenticate": "Bearer"},
        )
    return await handler(request)


def _token_required(http: HttpSettings) -> bool:
    """Beyond loopback always; on loopback only when a token is configured anyway."""
    return bool(http.token) or not _is_loopback(http.bind)


# -- request helpers ----------------------------------------------------------------------


def _flag(request: web.Request, name: str) -> bool:
    value = request.query.get(name)
    if value is None:
        return False
    flag = _FLAGS.get(value.lower())
    if flag is None:
        raise ApiError(400, "bad_query", f"query parameter {name} must be 1 or 0")
    return flag


def _deadline_s(request: web.Request) -> float | None:
    """?deadline_s=: a request's own deadline, at most kernels.deadline_s."""
    value = request.query.get("deadline_s")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not seconds > 0 or math.isinf(seconds):
        raise ApiError(400, "bad_query", "query parameter deadline_s must be seconds > 0")
    return seconds


def _graph_id(request: web.Request) -> str:
    graph_id = request.match_info["graph_id"]
    if not GRAPH_ID.fullmatch(graph_id):
        raise ApiError(422, "invalid_graph", "graph id must match [A-Za-z0-9._:-]{1,128}")
    return graph_id


def _jobs(request: web.Request) -> EngineJobs:
    jobs = request.app[AGENT].jobs
    assert jobs is not None  # set before the app listens
    return jobs


async def _json_body(request: web.Request) -> bytes:
    if request.content_type not in JSON_TYPES:
        raise ApiError(415, "unsupported_media_type", "the body must be application/json")
    body = await request.read()  # raises 413 past client_max_size
    if not body:
        raise ApiError(400, "empty_body", "the body is empty: send a JSON document")
    return body


# -- handlers -----------------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    ok, checks = await request.app[AGENT].health()
    body = {"status": "ok" if ok else "failing", "checks": checks, "version": __version__}
    return json_response(body, 200 if ok else 503)


async def status(request: web.Request) -> web.Response:
    return json_response(await state.status(request.app[AGENT].view()))


async def metrics(request: web.Request) -> web.Response:
    agent = request.app[AGENT]
    text = await state.metrics_text(agent.view(), agent.metrics)
    return web.Response(body=text, headers={"Content-Type": METRICS_CONTENT_TYPE})


async def tpu(request: web.Request) -> web.Response:
    view = request.app[AGENT].view()
    tpu = state.tpu_json(view.tpu, view.config.tpu.temperature_limit_c)
    return json_response({**tpu, "backends": view.engine.backends_status()})


async def outbox(request: web.Request) -> web.Response:
    return json_response(outbox_json(await request.app[AGENT].outbox_stats()))


async def diffuse(request: web.Request) -> web.Response:
    queue = _flag(request, "queue")
    body = await _json_body(request)
    deadline_s = _deadline_s(request)
    result, seq = await request.app[AGENT].diffuse("http", body, queue=queue, deadline_s=deadline_s)
    return await answer_response(result, seq)


async def list_graphs(request: web.Request) -> web.Response:
    return json_response({"graphs": request.app[AGENT].engine.topologies()})


async def put_graph(request: web.Request) -> web.Response:
    graph_id = _graph_id(request)
    body = await _json_body(request)
    return json_response(await _jobs(request).register(graph_id, body))


async def patch_graph(request: web.Request) -> web.Response:
    graph_id = _graph_id(request)
    body = await _json_body(request)
    return json_response(await _jobs(request).update(graph_id, body))


async def delete_graph(request: web.Request) -> web.Response:
    graph_id = _graph_id(request)
    return json_response(await _jobs(request).unregister(graph_id))


async def diffuse_graph(request: web.Request) -> web.Response:
    graph_id = _graph_id(request)
    queue = _flag(request, "queue")
    body = await _json_body(request)
    agent = request.app[AGENT]
    deadline_s = _deadline_s(request)
    result, seq = await agent.diffuse_registered(
        "http", graph_id, body, queue=queue, deadline_s=deadline_s
    )
    return await answer_response(result, seq)


async def openapi(request: web.Request) -> web.Response:
    required = _token_required(request.app[AGENT].config.http)
    return json_response(openapi_document(__version__, GRAPH_ID.pattern, token_required=required))


async def index(request: web.Request) -> web.Response:
    page = importlib.resources.files("dgdm.agent").joinpath("static/index.html").read_bytes()
    return web.Response(body=page, content_type="text/html", charset="utf-8")


# GET routes also answer HEAD (aiohttp's default for web.get), as add_get did.
ROUTES = (
    web.get("/", index),
    web.get("/healthz", healthz),
    web.get("/status", status),
    web.get("/metrics", metrics),
    web.get("/tpu", tpu),
    web.get("/outbox", outbox),
    web.get("/openapi.json", openapi),
    web.post("/diffuse", diffuse),
    web.get("/graphs", list_graphs),
    web.put("/graphs/{graph_id}", put_graph),
    web.patch("/graphs/{graph_id}", patch_graph),
    web.delete("/graphs/{graph_id}", delete_graph),
    web.post("/graphs/{graph_id}/diffuse", diffuse_graph),
)


def _guard(host: HttpHost) -> HttpGuard:
    """Connections marked busy while a request runs, bodies held to
    http.max_inflight_body_bytes and http.body_min_bytes_per_s."""
    return HttpGuard(
        host.connections,
        host.body_budget,
        host.config.http.max_body_bytes,
        host.config.http.body_min_bytes_per_s,
        host.tally.refused,
        lambda: error_response(
            503,
            "busy",
            "too many request bodies in flight (http.max_inflight_body_bytes): retry",
            {"Retry-After": "1"},
        ),
    )


def guarded_app(host: HttpHost) -> web.Application:
    """An app with the checks every request passes: the limits, the Host header, the token
    (the agent's app, and a serving process's, agent/serving.py)."""
    limits = _guard(host).middleware()
    app = web.Application(
        client_max_size=host.config.http.max_body_bytes,
        middlewares=[errors_middleware, limits, host_middleware, auth_middleware],
    )
    app[HOST] = host
    return app


def make_app(agent: Agent) -> web.Application:
    app = guarded_app(agent)
    app[AGENT] = agent
    app.add_routes(ROUTES)
    add_oip_routes(app, agent)
    return app
