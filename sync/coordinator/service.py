"""The coordinator service: ingest from MQTT, store, receipt, and send commands.

On the loop, an incoming envelope only passes its device's quota (quota.py, on the topic's
device id, before anything is decrypted) and joins its device's bounded queue
(fairqueue.py); a message refused there gets no receipt, so the device sends it again. A
single worker thread takes each transaction's worth round robin across devices (alerts and
replies first, at most `receipt_batch` messages or about `ingest.batch_work_ms` of work),
decrypts, checks and stores it in one transaction, and only after that commit are receipts
published, one per device with inclusive seq ranges (duplicates included, so the device can
delete them too). The HTTP API runs on a loop of its own and reads on its own connections
(api_thread.py), so it never waits for ingest.

MQTT 5: the coordinator subscribes with a shared subscription so that several instances
split the fleet; `status` is subscribed plainly because brokers send no retained messages
to shared subscriptions. MQTT 3.1.1: plain topics and a single coordinator.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import inspect
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from dgdm.sync import presence
from dgdm.sync.coordinator.commands import (
    DEFAULT_TTL_MS,
    MAX_TTL_MS,
    BadCommand,
    check_command_request,
)
from dgdm.sync.coordinator.config import CoordinatorConfig, IngestSection
from dgdm.sync.coordinator.fairqueue import FairQueue, Queued, QueueLimits
from dgdm.sync.coordinator.housekeeping import Housekeeping
from dgdm.sync.coordinator.jobs import JobSpec
from dgdm.sync.coordinator.jobs_runner import JobRunner
from dgdm.sync.coordinator.limits import RECEIPT_BATCH_BYTES, limits_by_kind
from dgdm.sync.coordinator.lograte import QUARANTINE_LOG
from dgdm.sync.coordinator.metrics import Metrics
from dgdm.sync.coordinator.quota import QuotaPolicy, Quotas, Rate, parse_override
from dgdm.sync.coordinator.registry import Registry
from dgdm.sync.coordinator.store import (
    Incoming,
    Quarantined,
    SqliteStore,
    Store,
    StoreResult,
    merge_results,
    quarantine_record,
)
from dgdm.sync.coordinator.stores import StoreUnavailable, open_store
from dgdm.sync.crypto import load_private_key
from dgdm.sync.envelope import (
    FLAG_ENCRYPTED,
    KEY_ID_BYTES,
    TOPIC_SUFFIX,
    BodyLimits,
    Envelope,
    Kind,
    SealedEnvelopeError,
    decode_body,
    open_envelope,
    ranges_from_seqs,
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
# the newest RESEND_BATCH a round.
RESEND_INTERVAL_S = 10.0
RESEND_AFTER_MS = 10_000
RESEND_BATCH = 500

MAX_STATUS_BYTES = 4096
KEY_ID_OFFSET = 6  # SPEC §6: magic 2, version 1, flags 1, kind 1, priority 1, then the key id
MAX_ROUTES = 65536
HEALTH_TIMEOUT_S = 5.0
QUOTA_REFRESH_S = 5.0


class UnknownDevice(SyncError):
    """The device is not enrolled."""


@dataclass
class _Batch:
    incoming: list[Incoming]
    seqs: dict[str, list[int]]
    rejects: dict[str, int]
    kinds: collections.Counter[Kind]


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
        # The job runner's store calls: on the writer thread for SQLite (one connection,
        # one writer), on a thread of their own otherwise, so a store outage that makes a
        # tick wait for the pool never holds up ingest's recovery.
        self._jobs_executor = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="coord-jobs"
        )
        ingest = config.ingest
        self._queue = FairQueue(queue_limits(ingest))
        self._quotas = Quotas(quota_policy(ingest))
        self._reading_paused = False
        self._rejected: collections.Counter[str] = collections.Counter()
        self._store_error: str | None = None
        self._seconds_per_message = 0.0  # measured store cost, to size a ~batch_work_ms batch
        self._flush_now = asyncio.Event()
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
        self.metrics.follow(
            store_up=lambda: self._store_error is None,
            broker_connected=lambda: mqtt.connected,
            devices_enrolled=registry.count,
        )
        await self.mqtt.start()
        await self._load_quotas()
        self._tasks = [
            asyncio.create_task(self._flush_forever(), name="coord-flush"),
            asyncio.create_task(self._refresh_quotas_forever(), name="coord-quotas"),
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
        try:
            while self._queue:
                await self._flush(self._take())
        except StoreUnavailable as exc:
            # Nothing left was receipted, so its devices send it again to whoever runs next.
            left = {"messages": len(self._queue), "error": str(exc)}
            log.warning("store unavailable at stop: messages left unreceipted", extra=left)
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
        """The job runner's store call (see `_jobs_executor`)."""
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

    def is_flooding(self, device_id: str) -> bool:
        """This replica raised device_flooding for it within ingest.flooding_alert_s."""
        return self._quotas.is_flooding(device_id, time.monotonic())

    # -- ingest --------------------------------------------------------------------------

    def _on_message(self, topic: str, payload: bytes) -> None:
        parsed = self._route(topic)
        if parsed is None:
            self._reject("bad_topic")
            return
        device_id, suffix = parsed
        if suffix == STATUS:
            self._on_status(device_id, payload)
            return
        kind = kind_for_suffix(suffix)
        if kind not in UPLINK_KINDS:
            self._reject("bad_topic")
            return
        self._admit(device_id, kind, payload)

    def _admit(self, device_id: str, kind: Kind, payload: bytes) -> None:
        """Quota, then the device's bounded queue; a refusal gets no receipt, so an honest
        device sends the message again later. When the whole queue is full, stop reading
        the socket until it has drained (the broker holds the rest)."""
        verdict = self._quotas.admit(device_id, kind, len(payload), time.monotonic())
        if not verdict.admitted:
            self._reject("rate_limited")
            if verdict.alert:
                self._flooding(device_id)
            return
        refused = self._queue.push(device_id, kind, payload)
        if refused is not None:
            self._reject(refused)
            return
        if len(self._queue) >= self.config.coordinator.receipt_batch:
            self._flush_now.set()
        if self._queue.saturated and not self._reading_paused:
            self._pause_reading(True)

    def _pause_reading(self, paused: bool) -> None:
        assert self.mqtt is not None
        self._reading_paused = paused
        self.metrics.reading_paused.set(int(paused))
        if paused:
            self.mqtt.pause_reading()
            log.warning("ingest queue full (%d messages): reading paused", len(self._queue))
        else:
            self.mqtt.resume_reading()

    async def _refresh_quotas_forever(self) -> None:
        """Per-device quotas set with `devices quota` (any replica, or the CLI) apply within
        QUOTA_REFRESH_S, like other registry changes (SPEC §7.1)."""
        while True:
            await asyncio.sleep(QUOTA_REFRESH_S)
            try:
                await self._load_quotas()
            except (StoreUnavailable, sqlite3.Error) as exc:  # keep the quotas we have
                log.debug("quota overrides not refreshed: %s", exc)

    async def _load_quotas(self) -> None:
        stored = await self._read(lambda s: s.quotas())
        ingest = self.config.ingest
        overrides = {}
        for device_id, text in stored.items():
            own = parse_override(text)
            if own:
                own_ingest = dataclasses.replace(ingest, **own)  # type: ignore[arg-type]
                overrides[device_id] = quota_policy(own_ingest)
        self._quotas.policy = dataclasses.replace(quota_policy(ingest), overrides=overrides)

    def _flooding(self, device_id: str) -> None:
        """The deduplicated `device_flooding` alert: once per device per flooding_alert_s."""
        self.metrics.flooding_alerts.inc()
        log.warning(
            "device_flooding: %s sends beyond its quota; its excess is dropped unreceipted",
            device_id,
            extra={"alert": "device_flooding", "device_id": device_id},
        )

    def _store_down(self, exc: StoreUnavailable) -> None:
        if self._store_error is None:
            log.warning("store unavailable, ingest paused (nothing receipted): %s", exc)
        self._store_error = str(exc)
        self._reject("store_unavailable")

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

    def ingest_view(self) -> dict[str, Any]:
        """Queue depths, paused reading, flooding devices and the top talkers (bounded)."""
        now = time.monotonic()
        return {
            "queue": {
                "messages": len(self._queue),
                "bytes": self._queue.bytes,
                "devices": self._queue.devices(),
            },
            "reading_paused": self._reading_paused,
            "flooding": self._quotas.flooding(now),
            "top_talkers": [
                {"device_id": d, "refused": n} for d, n in self._quotas.top_talkers(10)
            ],
        }

    def _route(self, topic: str) -> tuple[str, str] | None:
        """parse_topic, remembered: a fleet has a handful of topics per device."""
        try:
            return self._routes[topic]
        except KeyError:
            if len(self._routes) >= MAX_ROUTES:
                self._routes.clear()
            parsed = self._routes[topic] = parse_topic(topic)
            return parsed

    def _reject(self, reason: str, count: int = 1) -> None:
        """Counted here and added to the metric once per flush turn: under a flood this runs
        for every message, and a labelled Prometheus increment costs a lock and lookups."""
        self._rejected[reason] += count

    def _count_rejects(self) -> None:
        rejected, self._rejected = self._rejected, collections.Counter()
        for reason, count in rejected.items():
            self.metrics.rejects.labels(reason=reason).inc(count)

    async def _flush_forever(self) -> None:
        interval = self.config.coordinator.receipt_interval_ms / 1000
        while True:
            if len(self._queue) < self.config.coordinator.receipt_batch:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._flush_now.wait(), interval)
            self._flush_now.clear()
            if self._queue:
                try:
                    await self._flush(self._take())
                except StoreUnavailable as exc:
                    # Nothing of the batch was committed or receipted: the devices keep
                    # it and send it again; ingest resumes by itself when the store is back.
                    self._store_down(exc)
                    await asyncio.sleep(interval)
                except Exception:
                    log.exception("storing a batch failed; devices will resend it")
                    await asyncio.sleep(interval)  # a store that is down is not hammered
                else:
                    self._store_error = None
                    self.metrics.ingest_batches.inc()
            if self._reading_paused and self._queue.resumable:
                self._pause_reading(False)
            self._count_rejects()

    def _take(self) -> list[Queued]:
        """One transaction's worth: at most receipt_batch messages, batch_bytes, and about
        batch_work_ms of store work at the measured cost per message."""
        ingest = self.config.ingest
        limit = self.config.coordinator.receipt_batch
        if self._seconds_per_message > 0:
            budget = ingest.batch_work_ms / 1000 / self._seconds_per_message
            limit = max(1, min(limit, int(budget)))
        batch = self._queue.take(limit, ingest.batch_bytes)
        self.metrics.queue_messages.set(len(self._queue))
        self.metrics.queue_bytes.set(self._queue.bytes)
        return batch

    async def _flush(self, raw: list[Queued]) -> None:
        started = time.monotonic()
        batch, result = await self._db(self._ingest, raw, now_ms())
        per_message = (time.monotonic() - started) / max(1, len(raw))
        self._seconds_per_message = (
            per_message
            if self._seconds_per_message == 0
            else 0.8 * self._seconds_per_message + 0.2 * per_message
        )
        for reason, count in batch.rejects.items():
            self._reject(reason, count)
        for kind, count in batch.kinds.items():
            self.metrics.messages_in.labels(kind=kind.name.lower()).inc(count)
        self.metrics.duplicates.inc(result.duplicates)
        now_s = time.monotonic()
        for q in result.quarantined:
            self._reject(q.reason)
            self.metrics.quarantined.labels(reason=q.reason).inc()
            if QUARANTINE_LOG.allow(q.device_id, now_s):
                log.warning(
                    "quarantined %s seq %s from %s (%s; %d more since the last such line)",
                    q.kind.name.lower(),
                    q.seq,
                    q.device_id,
                    q.sample[:200],
                    QUARANTINE_LOG.take_suppressed(q.device_id),
                )
        await self._send_receipts(batch.seqs, result)

    def _ingest(self, raw: list[Queued], now_ms: int) -> tuple[_Batch, StoreResult]:
        """On the database thread: decrypt and check every envelope, then commit.

        A bad envelope fails alone: unauthenticated ones are rejected (no receipt); one the
        device's key sealed but that is refused (an integer beyond 64 bits, a body over its
        bounds) is quarantined and receipted, so the device stops resending it. Only sealed
        envelopes' seqs are receipted: a plaintext one may be forged, and its seq would make
        the device delete the real message. `batch.incoming` is the transaction being
        filled: every RECEIPT_BATCH_BYTES of decoded bodies is committed, so their memory
        stays bounded however large the batch.
        """
        batch = _Batch([], {}, {}, collections.Counter())
        limits = limits_by_kind(self.config)
        quarantine: list[Quarantined] = []
        results: list[StoreResult] = []
        body_bytes = 0
        for device_id, kind, payload in raw:
            try:
                item, env = self._open(device_id, kind, payload, limits)
            except SealedEnvelopeError as exc:
                header = exc.header
                quarantine.append(
                    quarantine_record(
                        device_id,
                        header.kind,
                        header.seq,
                        exc.reason,
                        message=str(exc),
                        sample=exc.sample,
                    )
                )
                batch.seqs.setdefault(device_id, []).append(header.seq)
                continue
            except EnvelopeError as exc:
                batch.rejects[exc.reason] = batch.rejects.get(exc.reason, 0) + 1
                log.debug("rejected envelope from %s: %s", device_id, exc)
                continue
            batch.incoming.append(item)
            batch.kinds[kind] += 1
            if env.header.encrypted:
                batch.seqs.setdefault(device_id, []).append(item.seq)
            body_bytes += env.body_bytes
            if body_bytes >= RECEIPT_BATCH_BYTES:
                results.append(self.store.store_batch(batch.incoming, now_ms, quarantine))
                batch.incoming, quarantine, body_bytes = [], [], 0
        if batch.incoming or quarantine or not results:
            results.append(self.store.store_batch(batch.incoming, now_ms, quarantine))
        return batch, merge_results(results)

    def _open(
        self, device_id: str, kind: Kind, payload: bytes, limits: dict[Kind, BodyLimits]
    ) -> tuple[Incoming, Envelope]:
        assert self.registry is not None
        keys = self.registry.keys_for(device_id, _key_id(payload))
        if keys is None:
            raise EnvelopeError("unknown_device", f"device {device_id!r} is not enrolled")
        # Plaintext only from a device enrolled as sending it (a store lookup, made only
        # for a plaintext envelope): anyone on the path could have written it.
        plaintext = len(payload) > 3 and not payload[3] & FLAG_ENCRYPTED
        env = open_envelope(
            payload,
            key=keys.up,
            key_id=keys.key_id,
            expected_device=device_id,
            max_bytes=self.config.coordinator.max_envelope_bytes,
            allow_plaintext_telemetry=plaintext
            and kind is Kind.TELEMETRY
            and self.store.plaintext_telemetry(device_id),
            limits=limits[kind],
        )
        if env.header.kind is not kind:
            message = f"{env.header.kind.name.lower()} on a {kind.name.lower()} topic"
            if env.header.encrypted:
                raise SealedEnvelopeError("bad_kind", message, env.header, b"")
            raise EnvelopeError("bad_kind", message)
        item = Incoming(device_id, kind, env.header.seq, env.header.created_ms, env.body)
        return item, env

    async def _send_receipts(self, seqs: dict[str, list[int]], result: StoreResult) -> None:
        assert self.registry is not None
        assert self.mqtt is not None
        for device_id, device_seqs in seqs.items():
            keys = self.registry.keys_for(device_id)
            if keys is None:
                continue
            body = {"ranges": ranges_from_seqs(device_seqs)}
            payload = seal(
                Kind.RECEIPT,
                result.receipt_seqs[device_id],
                now_ms(),
                device_id,
                body,
                key=keys.down,
                key_id=keys.key_id,
            )
            try:
                await self.mqtt.publish(kind_topic(device_id, Kind.RECEIPT), payload)
            except TransportError as exc:
                log.info("receipt for %s not sent (%s); the device will resend", device_id, exc)
                continue
            self.metrics.receipts.inc()

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
            self._reject("bad_status")
            return
        if not self.registry.enrolled(device_id):
            self._reject("unknown_device")
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
        once, so a copy of one that did arrive is dropped there. Returns how many went."""
        since, until = now_ms - MAX_TTL_MS, now_ms - RESEND_AFTER_MS
        rows = await self._read(lambda s: s.unreplied_commands(since, until, RESEND_BATCH))
        sent = 0
        for row in rows:
            body, created = row["body"], row["created_ms"]
            if row["device_id"] not in self._online or created + body["ttl_ms"] <= now_ms:
                continue
            await self.publish_command(row["device_id"], row["seq"], created, body)
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


def _reader_for(store: Store) -> Store:
    """A second SQLite connection for reads (WAL: readers never wait for the writer); any
    other store has a connection pool and is its own reader."""
    if isinstance(store, SqliteStore):
        return SqliteStore(store.path)
    return store


def queue_limits(ingest: IngestSection) -> QueueLimits:
    return QueueLimits(
        device_messages=ingest.device_queue_messages,
        device_bytes=ingest.device_queue_bytes,
        total_messages=ingest.queue_messages,
        total_bytes=ingest.queue_bytes,
    )


def quota_policy(ingest: IngestSection) -> QuotaPolicy:
    """Per-device rates from the config; a bucket holds burst_s of its rate, and at least
    100 messages (1 MiB), so a device back from an outage starts with a sizeable burst."""

    def rate(per_s: float, floor: float) -> Rate:
        return Rate(per_s, max(floor, per_s * ingest.burst_s))

    return QuotaPolicy(
        messages={
            Kind.RESULT: rate(ingest.result_per_s, 100),
            Kind.TELEMETRY: rate(ingest.telemetry_per_s, 100),
            Kind.ALERT: rate(ingest.alert_per_s, 100),
            Kind.REPLY: rate(ingest.reply_per_s, 100),
        },
        bytes=rate(float(ingest.bytes_per_s), float(1 << 20)),
        alert_every_s=ingest.flooding_alert_s,
    )


def _key_id(payload: bytes) -> bytes | None:
    """The envelope's key id, to pick the device's keys; open_envelope then checks the whole
    header (so it is not parsed twice per message) and names what is wrong with it."""
    key_id = payload[KEY_ID_OFFSET : KEY_ID_OFFSET + KEY_ID_BYTES]
    return key_id if len(key_id) == KEY_ID_BYTES else None
