"""The coordinator's ingest pipeline: admit, queue, decrypt and store, receipt.

On the loop, an incoming envelope only passes its device's quota (quota.py, on the topic's
device id, before anything is decrypted) and joins its device's bounded queue
(fairqueue.py); a message refused there gets no receipt, so the device sends it again. A
single writer thread takes each transaction's worth round robin across devices (alerts and
replies first, at most `receipt_batch` messages or about `ingest.batch_work_ms` of work),
decrypts, checks and stores it in one transaction (`store_envelopes`), and only after that
commit are receipts published, one per device with inclusive seq ranges (duplicates
included, so the device can delete them too).

`Ingest` is handed what it uses, not its coordinator: the config, the metrics, the store,
the device keys, the broker client, a call on the writer thread and a read of the stored
quotas. The decisions (policies from the config, a batch's size, the cost estimate) are
pure functions beside it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from dgdm.sync.coordinator.config import CoordinatorConfig, IngestSection
from dgdm.sync.coordinator.fairqueue import FairQueue, Queued, QueueLimits
from dgdm.sync.coordinator.limits import RECEIPT_BATCH_BYTES, limits_by_kind
from dgdm.sync.coordinator.lograte import QUARANTINE_LOG
from dgdm.sync.coordinator.metrics import Metrics
from dgdm.sync.coordinator.quota import QuotaPolicy, Quotas, Rate, parse_override
from dgdm.sync.coordinator.registry import Registry
from dgdm.sync.coordinator.store import (
    Incoming,
    Quarantined,
    Store,
    StoreResult,
    merge_results,
    quarantine_record,
)
from dgdm.sync.coordinator.stores import StoreUnavailable
from dgdm.sync.envelope import (
    FLAG_ENCRYPTED,
    KEY_ID_BYTES,
    BodyLimits,
    Envelope,
    Kind,
    SealedEnvelopeError,
    open_envelope,
    ranges_from_seqs,
    seal,
)
from dgdm.sync.errors import EnvelopeError, TransportError
from dgdm.sync.mqtt import MqttClient
from dgdm.sync.topics import kind_topic
from dgdm.sync.wallclock import now_ms

log = logging.getLogger(__name__)
KEY_ID_OFFSET = 6  # SPEC §6: magic 2, version 1, flags 1, kind 1, priority 1, then the key id
QUOTA_REFRESH_S = 5.0


# -- pure decisions ----------------------------------------------------------------------


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


def policy_with_overrides(ingest: IngestSection, stored: Mapping[str, str]) -> QuotaPolicy:
    """The config's policy with each device's own quota (`devices quota`) over it; a stored
    override that says nothing usable leaves its device on the config's."""
    overrides = {}
    for device_id, text in stored.items():
        own = parse_override(text)
        if own:
            own_ingest = dataclasses.replace(ingest, **own)  # type: ignore[arg-type]
            overrides[device_id] = quota_policy(own_ingest)
    return dataclasses.replace(quota_policy(ingest), overrides=overrides)


def batch_limit(receipt_batch: int, batch_work_ms: float, seconds_per_message: float) -> int:
    """At most receipt_batch messages, and about batch_work_ms of store work at the
    measured cost per message (0: not measured yet)."""
    if seconds_per_message <= 0:
        return receipt_batch
    budget = batch_work_ms / 1000 / seconds_per_message
    return max(1, min(receipt_batch, int(budget)))


def smoothed_cost(previous: float, measured: float) -> float:
    """The store's cost per message, an exponential average of the flushes (0: none yet)."""
    return measured if previous == 0 else 0.8 * previous + 0.2 * measured


def key_id(payload: bytes) -> bytes | None:
    """The envelope's key id, to pick the device's keys; open_envelope then checks the whole
    header (so it is not parsed twice per message) and names what is wrong with it."""
    found = payload[KEY_ID_OFFSET : KEY_ID_OFFSET + KEY_ID_BYTES]
    return found if len(found) == KEY_ID_BYTES else None


# -- the writer thread's part: decrypt, check, commit --------------------------------------


@dataclass
class Batch:
    incoming: list[Incoming]
    seqs: dict[str, list[int]]  # to receipt, by device
    rejects: dict[str, int]  # by reason
    kinds: collections.Counter[Kind]


