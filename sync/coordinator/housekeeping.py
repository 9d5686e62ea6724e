"""The store's housekeeping (issue 19 item 4, SPEC §7.1 `retention_days`): retention per kind,
telemetry downsampling past an age, a per-device storage quota, and the store's size in
`/metrics`, in the background, in small transactions.

The decisions (what is past retention, which telemetry rows a downsampling drops, how much a
device over its quota must free) are pure functions; `Housekeeping` only executes them on
the coordinator's database thread, one `prune_batch` at a time, so an ingest transaction
never waits behind more than one of them.

A device over its quota loses its *oldest* data first, telemetry before alerts before
results, and keeps sending: that is what an operator expects of a storage quota (a ring
buffer, like journald's SystemMaxUse). Refusing its new messages instead would leave them in
the device's outbox, whose own eviction then drops the newest telemetry and finally results,
silently at the edge, while the coordinator's view of the device freezes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from dgdm.sync.coordinator.config import StoreSection
from dgdm.sync.coordinator.lograte import LogRate
from dgdm.sync.envelope import Kind

log = logging.getLogger(__name__)

DAY_MS = 24 * 3600 * 1000
# Oldest first within a device over its quota: the cheapest data to lose goes first.
QUOTA_ORDER = (Kind.TELEMETRY, Kind.ALERT, Kind.RESULT, Kind.REPLY)
# A device over quota is brought back to this fraction, so it is not pruned every pass.
QUOTA_LOW_WATER = 0.9
# Pages per pass and per job: a pass ends in bounded time; what is left waits for the next.
MAX_PAGES = 100


@dataclass(frozen=True)
class Plan:
    """What one pass at `now_ms` does (pure, from the [store] config)."""

    prune_before: dict[Kind, int]  # messages of a kind received before this go
    downsample_before: int | None  # telemetry received before this is thinned
    bucket_ms: int
    quota_bytes: int  # 0: none


def plan(store: StoreSection, now_ms: int) -> Plan:
    days = {
        Kind.TELEMETRY: store.telemetry_retention_days,
        Kind.RESULT: store.result_retention_days,
        Kind.ALERT: store.alert_retention_days,
        Kind.REPLY: 0,
        Kind.COMMAND: 0,
    }
    prune_before = {k: now_ms - (d or store.retention_days) * DAY_MS for k, d in days.items()}
    downsample = store.downsample_after_days
    return Plan(
        prune_before=prune_before,
        downsample_before=now_ms - downsample * DAY_MS if downsample else None,
        bucket_ms=store.downsample_minutes * 60_000,
        quota_bytes=store.device_quota_bytes,
    )


def downsample_victims(
    rows: Iterable[tuple[int, int, str]], bucket_ms: int, kept: dict[str, int]
) -> list[int]:
    """Rows are (received_ms, id, device_id) in that order; the first row of each device in
    each `bucket_ms` window stays, the others are returned. `kept` (device -> the bucket of
    its last kept row) carries over between pages and is updated."""
    victims = []
    for received_ms, row_id, device_id in rows:
        bucket = received_ms // bucket_ms
        if kept.get(device_id) == bucket:
            victims.append(row_id)
        else:
            kept[device_id] = bucket
    return victims


def quota_excess(usage: dict[str, int], quota_bytes: int) -> dict[str, int]:
    """Bytes each device over its quota must free to get back to the low-water mark."""
    if quota_bytes <= 0:
        return {}
    low = int(quota_bytes * QUOTA_LOW_WATER)
    return {d: used - low for d, used in usage.items() if used > quota_bytes}


# run(name, *args): call the store's method `name` on the thread that writes to it, so
# housekeeping transactions queue between ingest transactions instead of contending.
StoreCall = Callable[..., Awaitable[Any]]


class Housekeeping:
    """`start()` after the coordinator started, `await stop()` before it stops."""

    def __init__(
        self,
        config: StoreSection,
        registry: CollectorRegistry,
        run: StoreCall,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._run = run
        self._clock = clock
        self.store_bytes = Gauge(
            "dgdm_coordinator_store_bytes", "Size of the store on disk", registry=registry
        )
        self.pruned = Counter(
            "dgdm_coordinator_pruned",
            "Rows deleted by housekeeping, by kind and why (retention, downsample, quota)",
            ["kind", "why"],
            registry=registry,
        )
        self.over_quota = Gauge(
            "dgdm_coordinator_devices_over_quota",
            "Devices whose stored bytes exceeded store.device_quota_bytes at the last pass",
            registry=registry,
        )
        self._cursor = (0, 0)  # the downsampler's (received_ms, id) reading position
        self._kept: dict[str, int] = {}
        self._quota_log = LogRate(3600.0)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self.run_forever(), name="coord-housekeeping")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def run_forever(self) -> None:
        while True:
            try:
                await self.run_once()
            except Exception:  # the store may be down for a while: try again next pass
                log.exception("store housekeeping failed; retrying in %ss", self.interval_s)
            await asyncio.sleep(self.interval_s)

    @property
    def interval_s(self) -> float:
        return self.config.housekeeping_interval_s

    async def run_once(self) -> dict[str, int]:
        """One pass; returns rows deleted per job (retention, downsample, quota)."""
        now_ms = int(self._clock() * 1000)
        todo = plan(self.config, now_ms)
        done = {"retention": 0, "downsample": 0, "quota": 0}
        for kind, before in todo.prune_before.items():
            done["retention"] += await self._pages(
                "retention", kind, "prune", kind, before, self.config.prune_batch
            )
        done["retention"] += await self._pages(
            "retention", None, "prune_quarantine", todo.prune_before[Kind.COMMAND],
            self.config.prune_batch,
        )  # fmt: skip
        if todo.downsample_before is not None:
            done["downsample"] = await self._downsample(todo.downsample_before, todo.bucket_ms)
        done["quota"] = await self._quota(todo.quota_bytes)
        self.store_bytes.set(await self._query("size_bytes"))
        return done

    async def _query(self, name: str, *args: Any) -> Any:
        return await self._run(name, *args)

    async def _pages(self, why: str, kind: Kind | None, name: str, *args: Any) -> int:
        """Call a store pruner until it deletes less than a page (or MAX_PAGES)."""
        total = 0
        for _ in range(MAX_PAGES):
            deleted = int(await self._query(name, *args))
            total += deleted
            if deleted < self.config.prune_batch:
                break
        if kind is not None and total:
            self.pruned.labels(kind=kind.name.lower(), why=why).inc(total)
        return total

    async def _downsample(self, before_ms: int, bucket_ms: int) -> int:
        total = 0
        for _ in range(MAX_PAGES):
            rows = await self._query(
                "telemetry_page", self._cursor, before_ms, self.config.prune_batch
            )
            if not rows:
                break
            victims = downsample_victims(rows, bucket_ms, self._kept)
            self._cursor = rows[-1][:2]
            if victims:
                total += int(await self._query("delete_messages", victims))
        if total:
            self.pruned.labels(kind="telemetry", why="downsample").inc(total)
        return total

    async def _quota(self, quota_bytes: int) -> int:
        if quota_bytes <= 0:
            self.over_quota.set(0)
            return 0
        excess = quota_excess(await self._query("storage_by_device", quota_bytes), quota_bytes)
        self.over_quota.set(len(excess))
        rows = 0
        for device_id, to_free in excess.items():
            if self._quota_log.allow(device_id, self._clock()):
                log.warning(
                    "device %s is over its storage quota (%d bytes); pruning its oldest data",
                    device_id,
                    quota_bytes,
                )
            rows += await self._free(device_id, to_free)
        return rows

    async def _free(self, device_id: str, to_free: int) -> int:
        """Prune the device's oldest rows, in QUOTA_ORDER, until `to_free` bytes went."""
        rows = 0
        for kind in QUOTA_ORDER:
            for _ in range(MAX_PAGES):
                if to_free <= 0:
                    return rows
                deleted, freed = await self._query(
                    "prune_device", device_id, kind, self.config.prune_batch
                )
                if not deleted:
                    break
                to_free -= freed
                rows += deleted
                self.pruned.labels(kind=kind.name.lower(), why="quota").inc(deleted)
        return rows
