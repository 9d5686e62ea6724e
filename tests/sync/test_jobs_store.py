"""Jobs in both stores (a real SQLite file, a real PostgreSQL database), driven tick by
tick with explicit clocks: target resolution, claims only for online devices, the pace,
replies, timeouts, TTL expiry, a lost claim published again with its seq, the failure
gate, cancel, and two replicas ticking at once claiming each device once."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dgdm.sync.coordinator.config import CoordinatorConfig, CoordinatorSection, StoreSection
from dgdm.sync.coordinator.jobs import BadJob, parse_job
from dgdm.sync.coordinator.store import Incoming, Store
from dgdm.sync.coordinator.stores import open_store
from dgdm.sync.envelope import Kind

KEY = "A" * 43 + "="
T0 = 1_700_000_000_000
LEASE = 10_000


@pytest.fixture
def config(rig_store: StoreSection, tmp_path: Path) -> CoordinatorConfig:
    return CoordinatorConfig(
        coordinator=CoordinatorSection(data_dir=tmp_path / "data"), store=rig_store
    )


@pytest.fixture
def store(config: CoordinatorConfig) -> Iterator[Store]:
    opened = open_store(config)
    yield opened
    opened.close()


def _fleet(store: Store, n: int, *, online: int, tags: dict[str, str] | None = None) -> list[str]:
    ids = [f"edge-{i:02d}" for i in range(n)]
    for i, device in enumerate(ids):
        store.add_device(device, KEY, tags=tags or {"site": "berlin"})
        if i < online:
            store.set_status(device, {"state": "online"}, T0)
    return ids


def _job(store: Store, now: int = T0, **kw: Any) -> dict[str, Any]:
    body = {"target": "all", "command": {"cmd": "ping"}, "rate_per_s": 1000, **kw}
    return store.create_job(parse_job(body), now)


def _reply(store: Store, device: str, seq: int, ok: bool, now: int) -> None:
    body = {"cmd_seq": seq, "ok": ok, "error": None if ok else "refused", "data": None}
    store.store_batch([Incoming(device, Kind.REPLY, seq + 1000, now, body)], now)


def _states(store: Store, job_id: int) -> dict[str, str]:
    return {t["device_id"]: t["state"] for t in store.job_targets(job_id, "", 1000)}


def test_targets_are_resolved_at_creation(store: Store) -> None:
    _fleet(store, 3, online=0)
    store.add_device("edge-x", KEY, tags={"site": "paris", "hw": "usb"})
    store.add_device("edge-y", KEY, tags={"site": "berlin", "hw": "usb"})
    store.remove_device("edge-02")
    assert _job(store)["total"] == 4  # every enrolled device
    job = _job(store, target={"tags": {"site": "berlin", "hw": "usb"}})
    assert list(_states(store, job["id"])) == ["edge-y"]
    assert job["counts"]["queued"] == 1
    assert _job(store, target={"ids": ["edge-00", "edge-x"]})["total"] == 2
    with pytest.raises(BadJob) as caught:
        _job(store, target={"ids": ["edge-00", "edge-02"]})
    assert caught.value.field == "target.ids"
    with pytest.raises(BadJob) as caught:
        _job(store, target={"tags": {"site": "tokyo"}})
    assert caught.value.field == "target"
    assert [j["total"] for j in store.jobs(10)] == [2, 1, 4]  # newest first


def test_a_job_runs_to_completion(store: Store) -> None:
    ids = _fleet(store, 4, online=3)
    job = _job(store, rate_per_s=2, timeout_s=5, max_failure_ratio=1.0)
    tick = store.job_tick(T0, "a", LEASE, 100)
    assert [s.device_id for s in tick.sends] == ["edge-00", "edge-01"]  # 2/s, offline skipped
    assert all(s.body == {"cmd": "ping", "args": {}, "ttl_ms": 3_600_000} for s in tick.sends)
    # The seq comes from the device's own counter: it follows a command sent by hand.
    own = store.new_command("edge-02", {"cmd": "ping", "args": {}, "ttl_ms": 1}, T0)
    assert store.job_tick(T0 + 100, "a", LEASE, 100).sends == []  # paced
    store.job_published("a", tick.sends, T0 + 1)
    later = store.job_tick(T0 + 1000, "a", LEASE, 100)
    assert [s.device_id for s in later.sends] == ["edge-02"]
    assert later.sends[0].seq == own + 1
    assert later.sends[0].body["ttl_ms"] == 3_600_000 - 1000  # what is left of the TTL
    store.job_published("a", later.sends, T0 + 1001)
    assert store.command("edge-00", tick.sends[0].seq)["command"]["cmd"] == "ping"
    _reply(store, "edge-00", tick.sends[0].seq, True, T0 + 2000)
    _reply(store, "edge-01", tick.sends[1].seq, False, T0 + 2000)
    store.job_tick(T0 + 2000, "a", LEASE, 100)
    assert _states(store, job["id"]) == {
        "edge-00": "succeeded",
        "edge-01": "failed",
        "edge-02": "sent",
        "edge-03": "queued",
    }
    assert store.job_targets(job["id"], "", 10)[1]["error"] == "refused"
    store.job_tick(T0 + 7000, "a", LEASE, 100)  # edge-02 sent at +1001, timeout 5 s
    assert _states(store, job["id"])["edge-02"] == "timed_out"
    assert store.job(job["id"])["state"] == "running"  # edge-03 is offline, TTL left
    store.set_status(ids[3], {"state": "online"}, T0 + 8000)
    back = store.job_tick(T0 + 8000, "a", LEASE, 100)
    assert [s.device_id for s in back.sends] == ["edge-03"]
    store.job_published("a", back.sends, T0 + 8000)
    _reply(store, "edge-03", back.sends[0].seq, True, T0 + 9000)
    done = store.job_tick(T0 + 9000, "a", LEASE, 100)
    finished = store.job(job["id"])
    assert finished["state"] == "completed"
    assert finished["counts"] == {
        "queued": 0,
        "sent": 0,
        "succeeded": 2,
        "failed": 1,
        "timed_out": 1,
        "cancelled": 0,
    }
    assert done.active_jobs == 0


def test_ttl_expiry_times_out_queued_devices(store: Store) -> None:
    _fleet(store, 3, online=1)
    job = _job(store, ttl_ms=5000, max_failure_ratio=1.0)
    sends = store.job_tick(T0, "a", LEASE, 100).sends
    store.job_published("a", sends, T0)
    _reply(store, "edge-00", sends[0].seq, True, T0 + 100)
    store.set_status("edge-01", {"state": "online"}, T0 + 6000)  # back, but too late
    assert store.job_tick(T0 + 6000, "a", LEASE, 100).sends == []
    assert _states(store, job["id"]) == {
        "edge-00": "succeeded",
        "edge-01": "timed_out",
        "edge-02": "timed_out",
    }
    assert store.job(job["id"])["state"] == "completed"


def test_a_lost_claim_is_published_again_with_its_seq(store: Store) -> None:
    _fleet(store, 2, online=2)
    job = _job(store)
    first = store.job_tick(T0, "dead", LEASE, 100).sends  # never published
    assert store.job_tick(T0 + LEASE - 1, "b", LEASE, 100).sends == []  # lease still held
    again = store.job_tick(T0 + LEASE + 1, "b", LEASE, 100).sends
    assert [(s.device_id, s.seq, s.created_ms, s.body) for s in again] == [
        (s.device_id, s.seq, s.created_ms, s.body) for s in first
    ]
    assert len(store.commands("edge-00", 10)) == 1  # one stored command, one seq
    store.job_published("dead", first, T0 + LEASE + 2)  # the dead owner's late word: ignored
    assert all(t["sent_ms"] is None for t in store.job_targets(job["id"], "", 10))
    store.job_published("b", again, T0 + LEASE + 2)
    assert all(t["sent_ms"] == T0 + LEASE + 2 for t in store.job_targets(job["id"], "", 10))


def test_the_failure_gate_aborts_and_cancels_the_rest(store: Store) -> None:
    _fleet(store, 20, online=20)
    job = _job(store, rate_per_s=5, max_failure_ratio=0.2)
    sends = store.job_tick(T0, "a", LEASE, 100).sends
    assert len(sends) == 5
    store.job_published("a", sends, T0)
    for i, send in enumerate(sends):
        _reply(store, send.device_id, send.seq, i < 3, T0 + 10)  # 2 of 5 fail: 40 %
    tick = store.job_tick(T0 + 20, "a", LEASE, 100)
    assert tick.aborted == [job["id"]]
    assert tick.sends == []
    aborted = store.job(job["id"])
    assert aborted["state"] == "aborted"
    assert "failure gate" in aborted["reason"]
    assert aborted["counts"]["cancelled"] == 15
    assert store.job_tick(T0 + 5000, "a", LEASE, 100).aborted == []  # counted once


def test_cancel(store: Store) -> None:
    _fleet(store, 3, online=3)
    job = _job(store, rate_per_s=1)
    sends = store.job_tick(T0, "a", LEASE, 100).sends
    store.job_published("a", sends, T0)
    cancelled = store.cancel_job(job["id"], T0 + 10)
    assert cancelled["state"] == "cancelled"
    assert cancelled["counts"]["cancelled"] == 2
    assert cancelled["counts"]["sent"] == 1  # on its way: its outcome is still recorded
    _reply(store, sends[0].device_id, sends[0].seq, True, T0 + 20)
    store.job_tick(T0 + 5000, "a", LEASE, 100)
    assert _states(store, job["id"])[sends[0].device_id] == "succeeded"
    assert store.cancel_job(job["id"], T0 + 30)["state"] == "cancelled"  # idempotent
    assert store.cancel_job(999, T0) is None
    assert store.job(999) is None


def test_replicas_ticking_at_once_claim_each_device_once(
    config: CoordinatorConfig, store: Store
) -> None:
    ids = _fleet(store, 60, online=60)
    for _ in range(2):  # no replies come here: neither timeouts nor the gate may stop them
        _job(store, rate_per_s=1000, timeout_s=86_400, max_failure_ratio=1.0)
    replicas = [open_store(config) for _ in range(3)]
    claimed: list[Any] = []
    lock = threading.Lock()
    clock = [T0]  # one clock for all replicas, as in life: 1 s per tick of any of them

    def run(replica: Store, name: str) -> None:
        for _ in range(500):  # until every device is claimed (a locked job is skipped)
            with lock:
                clock[0] += 1000
                now = clock[0]
            # a lease far beyond this fake clock's pace: no claim expires between a
            # replica's tick and its publish here (that case is the lost-claim test's)
            sends = replica.job_tick(now, name, 3_600_000, 7).sends
            replica.job_published(name, sends, now)
            with lock:
                claimed.extend(sends)
                if len({(s.job_id, s.device_id) for s in claimed}) >= 120:
                    return

    try:
        threads = [threading.Thread(target=run, args=(r, f"r{i}")) for i, r in enumerate(replicas)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        for replica in replicas:
            replica.close()
    pairs = [(s.job_id, s.device_id) for s in claimed]
    assert len(pairs) == len(set(pairs)) == 120  # every device of both jobs, once
    seqs = [(s.device_id, s.seq) for s in claimed]
    assert len(set(seqs)) == 120  # no seq given twice
    assert {s.device_id for s in claimed} == set(ids)
