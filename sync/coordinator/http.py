"""The coordinator's HTTP API (aiohttp), protected by a bearer token.

GET  /devices?tag=K=V&state=S          fleet list (tags AND-ed; state online|offline)
GET  /devices/{id}                     one device, its latest telemetry and recent alerts
GET  /devices/{id}/results?since=C     results after cursor C (`next` is the new cursor)
POST /devices/{id}/commands            {"cmd", "args", "ttl_ms"} -> 202 {"seq"}
GET  /devices/{id}/commands?limit=N    its latest commands, newest first, with replies
GET  /devices/{id}/commands/{seq}      the command and, once it arrived, its reply
GET  /devices/{id}/telemetry?since_ms=T&limit=N   telemetry history, oldest first
GET  /devices/{id}/quarantine?limit=N  its refused messages (why, and their start)
POST /jobs                             one command to many devices -> 201 the job
GET  /jobs?limit=N                     jobs, newest first, with counts
GET  /jobs/{id}?cursor=D&limit=N       a job, its counts and a page of its devices
POST /jobs/{id}/cancel                 cancel what it has not sent yet -> the job
GET  /healthz                          200 when the store and the broker answer, else 503 (no token)
GET  /ingest                           fair-share state: queue, flooding devices, top talkers
GET  /metrics                          Prometheus text format

Errors are JSON `{"error", "field"}` with 400/401/403/404/422/503, never a traceback.
POST /devices/{id}/commands and the POSTs of /jobs need a configured `http.token` (403
naming `http.token` otherwise): they act on boxes.

Shapes (every number an integer unless said; `*_ms` are Unix milliseconds):

- device (each of `GET /devices` `{"devices": [device, ...]}`, ordered by id):
  `{"device_id", "public_key", "enrolled", "online", "first_seen_ms", "last_seen_ms",
  "agent_version", "backend", "flooding", "tags": {key: value}, "summary", "last_alert"}`;
  `summary` is null before any telemetry, else from the last sample of the latest
  telemetry message: `{"ts_ms", "backend", "tpu": {"present", "temp_c"}, "outbox":
  {"messages", "bytes", "dropped"}, "cpu_percent", "latency_p99_ms"}` (a field the device
  sent wrong is null); `last_alert` is null or `{"code", "severity", "message", "seq",
  "created_ms", "received_ms"}`. `GET /devices/{id}` adds `"telemetry"` (the latest
  message or null) and `"alerts"` (the latest 20, newest first).
- message (results, telemetry): `{"cursor", "kind", "seq", "created_ms", "received_ms",
  "body"}`. `GET .../telemetry` answers `{"telemetry": [message, ...]}`: without
  `since_ms` the latest `limit` (default 100, at most 1000), with it the first `limit`
  received at or after it; oldest first either way.
- command: `{"seq", "command": {"cmd", "args", "ttl_ms"}, "created_ms", "status":
  "pending" | "replied", "reply": {"cmd_seq", "ok", "error", "data"} | null,
  "replied_ms"}`; `GET .../commands` answers `{"commands": [command, ...]}` (limit
  default 20).
- job request: `{"target": "all" | {"tags": {key: value}} | {"ids": [device_id, ...]},
  "command": {"cmd", "args"}, "rate_per_s": 10.0, "max_failure_ratio": 0.1,
  "timeout_s": 60.0, "ttl_ms": 3600000}` (the numbers optional, those are the defaults;
  rate_per_s in (0, 1000], max_failure_ratio in [0, 1], timeout_s in (0, 86400], ttl_ms
  1..7 days). A bad field is a 422 naming it (`target`, `target.tags`, `target.ids`,
  `command.cmd`, `command.args`, `rate_per_s`, ...); a target matching no enrolled
  device is a 422 naming `target`.
- job: `{"id", "created_ms", "target", "command", "rate_per_s", "max_failure_ratio",
  "timeout_s", "ttl_ms", "state": "running" | "completed" | "aborted" | "cancelled",
  "finished_ms", "reason", "total", "counts": {"queued", "sent", "succeeded", "failed",
  "timed_out", "cancelled"}}`; `GET /jobs` answers `{"jobs": [job, ...]}`;
  `GET /jobs/{id}` adds `"devices": [{"device_id", "state", "seq", "sent_ms",
  "decided_ms", "error"}, ...]` (by device id, `limit` default 100) and `"next"`: the
  `cursor` of the next page, or null on the last.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
from typing import TYPE_CHECKING, Any

from aiohttp import web

from dgdm.common.fields import unknown_field
from dgdm.sync.coordinator import page
from dgdm.sync.coordinator.stores import StoreUnavailable
from dgdm.sync.envelope import Kind, valid_device_id
from dgdm.sync.errors import ConfigError, TransportError
from dgdm.sync.http_guard import HttpGuard
from dgdm.sync.http_limits import BodyBudget, ConnectionTable, connection_cap, default_body_budget
from dgdm.sync.listener import Listener, memory_bytes, quiet_accept_errors, raise_fd_limit
from dgdm.sync.settings import is_loopback

if TYPE_CHECKING:
    from dgdm.sync.coordinator.service import Coordinator

log = logging.getLogger(__name__)
COORDINATOR: web.AppKey[Coordinator] = web.AppKey("coordinator")
GUARD: web.AppKey[HttpGuard] = web.AppKey("guard")
MAX_RESULTS = 1000
RECENT_ALERTS = 20
MAX_BODY_BYTES = 64 * 1024 * 1024
INT63_MAX = 2**63 - 1  # store integers are signed 64-bit; a larger seq cannot exist


def _error(status: int, message: str, field: str | None = None) -> web.Response:
    return web.json_response({"error": message, "field": field}, status=status)


class ApiError(Exception):
    """A refusal raised anywhere below a handler; `_errors_middleware` answers it as
    `{"error": message, "field": field}` with its status."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field