@dataclass(frozen=True)
class Opener:
    """Opens one envelope with its device's keys and checks it against its topic."""

    registry: Registry
    plaintext_allowed: Callable[[str], bool]  # the device is enrolled as sending plaintext
    limits: Mapping[Kind, BodyLimits]
    max_bytes: int

    @classmethod
    def for_config(cls, config: CoordinatorConfig, registry: Registry, store: Store) -> Opener:
        return cls(
            registry,
            store.plaintext_telemetry,
            limits_by_kind(config),
            config.coordinator.max_envelope_bytes,
        )

    def open(self, device_id: str, kind: Kind, payload: bytes) -> tuple[Incoming, Envelope]:
        keys = self.registry.keys_for(device_id, key_id(payload))
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
            max_bytes=self.max_bytes,
            allow_plaintext_telemetry=plaintext
            and kind is Kind.TELEMETRY
            and self.plaintext_allowed(device_id),
            limits=self.limits[kind],
        )
        if env.header.kind is not kind:
            message = f"{env.header.kind.name.lower()} on a {kind.name.lower()} topic"
            if env.header.encrypted:
                raise SealedEnvelopeError("bad_kind", message, env.header, b"")
            raise EnvelopeError("bad_kind", message)
        item = Incoming(device_id, kind, env.header.seq, env.header.created_ms, env.body)
        return item, env


def store_envelopes(
    raw: list[Queued], now_ms: int, opener: Opener, store: Store
) -> tuple[Batch, StoreResult]:
    """On the writer thread: decrypt and check every envelope, then commit.

    A bad envelope fails alone: unauthenticated ones are rejected (no receipt); one the
    device's key sealed but that is refused (an integer beyond 64 bits, a body over its
    bounds) is quarantined and receipted, so the device stops resending it. Only sealed
    envelopes' seqs are receipted: a plaintext one may be forged, and its seq would make
    the device delete the real message. `batch.incoming` is the transaction being
    filled: every RECEIPT_BATCH_BYTES of decoded bodies is committed, so their memory
    stays bounded however large the batch.
    """
    batch = Batch([], {}, {}, collections.Counter())
    quarantine: list[Quarantined] = []
    results: list[StoreResult] = []
    body_bytes = 0
    for device_id, kind, payload in raw:
        try:
            item, env = opener.open(device_id, kind, payload)
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
            results.append(store.store_batch(batch.incoming, now_ms, quarantine))
            batch.incoming, quarantine, body_bytes = [], [], 0
    if batch.incoming or quarantine or not results:
        results.append(store.store_batch(batch.incoming, now_ms, quarantine))
    return batch, merge_results(results)


# -- the loop's part -----------------------------------------------------------------------


