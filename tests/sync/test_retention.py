"""Store housekeeping (issue 19 item 4): retention per kind, telemetry downsampling, the
per-device quota and the store's size in /metrics. Pure decisions, then the real
`Housekeeping` on a real Coordinator's database thread and a real SQLite file."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from pathlib import Path
from typing import Any

import pytest

from dgdm.sync.coordinator.config import StoreSection
from dgdm.sync.coordinator.housekeeping import (
    DAY_MS,
    Housekeeping,
    downsample_victims,
    plan,
    quota_excess,
)
from dgdm.sync.coordinator.metrics import Metrics
from dgdm.sync.coordinator.store import Incoming, SqliteStore
from dgdm.sync.envelope import Kind

NOW_MS = 1_800_000_000_000
MINUTE = 60_000


def test_plan_takes_per_kind_retention_or_the_default() -> None:
    store = StoreSection(retention_days=30, telemetry_retention_days=3, downsample_after_days=0)
    todo = plan(store, NOW_MS)
    assert todo.prune_before[Kind.TELEMETRY] == NOW_MS - 3 * DAY_MS
    assert todo.prune_before[Kind.RESULT] == NOW_MS - 30 * DAY_MS
    assert todo.prune_before[Kind.COMMAND] == NOW_MS - 30 * DAY_MS
    assert todo.downsample_before is None
    assert plan(StoreSection(), NOW_MS).downsample_before == NOW_MS - 7 * DAY_MS


def test_downsampling_keeps_the_first_row_per_device_per_bucket_across_pages() -> None:
    kept: dict[str, int] = {}
    page1 = [(0, 1, "a"), (1000, 2, "a"), (5000, 3, "b"), (14 * MINUTE, 4, "a")]
    page2 = [(15 * MINUTE, 5, "a"), (15 * MINUTE + 1, 6, "a"), (16 * MINUTE, 7, "b")]
    assert downsample_victims(page1, 15 * MINUTE, kept) == [2, 4]
    assert downsample_victims(page2, 15 * MINUTE, kept) == [6]
    # Run again over what is left (a restart): nothing more goes.
    left = [(0, 1, "a"), (5000, 3, "b"), (15 * MINUTE, 5, "a"), (16 * MINUTE, 7, "b")]
    assert downsample_victims(left, 15 * MINUTE, {}) == []


def test_quota_excess_brings_a_device_to_the_low_water_mark() -> None:
    assert quota_excess({"a": 1500, "b": 900, "c": 1000}, 1000) == {"a": 600}
    assert quota_excess({"a": 10**12}, 0) == {}


def _telemetry(device: str, seq: int) -> Incoming:
    return Incoming(device, Kind.TELEMETRY, seq, 1, {"samples": [{"ts_ms": seq, "pad": "x" * 90}]})


@pytest.fixture
def store(tmp_path: Path) -> Any:
    made = SqliteStore(tmp_path / "data" / "coordinator.db")
    for device in ("a", "b"):
        made.add_device(device, "key")
    yield made
    made.close()


def test_stored_bytes_follow_inserts_duplicates_and_deletes(store) -> None:
    def real(device: str) -> int:
        sql = "SELECT coalesce(sum(length(body)), 0) FROM messages WHERE device_id = ?"
        return int(store._db.execute(sql, (device,)).fetchone()[0])

    store.store_batch([_telemetry("a", s) for s in range(1, 11)], NOW_MS)
    store.store_batch([_telemetry("a", s) for s in range(5, 15)], NOW_MS)  # 5 duplicates
    assert store.storage_by_device(0) == {"a": real("a")}
    assert store.prune_device("a", Kind.TELEMETRY, 4)[0] == 4
    assert store.prune(Kind.TELEMETRY, NOW_MS + 1, 3) == 3
    assert store.storage_by_device(0) == {"a": real("a")}
    assert real("a") > 0
    assert store.size_bytes() > 0


def test_prune_takes_only_the_old_rows_of_its_kind_oldest_first(store) -> None:
    old, new = NOW_MS - 40 * DAY_MS, NOW_MS
    store.store_batch([_telemetry("a", s) for s in range(1, 6)], old)
    store.store_batch([Incoming("a", Kind.RESULT, 10, 1, {"job_id": "r"})], old)
    store.store_batch([_telemetry("a", s) for s in range(6, 9)], new)
    assert store.prune(Kind.TELEMETRY, NOW_MS - 30 * DAY_MS, 2) == 2
    assert store.prune(Kind.TELEMETRY, NOW_MS - 30 * DAY_MS, 100) == 3
    assert store.prune(Kind.TELEMETRY, NOW_MS - 30 * DAY_MS, 100) == 0
    assert sorted(r["seq"] for r in store.latest("a", Kind.TELEMETRY, 100)) == [6, 7, 8]
    assert [r["seq"] for r in store.results_since("a", 0, 10)] == [10]


def _keeper(store: SqliteStore, **kw: Any) -> tuple[Housekeeping, Metrics]:
    """Housekeeping on its own database thread, as the coordinator's writer thread runs it."""
    clock = kw.pop("clock", time.time)
    metrics = Metrics()
    executor = concurrent.futures.ThreadPoolExecutor(1)

    async def run(name: str, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(
            executor, getattr(store, name), *args
        )

    keeper = Housekeeping(StoreSection(prune_batch=7, **kw), metrics.registry, run, clock)
    return keeper, metrics


async def test_a_pass_prunes_downsamples_enforces_the_quota_and_reports_the_size(
    tmp_path: Path, store
) -> None:
    keeper, metrics = _keeper(
        store, retention_days=30, downsample_after_days=7, downsample_minutes=15,
        device_quota_bytes=20_000, clock=lambda: NOW_MS / 1000,
    )  # fmt: skip
    seq = iter(range(1, 10_000))
    # a: 40 days old (pruned), 10 days old one a minute for an hour (downsampled to 4)...
    store.store_batch([_telemetry("a", next(seq)) for _ in range(20)], NOW_MS - 40 * DAY_MS)
    for minute in range(60):
        t = NOW_MS - 10 * DAY_MS + minute * MINUTE
        store.store_batch([_telemetry("a", next(seq))], t)
    # ... and b: recent, 300 messages of ~130 bytes (40 KB) against a 20 KB quota.
    store.store_batch([_telemetry("b", next(seq)) for _ in range(300)], NOW_MS - 1000)
    store.store_batch([Incoming("b", Kind.RESULT, 9999, 1, {"job_id": "keep"})], NOW_MS)
    done = await keeper.run_once()
    assert done["retention"] == 20
    assert len(store.latest("a", Kind.TELEMETRY, 1000)) == 4  # one per 15 minutes
    assert done["downsample"] == 56
    b_bytes = store.storage_by_device(0)["b"]
    assert 0 < b_bytes <= 20_000 * 0.9
    assert [r["seq"] for r in store.results_since("b", 0, 10)] == [9999]  # telemetry first
    remaining = [r["seq"] for r in store.latest("b", Kind.TELEMETRY, 1000)]
    assert min(remaining) > 81  # the oldest went
    rendered = metrics.render().decode()
    assert "dgdm_coordinator_store_bytes " in rendered
    assert 'dgdm_coordinator_pruned_total{kind="telemetry",why="quota"}' in rendered
    assert "dgdm_coordinator_devices_over_quota 1.0" in rendered
    again = await keeper.run_once()
    assert again == {"retention": 0, "downsample": 0, "quota": 0}
    assert "dgdm_coordinator_devices_over_quota 0.0" in metrics.render().decode()


async def test_housekeeping_runs_in_the_background_and_stops(tmp_path: Path, store) -> None:
    keeper, _ = _keeper(store, housekeeping_interval_s=1.0)
    store.store_batch([_telemetry("a", 1)], time.time_ns() // 1_000_000 - 400 * DAY_MS)
    keeper.start()
    try:
        for _ in range(100):
            if not store.latest("a", Kind.TELEMETRY, 1):
                break
            await asyncio.sleep(0.05)
        assert store.latest("a", Kind.TELEMETRY, 1) == []
    finally:
        await keeper.stop()