@web.middleware
async def _errors_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Refusals, and what a handler cannot answer itself: the store gone (a PostgreSQL
    restart) is a 503 naming it, a client gone mid-body nobody's error (no traceback)."""
    try:
        return await handler(request)
    except ApiError as exc:
        return _error(exc.status, exc.message, exc.field)
    except StoreUnavailable as exc:
        return _error(503, f"store unavailable: {exc}", "store")
    except ConnectionResetError:
        return _error(400, "the client closed the connection", "body")


def _token_middleware(token: str | None) -> Any:
    expected = f"Bearer {token}".encode() if token else None

    @web.middleware
    async def check(request: web.Request, handler: Any) -> web.StreamResponse:
        if expected is not None and request.path != "/healthz":
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected) and not page.public(request, token):
                if page.wants_page(request):
                    return page.login_page()
                return _error(401, "missing or wrong bearer token", "Authorization")
        return await handler(request)

    return check


def make_app(coordinator: Any) -> web.Application:
    http = coordinator.config.http
    if not http.token and not is_loopback(http.bind):
        raise ConfigError("http.token", "is required when the API listens beyond loopback")
    guard = _guard(coordinator)
    app = web.Application(
        middlewares=[guard.middleware(), _token_middleware(http.token), _errors_middleware],
        client_max_size=MAX_BODY_BYTES,
    )
    app[COORDINATOR] = coordinator
    app[GUARD] = guard
    page.add_routes(app, http.token)
    app.router.add_get("/devices", list_devices)
    app.router.add_get("/devices/{device_id}", get_device)
    app.router.add_get("/devices/{device_id}/results", get_results)
    app.router.add_post("/devices/{device_id}/commands", _token_required(post_command))
    app.router.add_get("/devices/{device_id}/commands", list_commands)
    app.router.add_get("/devices/{device_id}/commands/{seq}", get_command)
    app.router.add_get("/devices/{device_id}/telemetry", get_telemetry)
    app.router.add_get("/devices/{device_id}/quarantine", get_quarantine)
    app.router.add_post("/jobs", _token_required(post_job))
    app.router.add_get("/jobs", list_jobs)
    app.router.add_get("/jobs/{job_id}", get_job)
    app.router.add_post("/jobs/{job_id}/cancel", _token_required(cancel_job))
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/ingest", get_ingest)
    app.router.add_get("/healthz", get_healthz)
    return app


