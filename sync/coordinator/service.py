"""The coordinator service: route what arrives over MQTT, track presence, send commands.

Uplink envelopes go to the ingest pipeline (ingest.py: quota, fair queue, one writer
thread that decrypts and stores, receipts after the commit). The HTTP API runs on a loop
of its own and reads on its own connections (api_thread.py), so it never waits for ingest.

MQTT 5: the coordinator subscribes with a shared subscription so that several instances
split the fleet; `status` is subscribed plainly because brokers send no retained messages
to shared subscriptions. MQTT 3.1.1: plain topics and a single coordinator.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import inspect
import logging
import sqlite3
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from dgdm.sync import presence
from dgdm.sync.coordinator.commands import (
    DEFAULT_TTL_MS,
    MAX_TTL_MS,
    BadCommand,
    check_command_request,
)
from dgdm.sync.coordinator.config import CoordinatorConfig
from dgdm.sync.coordinator.housekeeping import Housekeeping
from dgdm.sync.coordinator.ingest import Ingest
from dgdm.sync.coordinator.jobs import JobSpec
from dgdm.sync.coordinator.jobs_runner import JobRunner
from dgdm.sync.coordinator.metrics import Metrics
from dgdm.sync.coordinator.registry import Registry
from dgdm.sync.coordinator.store import (
    SqliteStore,
    Store,
)
from dgdm.sync.coordinator.stores import StoreUnavailable, open_store
from dgdm.sync.crypto import load_private_key
from dgdm.sync.envelope import (
    TOPIC_SUFFIX,
    Kind,
    decode_body,
    seal,
    valid_device_id,
)
from dgdm.sync.errors import EnvelopeError, SyncError, TransportError
from dgdm.sync.mqtt import MqttClient, Will, options_from_settings
from dgdm.sync.topics import (
    STATUS,
    UPLINK_KINDS,
    fleet_filter,
    kind_for_suffix,
    kind_topic,
    parse_topic,
)
from dgdm.sync.wallclock import now_ms

if TYPE_CHECKING:
    from dgdm.sync.coordinator.api_thread import ApiThread

log = logging.getLogger(__name__)
_T = TypeVar("_T")
COORDINATOR_BACKOFF_MAX_S = 5.0
# Unreplied commands are published again every RESEND_INTERVAL_S once RESEND_AFTER_MS old,
# the newest RESEND_BATCH a round; one replica publishes each (the store's claim), and a
# command published again waits RESEND_AFTER_MS before any replica's next claim of it.
RESEND_INTERVAL_S = 10.0
RESEND_AFTER_MS = 10_000
RESEND_BATCH = 500

MAX_STATUS_BYTES = 4096
MAX_ROUTES = 65536
HEALTH_TIMEOUT_S = 5.0


class UnknownDevice(SyncError):
    """The device is not enrolled."""


class Coordinator:
    """Start with `await start()`, stop with `await stop()`; usable in-process (demo, tests)."""

    def __init__(self, config: CoordinatorConfig, *, store: Store | None = None) -> None:
        self.config = config
        self.metrics = Metrics()
        self._store = store
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="coord-db")
        # API reads run beside ingest, on their own threads and connection (SQLite WAL
        # readers, a pool on PostgreSQL), so a long ingest transaction never delays them.
        self._read_executor = concurrent.futures.ThreadPoolExecutor(
            2, thread_name_prefix="coord-read"
        )
        self._reader: Store | None = None
        # The job runner's and the resend round's store calls: on the writer thread for
        # SQLite (one connection, one writer), on a thread of their own otherwise, so a
        # store outage that makes a tick wait for the pool never holds up ingest's recovery.
        self._jobs_executor = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="coord-jobs"
        )
        self._ingest: Ingest | None = None
        self._online: set[str] = set()
        self._routes: dict[str, tuple[str, str] | None] = {}  # topic -> parse_topic(topic)
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Future[Any]] = set()
        self._api: ApiThread | None = None
        self._housekeeping: Housekeeping | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.http_port: int | None = None
        self.mqtt: MqttClient | None = None
        self.registry: Registry | None = None
        self.jobs = JobRunner(self)

    @property
    def store(self) -> Store:
        assert self._store is not None, "start() the coordinator first"
        return self._store

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self, *, http: bool = True) -> None:
        cfg = self.config.coordinator
        self._loop = asyncio.get_running_loop()
        private = load_private_key(cfg.private_key)
        if self._store is None:
            self._store = await self._db(open_store, self.config)
        self._reader = await self._db(_reader_for, self.store)
        self.registry = Registry(private, self.store.public_keys)
        await self._db(self.registry.reload)
        self._online = {d["device_id"] for d in await self._db(self.store.devices) if d["online"]}
        self.metrics.devices_online.set(len(self._online))
        self.presence = presence.Announcer(cfg.id)
        self.mqtt = MqttClient(
            self._mqtt_options(self.presence),
            on_message=self._on_message,
            on_connect=self.presence.online,
            subscriptions=self._subscriptions(),
        )
        self.presence.client = self.mqtt
        mqtt, registry = self.mqtt, self.registry
        ingest = self._ingest = Ingest(
            self.config,
            self.metrics,
            store=self.store,
            registry=registry,
            mqtt=mqtt,
            on_writer=self._db,
            read_quotas=lambda: self._read(lambda s: s.quotas()),
        )
        self.metrics.follow(
            store_up=lambda: ingest.store_error is None,
            broker_connected=lambda: mqtt.connected,
            devices_enrolled=registry.count,
        )
        await self.mqtt.start()
        await ingest.load_quotas()
        self._tasks = [
            asyncio.create_task(ingest.flush_forever(), name="coord-flush"),
            asyncio.create_task(ingest.refresh_quotas_forever(), name="coord-quotas"),
            asyncio.create_task(self.jobs.run_forever(), name="coord-jobs"),
            asyncio.create_task(self._resend_forever(), name="coord-resend"),
        ]
        # Retention, downsampling and quotas run on the writer thread, one small
        # transaction at a time between ingest transactions (housekeeping.py).
        self._housekeeping = Housekeeping(
            self.config.store,
            self.metrics.registry,
            lambda name, *a: self._db(getattr(self.store, name), *a),
        )
        self._housekeeping.start()
        if http:
            from dgdm.sync.coordinator.api_thread import ApiThread

            self._api = ApiThread(self)
            self.http_port = await self._api.start()

    async def stop(self) -> None:
        if self._housekeeping is not None:
            await self._housekeeping.stop()
            self._housekeeping = None
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._ingest is not None:
            await self._ingest.drain()
        if self._api is not None:
            await self._api.stop()
            self._api = None
        if self.mqtt is not None:
            await self.presence.offline()  # after the last flush: nothing received is lost
            await self.mqtt.stop()
        if self._reader is not None and self._reader is not self._store:
            await self._db(self._reader.close)
        if self._store is not None:
            await self._db(self._store.close)
        self._executor.shutdown(wait=True)
        self._read_executor.shutdown(wait=True)
        self._jobs_executor.shutdown(wait=True)

    async def wait_connected(self, timeout: float | None = None) -> None:
        assert self.mqtt is not None
        await self.mqtt.wait_connected(timeout)

    def _mqtt_options(self, announcer: presence.Announcer | None = None) -> Any:
        """The broker connection; with `announcer`, its will says the presence was lost."""
        m = self.config.mqtt
        client_id = m.client_id or f"dgdm-coordinator-{self.config.coordinator.id}"
        # One client a fleet waits for, not thousands that could stampede a broker coming
        # back: reconnect within seconds (the devices keep their 60 s cap).
        extra: dict[str, Any] = {"backoff_max_s": COORDINATOR_BACKOFF_MAX_S}
        if announcer is not None:
            extra["will"] = Will(announcer.topic, announcer.will_payload())
        return options_from_settings(m, client_id, **extra)

    def _subscriptions(self) -> tuple[tuple[str, int], ...]:
        shared = self.config.mqtt.mqtt_version == "5"
        group = self.config.mqtt.share_group
        subs = [
            (fleet_filter(TOPIC_SUFFIX[k], shared=shared, group=group), 1) for k in UPLINK_KINDS
        ]
        return (*subs, (fleet_filter(STATUS, shared=False), 1))

    async def on_main_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Call `fn(*args)` (awaiting it if it is a coroutine function) on the ingest loop,
        from any loop: the HTTP API runs on its own (api_thread.py)."""

        async def call() -> Any:
            result = fn(*args)
            return await result if inspect.isawaitable(result) else result

        assert self._loop is not None
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if here is self._loop:
            return await call()
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(call(), self._loop))

    async def _db(self, fn: Any, *args: Any) -> Any:
        """Every store call runs on the one database thread, never on the loop."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def run_on_writer(self, fn: Any, *args: Any) -> Any:
        """A store write from another module (the API's job calls, tests), on the one
        database thread, from any loop."""
        return await self._db(fn, *args)

    async def run_for_jobs(self, fn: Any, *args: Any) -> Any:
        """The job runner's store call, and the resend round's (see `_jobs_executor`)."""
        pool = self._executor if isinstance(self.store, SqliteStore) else self._jobs_executor
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    # -- fleet -----------------------------------------------------------------------------

    async def add_device(
        self, device_id: str, public_key: str, *, plaintext_telemetry: bool = False
    ) -> None:
        if not valid_device_id(device_id):
            raise BadCommand("device_id", "must match [A-Za-z0-9._-]{1,64}")
        add = functools.partial(self.store.add_device, plaintext_telemetry=plaintext_telemetry)
        await self._db(add, device_id, public_key)
        assert self.registry is not None
        await self._db(self.registry.reload)

    @property
    def ingest(self) -> Ingest:
        assert self._ingest is not None, "start() the coordinator first"
        return self._ingest

    def is_flooding(self, device_id: str) -> bool:
        """This replica raised device_flooding for it within ingest.flooding_alert_s."""
        return self.ingest.is_flooding(device_id)

    def ingest_view(self) -> dict[str, Any]:
        return self.ingest.view()

    # -- routing ---------------------------------------------------------------------------

    def _on_message(self, topic: str, payload: bytes) -> None:
        parsed = self._route(topic)
        if parsed is None:
            self.ingest.reject("bad_topic")
            return
        device_id, suffix = parsed
        if suffix == STATUS:
            self._on_status(device_id, payload)
            return
        kind = kind_for_suffix(suffix)
        if kind not in UPLINK_KINDS:
            self.ingest.reject("bad_topic")
            return
        self.ingest.admit(device_id, kind, payload)

    async def health(self) -> dict[str, Any]:
        """SPEC §7.1 /healthz: the store answers (on a reader, so never behind ingest) and
        the broker connection is up; the failing checks are named."""
        checks: dict[str, Any] = {}
        try:
            await asyncio.wait_for(self._read(lambda s: s.ping()), HEALTH_TIMEOUT_S)
            checks["store"] = "ok"
        except (asyncio.TimeoutError, StoreUnavailable, sqlite3.Error) as exc:
            checks["store"] = f"failing: {exc or 'no answer within the timeout'}"
        connected = self.mqtt is not None and self.mqtt.connected
        checks["broker"] = "ok" if connected else "failing: not connected"
        ok = all(v == "ok" for v in checks.values())
        return {"status": "ok" if ok else "failing", "checks": checks}

    def _route(self, topic: str) -> tuple[str, str] | None:
        """parse_topic, remembered: a fleet has a handful of topics per device."""
        try:
            return self._routes[topic]
        except KeyError:
            if len(self._routes) >= MAX_ROUTES:
                self._routes.clear()
            parsed = self._routes[topic] = parse_topic(topic)
            return parsed

    # -- status ----------------------------------------------------------------------------

    def _on_status(self, device_id: str, payload: bytes) -> None:
        assert self.registry is not None
        if not payload:  # a cleared retained status
            return
        try:
            if len(payload) > MAX_STATUS_BYTES:
                raise EnvelopeError("too_large", "status is too large")
            status = decode_body(payload)
        except EnvelopeError:
            self.ingest.reject("bad_status")
            return
        if not self.registry.enrolled(device_id):
            self.ingest.reject("unknown_device")
            return
        if status.get("state") == "online":
            self._online.add(device_id)
        else:
            self._online.discard(device_id)
        self.metrics.devices_online.set(len(self._online))
        task = asyncio.ensure_future(self._db(self.store.set_status, device_id, status, now_ms()))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- commands ------------------------------------------------------------------------

    async def send_command(
        self, device_id: str, cmd: str, args: Any = None, ttl_ms: int = DEFAULT_TTL_MS
    ) -> int:
        """Store and publish a command; returns its seq (the reply arrives with it later)."""
        if asyncio.get_running_loop() is not self._loop:
            return int(await self.on_main_loop(self.send_command, device_id, cmd, args, ttl_ms))
        assert self.registry is not None
        body = check_command_request(cmd, args, ttl_ms)
        if self.registry.keys_for(device_id) is None:
            raise UnknownDevice(f"device {device_id!r} is not enrolled")
        now = now_ms()
        seq = await self._db(self.store.new_command, device_id, body, now)
        try:
            await self.publish_command(device_id, seq, now, body)
        except TransportError as exc:
            # Stored is what counts: the resend round publishes it once the broker is back.
            details = {"device": device_id, "seq": seq, "error": str(exc)}
            log.warning("command stored, its publish failed: sent again later", extra=details)
        return int(seq)

    async def _resend_forever(self) -> None:
        while True:
            await asyncio.sleep(RESEND_INTERVAL_S)
            try:
                await self.resend_commands(now_ms())
            except (StoreUnavailable, sqlite3.Error, TransportError) as exc:
                log.debug("command resend round skipped: %s", exc)

    async def resend_commands(self, now_ms: int) -> int:
        """Publish again the stored commands still without a reply to online devices, within
        their TTL and older than RESEND_AFTER_MS (a publish lost to a broker restart, a
        replica that died between store and publish). The device runs each seq at most
        once, so a copy of one that did arrive is dropped there. The store hands this
        replica the ones no other replica published again within RESEND_AFTER_MS, marked
        as its own; one it then fails to publish goes in a later round. Returns how many
        went."""
        since, until = now_ms - MAX_TTL_MS, now_ms - RESEND_AFTER_MS
        online = frozenset(self._online)
        claim = functools.partial(
            self.store.claim_resends,
            since,
            until,
            RESEND_BATCH,
            now_ms,
            functools.partial(resend_due, online=online, now_ms=now_ms),
        )
        rows = await self.run_for_jobs(claim)
        sent = 0
        for row in rows:
            await self.publish_command(row["device_id"], row["seq"], row["created_ms"], row["body"])
            sent += 1
        self.metrics.commands_resent.inc(sent)
        return sent

    async def publish_command(
        self, device_id: str, seq: int, created_ms: int, body: dict[str, Any]
    ) -> None:
        """Seal and publish a stored command (its seq from the store): the one path for a
        command to one device and for a job's (jobs_runner.py), from any loop."""
        if asyncio.get_running_loop() is not self._loop:
            await self.on_main_loop(self.publish_command, device_id, seq, created_ms, body)
            return
        assert self.registry is not None
        assert self.mqtt is not None
        keys = self.registry.keys_for(device_id)
        if keys is None:
            raise UnknownDevice(f"device {device_id!r} is not enrolled")
        payload = seal(
            Kind.COMMAND, seq, created_ms, device_id, body, key=keys.down, key_id=keys.key_id
        )
        await self.mqtt.publish(kind_topic(device_id, Kind.COMMAND), payload)
        self.metrics.commands.inc()

    async def create_job(self, spec: JobSpec) -> dict[str, Any]:
        """Store a job (its devices resolved now); replicas' runners send it."""
        job: dict[str, Any] = await self._db(self.store.create_job, spec, now_ms())
        return job

    async def cancel_job(self, job_id: int) -> dict[str, Any] | None:
        job: dict[str, Any] | None = await self._db(self.store.cancel_job, job_id, now_ms())
        return job

    # -- reads for the HTTP API and the page, beside ingest (never behind it) ----------------

    async def _read(self, call: Callable[[Store], _T]) -> _T:
        reader = self._reader or self.store
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._read_executor, call, reader)

    async def devices(self) -> list[dict[str, Any]]:
        return await self._read(lambda s: s.devices())

    async def device_views(
        self, tags: dict[str, str] | None, online: bool | None, device_id: str | None
    ) -> list[dict[str, Any]]:
        return await self._read(lambda s: s.device_views(tags, online, device_id))

    async def latest(self, device_id: str, kind: Kind, limit: int) -> list[dict[str, Any]]:
        return await self._read(lambda s: s.latest(device_id, kind, limit))

    async def results_since(self, device_id: str, cursor: int, limit: int) -> list[dict[str, Any]]:
        return await self._read(lambda s: s.results_since(device_id, cursor, limit))

    async def telemetry(
        self, device_id: str, since_ms: int | None, limit: int
    ) -> list[dict[str, Any]]:
        return await self._read(lambda s: s.telemetry(device_id, since_ms, limit))

    async def quarantined(self, device_id: str, limit: int) -> list[dict[str, Any]]:
        return await self._read(lambda s: s.quarantined(device_id, limit))

    async def command(self, device_id: str, seq: int) -> dict[str, Any] | None:
        return await self._read(lambda s: s.command(device_id, seq))

    async def commands(self, device_id: str, limit: int) -> list[dict[str, Any]]:
        return await self._read(lambda s: s.commands(device_id, limit))

    async def list_jobs(self, limit: int) -> list[dict[str, Any]]:
        """Named apart from `jobs`, this replica's job runner."""
        return await self._read(lambda s: s.jobs(limit))

    async def job(self, job_id: int) -> dict[str, Any] | None:
        return await self._read(lambda s: s.job(job_id))

    async def job_targets(self, job_id: int, after: str, limit: int) -> list[dict[str, Any]]:
        return await self._read(lambda s: s.job_targets(job_id, after, limit))


def resend_due(row: dict[str, Any], *, online: frozenset[str], now_ms: int) -> bool:
    """A stored unreplied command is published again only to an online device, within
    its TTL."""
    return row["device_id"] in online and row["created_ms"] + row["body"]["ttl_ms"] > now_ms


def _reader_for(store: Store) -> Store:
    """A second SQLite connection for reads (WAL: readers never wait for the writer); any
    other store has a connection pool and is its own reader."""
    if isinstance(store, SqliteStore):
        return SqliteStore(store.path)
    return store