class Ingest:
    """The queue between the broker and the writer thread, and the flushes that drain it."""

    def __init__(
        self,
        config: CoordinatorConfig,
        metrics: Metrics,
        *,
        store: Store,
        registry: Registry,
        mqtt: MqttClient,
        on_writer: Callable[..., Awaitable[Any]],
        read_quotas: Callable[[], Awaitable[dict[str, str]]],
    ) -> None:
        self._config = config
        self._metrics = metrics
        self._store = store
        self._registry = registry
        self._mqtt = mqtt
        self._on_writer = on_writer
        self._read_quotas = read_quotas
        self._opener = Opener.for_config(config, registry, store)
        self.queue = FairQueue(queue_limits(config.ingest))
        self.quotas = Quotas(quota_policy(config.ingest))
        self.reading_paused = False
        self.store_error: str | None = None
        self._rejected: collections.Counter[str] = collections.Counter()
        self._seconds_per_message = 0.0  # measured store cost, to size a ~batch_work_ms batch
        self._flush_now = asyncio.Event()

    # -- admission -----------------------------------------------------------------------

    def admit(self, device_id: str, kind: Kind, payload: bytes) -> None:
        """Quota, then the device's bounded queue; a refusal gets no receipt, so an honest
        device sends the message again later. When the whole queue is full, stop reading
        the socket until it has drained (the broker holds the rest)."""
        verdict = self.quotas.admit(device_id, kind, len(payload), time.monotonic())
        if not verdict.admitted:
            self.reject("rate_limited")
            if verdict.alert:
                self._flooding(device_id)
            return
        refused = self.queue.push(device_id, kind, payload)
        if refused is not None:
            self.reject(refused)
            return
        if len(self.queue) >= self._config.coordinator.receipt_batch:
            self._flush_now.set()
        if self.queue.saturated and not self.reading_paused:
            self._pause_reading(True)

    def reject(self, reason: str, count: int = 1) -> None:
        """Counted here and added to the metric once per flush turn: under a flood this runs
        for every message, and a labelled Prometheus increment costs a lock and lookups."""
        self._rejected[reason] += count

    def _count_rejects(self) -> None:
        rejected, self._rejected = self._rejected, collections.Counter()
        for reason, count in rejected.items():
            self._metrics.rejects.labels(reason=reason).inc(count)

    def _pause_reading(self, paused: bool) -> None:
        self.reading_paused = paused
        self._metrics.reading_paused.set(int(paused))
        if paused:
            self._mqtt.pause_reading()
            log.warning("ingest queue full (%d messages): reading paused", len(self.queue))
        else:
            self._mqtt.resume_reading()

    def _flooding(self, device_id: str) -> None:
        """The deduplicated `device_flooding` alert: once per device per flooding_alert_s."""
        self._metrics.flooding_alerts.inc()
        log.warning(
            "device_flooding: %s sends beyond its quota; its excess is dropped unreceipted",
            device_id,
            extra={"alert": "device_flooding", "device_id": device_id},
        )

    # -- quotas ----------------------------------------------------------------------------

    async def refresh_quotas_forever(self) -> None:
        """Per-device quotas set with `devices quota` (any replica, or the CLI) apply within
        QUOTA_REFRESH_S, like other registry changes (SPEC §7.1)."""
        while True:
            await asyncio.sleep(QUOTA_REFRESH_S)
            try:
                await self.load_quotas()
            except (StoreUnavailable, sqlite3.Error) as exc:  # keep the quotas we have
                log.debug("quota overrides not refreshed: %s", exc)

    async def load_quotas(self) -> None:
        stored = await self._read_quotas()
        self.quotas.policy = policy_with_overrides(self._config.ingest, stored)

    # -- flushes ---------------------------------------------------------------------------

    async def flush_forever(self) -> None:
        interval = self._config.coordinator.receipt_interval_ms / 1000
        while True:
            if len(self.queue) < self._config.coordinator.receipt_batch:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._flush_now.wait(), interval)
            self._flush_now.clear()
            if self.queue:
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
                    self.store_error = None
                    self._metrics.ingest_batches.inc()
            if self.reading_paused and self.queue.resumable:
                self._pause_reading(False)
            self._count_rejects()

    async def drain(self) -> None:
        """Store and receipt what is queued (at stop, once the flush task is cancelled)."""
        try:
            while self.queue:
                await self._flush(self._take())
        except StoreUnavailable as exc:
            # Nothing left was receipted, so its devices send it again to whoever runs next.
            left = {"messages": len(self.queue), "error": str(exc)}
            log.warning("store unavailable at stop: messages left unreceipted", extra=left)

    def _store_down(self, exc: StoreUnavailable) -> None:
        if self.store_error is None:
            log.warning("store unavailable, ingest paused (nothing receipted): %s", exc)
        self.store_error = str(exc)
        self.reject("store_unavailable")

    def _take(self) -> list[Queued]:
        """One transaction's worth (`batch_limit`), at most batch_bytes."""
        ingest = self._config.ingest
        limit = batch_limit(
            self._config.coordinator.receipt_batch, ingest.batch_work_ms, self._seconds_per_message
        )
        batch = self.queue.take(limit, ingest.batch_bytes)
        self._metrics.queue_messages.set(len(self.queue))
        self._metrics.queue_bytes.set(self.queue.bytes)
        return batch

    async def _flush(self, raw: list[Queued]) -> None:
        started = time.monotonic()
        batch, result = await self._on_writer(
            store_envelopes, raw, now_ms(), self._opener, self._store
        )
        per_message = (time.monotonic() - started) / max(1, len(raw))
        self._seconds_per_message = smoothed_cost(self._seconds_per_message, per_message)
        self._count_batch(batch, result)
        await self._send_receipts(batch.seqs, result)

    def _count_batch(self, batch: Batch, result: StoreResult) -> None:
        metrics = self._metrics
        for reason, count in batch.rejects.items():
            self.reject(reason, count)
        for kind, count in batch.kinds.items():
            metrics.messages_in.labels(kind=kind.name.lower()).inc(count)
        metrics.duplicates.inc(result.duplicates)
        now_s = time.monotonic()
        for q in result.quarantined:
            self.reject(q.reason)
            metrics.quarantined.labels(reason=q.reason).inc()
            if QUARANTINE_LOG.allow(q.device_id, now_s):
                log.warning(
                    "quarantined %s seq %s from %s (%s; %d more since the last such line)",
                    q.kind.name.lower(),
                    q.seq,
                    q.device_id,
                    q.sample[:200],
                    QUARANTINE_LOG.take_suppressed(q.device_id),
                )

    async def _send_receipts(self, seqs: dict[str, list[int]], result: StoreResult) -> None:
        for device_id, device_seqs in seqs.items():
            keys = self._registry.keys_for(device_id)
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
                await self._mqtt.publish(kind_topic(device_id, Kind.RECEIPT), payload)
            except TransportError as exc:
                log.info("receipt for %s not sent (%s); the device will resend", device_id, exc)
                continue
            self._metrics.receipts.inc()

    # -- views -----------------------------------------------------------------------------

    def is_flooding(self, device_id: str) -> bool:
        """This replica raised device_flooding for it within ingest.flooding_alert_s."""
        return self.quotas.is_flooding(device_id, time.monotonic())

    def view(self) -> dict[str, Any]:
        """Queue depths, paused reading, flooding devices and the top talkers (bounded)."""
        now = time.monotonic()
        return {
            "queue": {
                "messages": len(self.queue),
                "bytes": self.queue.bytes,
                "devices": self.queue.devices(),
            },
            "reading_paused": self.reading_paused,
            "flooding": self.quotas.flooding(now),
            "top_talkers": [{"device_id": d, "refused": n} for d, n in self.quotas.top_talkers(10)],
        }