def _guard(coordinator: Any) -> HttpGuard:
    """The agent's HTTP bounds (sync/http_limits.py) with the [http] settings: connection
    caps, in-flight body bytes, minimum body rate."""
    http = coordinator.config.http
    refused = coordinator.metrics.http_refused
    budget = http.max_inflight_body_bytes or default_body_budget(memory_bytes(), MAX_BODY_BYTES)
    return HttpGuard(
        ConnectionTable(http.max_connections, http.max_connections_per_peer),
        BodyBudget(budget),
        MAX_BODY_BYTES,
        http.body_min_bytes_per_s,
        lambda reason: refused.labels(reason).inc(),
        lambda: web.json_response(
            {
                "error": "too many request bodies in flight: retry",
                "field": "http.max_inflight_body_bytes",
            },
            status=503,
            headers={"Retry-After": "1"},
        ),
    )


async def start_http(coordinator: Any) -> tuple[web.AppRunner, Listener, int]:
    """Listen (on the running loop); the runner and listener to stop, and the port."""
    http = coordinator.config.http
    quiet_accept_errors(asyncio.get_running_loop(), log)
    app = make_app(coordinator)
    connections = app[GUARD].connections
    connections.max_total = connection_cap(http.max_connections, raise_fd_limit(log))
    # keepalive_timeout also runs from a connection's opening and is not reset by data:
    # it is the header deadline, for a new connection as for an idle keep-alive one.
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=http.header_timeout_s)
    await runner.setup()
    assert runner.server is not None  # set up
    refused = coordinator.metrics.http_refused
    listener = Listener(runner.server, connections, lambda reason: refused.labels(reason).inc())
    try:
        port = await listener.start(http.bind, http.port)
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(
            "http.port", f"cannot listen on {http.bind}:{http.port}: {exc.strerror}"
        ) from exc
    return runner, listener, port


def _device_view(coordinator: Any, row: dict[str, Any]) -> dict[str, Any]:
    return {
        "device_id": row["device_id"],
        "public_key": row["public_key"],
        "enrolled": row["public_key"] != "",  # '' after `dgdm coordinator devices remove`
        "online": bool(row["online"]),
        "first_seen_ms": row["first_seen_ms"],
        "last_seen_ms": row["last_seen_ms"],
        "agent_version": row["agent_version"],
        "backend": row["backend"],
        # device_flooding raised by this replica within ingest.flooding_alert_s
        "flooding": coordinator.is_flooding(row["device_id"]),
        "tags": row["tags"],
        "summary": row["summary"],
        "last_alert": row["last_alert"],
    }


async def _device_or_404(request: web.Request) -> tuple[Any, str, dict[str, Any]]:
    coordinator = request.app[COORDINATOR]
    device_id = request.match_info["device_id"]
    if not valid_device_id(device_id):
        raise ApiError(404, "no such device", "device_id")
    rows = await coordinator.device_views(None, None, device_id)
    if not rows:
        raise ApiError(404, f"device {device_id!r} is not enrolled", "device_id")
    return coordinator, device_id, rows[0]


def _device_filters(request: web.Request) -> tuple[dict[str, str], bool | None]:
    """`?tag=k=v` (repeatable, AND-ed) and `?state=online|offline`."""
    from dgdm.sync.coordinator.tags import TagError, check_count, parse_tag

    try:
        tags = check_count(dict(parse_tag(t) for t in request.query.getall("tag", [])))
    except TagError as exc:
        raise _bad_query("tag", str(exc)) from None
    state = request.query.get("state")
    if state not in {None, "online", "offline"}:
        raise _bad_query("state", "must be online or offline")
    return tags, None if state is None else state == "online"


async def list_devices(request: web.Request) -> web.Response:
    coordinator = request.app[COORDINATOR]
    tags, online = _device_filters(request)
    rows = await coordinator.device_views(tags, online, None)
    return web.json_response({"devices": [_device_view(coordinator, r) for r in rows]})


async def get_device(request: web.Request) -> web.Response:
    coordinator, device_id, row = await _device_or_404(request)
    telemetry = await coordinator.latest(device_id, Kind.TELEMETRY, 1)
    alerts = await coordinator.latest(device_id, Kind.ALERT, RECENT_ALERTS)
    return web.json_response(
        {
            **_device_view(coordinator, row),
            "telemetry": telemetry[0] if telemetry else None,
            "alerts": alerts,
        }
    )


def _bad_query(field: str, message: str) -> ApiError:
    return ApiError(400, message, field)


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _bad_query(name, "must be an integer") from None
    if not low <= value <= high:
        raise _bad_query(name, f"must be from {low} to {high}")
    return value


async def get_results(request: web.Request) -> web.Response:
    coordinator, device_id, _ = await _device_or_404(request)
    since = _int_param(request, "since", 0, 0, 2**63 - 1)
    limit = _int_param(request, "limit", 100, 1, MAX_RESULTS)
    rows = await coordinator.results_since(device_id, since, limit)
    cursor = rows[-1]["cursor"] if rows else since
    return web.json_response({"results": rows, "next": cursor})


class _NotJson(ValueError):
    pass


def _refuse_constant(name: str) -> Any:
    raise _NotJson(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotJson(f"{text} is beyond a double")
    return value


def _strict_loads(text: str) -> Any:
    """RFC 8259 JSON only: NaN, Infinity and numbers that overflow to them are refused, so
    nothing stored or sent on can make a later answer invalid JSON."""
    return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)


async def _json_body(request: web.Request) -> Any:
    try:
        return await request.json(loads=_strict_loads)
    except _NotJson as exc:
        raise ApiError(400, f"body is not valid JSON: {exc}", "body") from None
    except ValueError:
        raise ApiError(400, "body is not valid JSON", "body") from None


async def _command_body(request: web.Request) -> dict[str, Any]:
    body = await _json_body(request)
    if not isinstance(body, dict):
        raise ApiError(422, "body must be a JSON object", "body")
    unknown = unknown_field(body, ("cmd", "args", "ttl_ms"))
    if unknown is not None:
        raise ApiError(422, "unknown field", unknown)
    return body


def _token_required(handler: Any) -> Any:
    """Reads may be open on loopback; a command acts on a box, so it always needs a
    configured token (any local process could otherwise drive the fleet)."""

    async def checked(request: web.Request) -> web.StreamResponse:
        if not request.app[COORDINATOR].config.http.token:
            raise ApiError(403, "commands and jobs need an API token: set http.token", "http.token")
        return await handler(request)

    return checked


async def post_command(request: web.Request) -> web.Response:
    from dgdm.sync.coordinator.commands import DEFAULT_TTL_MS, BadCommand
    from dgdm.sync.coordinator.service import UnknownDevice

    coordinator, device_id, _ = await _device_or_404(request)
    body = await _command_body(request)
    try:
        seq = await coordinator.send_command(
            device_id, body.get("cmd"), body.get("args"), body.get("ttl_ms", DEFAULT_TTL_MS)
        )
    except BadCommand as exc:
        raise ApiError(422, str(exc), exc.field) from None
    except UnknownDevice:  # enrolled once (the row stays) but removed since
        raise ApiError(404, f"device {device_id!r} is not enrolled", "device_id") from None
    except TransportError as exc:
        raise ApiError(503, f"broker unavailable: {exc}") from None
    return web.json_response({"seq": seq, "device_id": device_id}, status=202)


async def get_command(request: web.Request) -> web.Response:
    coordinator, device_id, _ = await _device_or_404(request)
    try:
        seq = int(request.match_info["seq"])
    except ValueError:
        raise ApiError(404, "command seq must be an integer", "seq") from None
    if not 1 <= seq <= INT63_MAX:
        raise ApiError(404, f"command seq must be from 1 to {INT63_MAX}", "seq")
    command = await coordinator.command(device_id, seq)
    if command is None:
        raise ApiError(404, f"no command {seq} for {device_id!r}", "seq")
    return web.json_response(command)


async def list_commands(request: web.Request) -> web.Response:
    coordinator, device_id, _ = await _device_or_404(request)
    limit = _int_param(request, "limit", 20, 1, MAX_RESULTS)
    return web.json_response({"commands": await coordinator.commands(device_id, limit)})


async def get_telemetry(request: web.Request) -> web.Response:
    coordinator, device_id, _ = await _device_or_404(request)
    since = _int_param(request, "since_ms", -1, 0, INT63_MAX)
    limit = _int_param(request, "limit", 100, 1, MAX_RESULTS)
    rows = await coordinator.telemetry(device_id, None if since < 0 else since, limit)
    return web.json_response({"telemetry": rows})


async def get_quarantine(request: web.Request) -> web.Response:
    coordinator, device_id, _ = await _device_or_404(request)
    limit = _int_param(request, "limit", 100, 1, MAX_RESULTS)
    return web.json_response({"quarantine": await coordinator.quarantined(device_id, limit)})


# -- jobs -------------------------------------------------------------------------------------


async def post_job(request: web.Request) -> web.Response:
    from dgdm.sync.coordinator.jobs import BadJob, parse_job

    coordinator = request.app[COORDINATOR]
    body = await _json_body(request)
    try:
        job = await coordinator.create_job(parse_job(body))
    except BadJob as exc:
        raise ApiError(422, str(exc), exc.field) from None
    return web.json_response(job, status=201)


async def list_jobs(request: web.Request) -> web.Response:
    coordinator = request.app[COORDINATOR]
    limit = _int_param(request, "limit", 50, 1, MAX_RESULTS)
    return web.json_response({"jobs": await coordinator.list_jobs(limit)})


def _job_id(request: web.Request) -> int:
    text = request.match_info["job_id"]
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= INT63_MAX:
        raise ApiError(404, "a job id is a positive integer", "job_id")
    return int(text)


async def get_job(request: web.Request) -> web.Response:
    """The job with its counts, and a page of its devices: `?cursor=` (the last device id
    of the previous page), `limit`; `next` is the cursor of the next page, or null."""
    coordinator = request.app[COORDINATOR]
    job_id = _job_id(request)
    job = await coordinator.job(job_id)
    if job is None:
        raise ApiError(404, f"no job {job_id}", "job_id")
    cursor = request.query.get("cursor", "")
    if cursor and not valid_device_id(cursor):
        raise _bad_query("cursor", "must be a device id (the previous page's `next`)")
    limit = _int_param(request, "limit", 100, 1, MAX_RESULTS)
    devices = await coordinator.job_targets(job_id, cursor, limit + 1)
    more = len(devices) > limit  # one beyond the page says whether another page exists
    devices = devices[:limit]
    return web.json_response(
        {**job, "devices": devices, "next": devices[-1]["device_id"] if more else None}
    )


async def cancel_job(request: web.Request) -> web.Response:
    coordinator = request.app[COORDINATOR]
    job_id = _job_id(request)
    job = await coordinator.cancel_job(job_id)
    if job is None:
        raise ApiError(404, f"no job {job_id}", "job_id")
    return web.json_response(job)


async def get_healthz(request: web.Request) -> web.Response:
    """200 when the store and the broker answer, else 503 naming the failing check (open,
    like the agent's: it says nothing a load balancer should not know)."""
    health = await request.app[COORDINATOR].health()
    return web.json_response(health, status=200 if health["status"] == "ok" else 503)


async def get_ingest(request: web.Request) -> web.Response:
    """Fair-share state of this replica: queue depth, paused reading, flooding devices and
    the top talkers (the devices refused most, bounded; no per-device metric series)."""
    coordinator = request.app[COORDINATOR]
    return web.json_response(await coordinator.on_main_loop(coordinator.ingest_view))


async def get_metrics(request: web.Request) -> web.Response:
    body = request.app[COORDINATOR].metrics.render()
    return web.Response(body=body, content_type="text/plain", charset="utf-8")
