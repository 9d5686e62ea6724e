"""What only the PostgreSQL store has: the server going away and coming back, a
least-privilege role, replicas migrating at once, and its ingest rate against SQLite's."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from dgdm.sync.coordinator.migrations import MIGRATIONS
from dgdm.sync.coordinator.store import Incoming, SqliteStore, Store
from dgdm.sync.coordinator.stores import StoreUnavailable
from dgdm.sync.envelope import Kind
from dgdm.sync.errors import ConfigError

pg_store = pytest.importorskip("dgdm.sync.coordinator.pg_store")
PgStore = pg_store.PgStore

KEY = "A" * 43 + "="
NOW = 1_700_000_000_000


def result(seq: int, device: str = "edge-1") -> Incoming:
    return Incoming(device, Kind.RESULT, seq, NOW, {"z": [[0.25, 0.5]], "seq": seq})


def test_postgres_going_away_raises_store_unavailable_and_ingest_resumes(fresh_pg: Any) -> None:
    db = fresh_pg.create_database()
    store = PgStore(fresh_pg.url(db), fresh_pg.password, timeout_s=2.0)
    try:
        store.add_device("edge-1", KEY)
        assert store.store_batch([result(1)], NOW).stored == 1
        fresh_pg.stop(immediate=True)  # like a crash: no shutdown checkpoint
        for call in (lambda: store.store_batch([result(2)], NOW), store.ping):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable) as info:
                call()
            print(f"StoreUnavailable after {time.monotonic() - started:.2f} s: {info.value}")
            assert time.monotonic() - started < 10  # an error, not a hang
            assert fresh_pg.password not in str(info.value)
        fresh_pg.start()  # same port and data; the pool reconnects by itself
        started = time.monotonic()
        deadline = started + 20
        while True:
            try:
                again = store.store_batch([result(2)], NOW)
                break
            except StoreUnavailable:
                assert time.monotonic() < deadline, "the store did not come back"
                time.sleep(0.2)
        print(f"ingest resumed {time.monotonic() - started:.2f} s after the restart")
        store.ping()
        # The failed call committed nothing: seq 2 is new now, not a duplicate.
        assert (again.stored, again.duplicates) == (1, 0)
        assert store.count() == 2
    finally:
        store.close()


def test_a_least_privilege_role_runs_the_store_after_the_owner_migrated(pg_cluster: Any) -> None:
    """The grants README/Ansible give the coordinator's role: DML on its tables, nothing
    else (no CREATE, no ownership). The owner (or a first start as owner) migrates."""
    tag = f"{os.getpid()}_{time.monotonic_ns() % 10**6}"
    owner, app = f"owner_{tag}", f"app_{tag}"
    pg_cluster.sql(f"CREATE ROLE {owner} LOGIN PASSWORD 'owner-pw'")
    pg_cluster.sql(f"CREATE ROLE {app} LOGIN PASSWORD 'app-pw'")
    db = pg_cluster.create_database("lp")
    pg_cluster.sql(f'ALTER DATABASE "{db}" OWNER TO {owner}')
    pg_cluster.sql(f"ALTER SCHEMA public OWNER TO {owner}", database=db)
    pg_cluster.sql(f'GRANT CONNECT ON DATABASE "{db}" TO {app}')
    pg_cluster.sql(
        f"REVOKE CREATE ON SCHEMA public FROM PUBLIC; GRANT USAGE ON SCHEMA public TO {app}",
        database=db,
    )

    # Before the owner migrated, the app role cannot create the tables: a clear start-up error.
    with pytest.raises(ConfigError) as info:
        PgStore(pg_cluster.url(db, user=app), "app-pw")
    assert info.value.key == "store.url"
    assert "may not create tables" in info.value.message

    PgStore(pg_cluster.url(db, user=owner), "owner-pw").close()
    # Hardened clusters revoke TEMPORARY from PUBLIC; ingest stages batches in a temp table.
    pg_cluster.sql(f'REVOKE TEMPORARY ON DATABASE "{db}" FROM PUBLIC')
    grants = (
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {app};"
        f" GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {app}"
    )
    pg_cluster.sql(grants, database=db)
    with pytest.raises(ConfigError) as info:
        PgStore(pg_cluster.url(db, user=app), "app-pw")
    assert (info.value.key, "GRANT TEMPORARY" in info.value.message) == ("store.url", True)
    pg_cluster.sql(f'GRANT TEMPORARY ON DATABASE "{db}" TO {app}')
    store = PgStore(pg_cluster.url(db, user=app), "app-pw")
    try:
        store.add_device("edge-1", KEY)
        seq = store.new_command("edge-1", {"cmd": "ping"}, NOW)
        reply = Incoming("edge-1", Kind.REPLY, 1, NOW, {"cmd_seq": seq})
        assert store.store_batch([result(1), reply], NOW).stored == 2
        assert store.command("edge-1", seq)["status"] == "replied"
        assert store.remove_device("edge-1")
    finally:
        store.close()


def test_replicas_starting_at_once_migrate_once(pg_cluster: Any, pg_database: str) -> None:
    stores: list[Any] = []
    failures: list[BaseException] = []
    go = threading.Barrier(4)

    def start() -> None:
        go.wait()
        try:
            stores.append(PgStore(pg_cluster.url(pg_database), pg_cluster.password))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert failures == []
        with stores[0]._tx() as conn:
            versions = [r[0] for r in conn.execute("SELECT version FROM schema_version")]
        assert versions == [m.version for m in MIGRATIONS]
    finally:
        for s in stores:
            s.close()


def test_public_keys_stays_cheap_for_a_large_fleet(pg_cluster: Any, pg_database: str) -> None:
    """Each replica's Registry polls public_keys() every 5 s (SPEC §7.1: a change holds on
    all replicas within 5 s); for 5,000 devices that must cost milliseconds."""
    store = PgStore(pg_cluster.url(pg_database), pg_cluster.password)
    try:
        with store._tx() as conn:
            conn.execute(
                "INSERT INTO devices (device_id, public_key, added_ms)"
                " SELECT 'edge-' || n, %s, 0 FROM generate_series(1, 5000) AS n",
                (KEY,),
            )
        timings = []
        for _ in range(5):
            started = time.perf_counter()
            keys = store.public_keys()
            timings.append(time.perf_counter() - started)
        assert len(keys) == 5000
        print(f"public_keys() for 5,000 devices: median {sorted(timings)[2] * 1000:.1f} ms")
        assert sorted(timings)[2] < 0.5
    finally:
        store.close()


def _batches(rows: int, batch: int, devices: int) -> list[list[Incoming]]:
    body = {"job_id": "j", "backend": "numpy", "latency_ms": 1.5, "embedding": [[0.125] * 8] * 4}
    return [
        [Incoming(f"edge-{n % devices}", Kind.RESULT, n, NOW, body) for n in range(s, s + batch)]
        for s in range(0, rows, batch)
    ]


@pytest.mark.bench
def test_postgres_ingest_rate_against_sqlite(
    tmp_path: Path, pg_cluster: Any, pg_database: str
) -> None:
    """pytest -m bench tests/sync/test_pg_store.py -s: the same 50,000 results in batches of
    500 from 100 devices into each store, fsync on in both (SQLite synchronous=FULL). The
    stores take turns batch by batch, so a neighbour's load on the shared cores falls on
    both alike."""
    rows, batch, devices = 50_000, 500, 100
    stores: dict[str, Store] = {
        "sqlite": SqliteStore(tmp_path / "bench.db"),
        "postgres": PgStore(pg_cluster.url(pg_database), pg_cluster.password),
    }
    spent = dict.fromkeys(stores, 0.0)
    try:
        for store in stores.values():
            for d in range(devices):
                store.add_device(f"edge-{d}", KEY)
        for items in _batches(rows, batch, devices):
            for name, store in stores.items():
                started = time.perf_counter()
                assert store.store_batch(items, NOW).stored == batch
                spent[name] += time.perf_counter() - started
    finally:
        for store in stores.values():
            store.close()
    sqlite_rate, pg_rate = rows / spent["sqlite"], rows / spent["postgres"]
    ratio = pg_rate / sqlite_rate
    print(
        f"\ningest {rows} rows in batches of {batch}: SQLite {sqlite_rate:,.0f}/s,"
        f" PostgreSQL {pg_rate:,.0f}/s, ratio {ratio:.2f}"
    )
    assert ratio >= 0.70


async def test_two_coordinators_share_one_postgres_store(
    sync_rig: Any, mqtt_broker: Any, pg_cluster: Any, pg_database: str
) -> None:
    """The real service on PgStore: two replicas in one share group over a real mosquitto.
    Every result is stored once and receipted; a command posted on A is answered from the
    store whichever replica ingested its reply."""
    import asyncio
    import dataclasses

    from dgdm.sync.coordinator.service import Coordinator

    from .conftest import eventually

    async def pong(seq: int, body: dict[str, Any]) -> dict[str, Any]:
        return {"pong": True}

    rig = sync_rig(mqtt_broker)
    device = rig.device("d", on_command=pong)
    base = rig.config()
    replicas = []
    for name in ("a", "b"):
        mqtt = dataclasses.replace(base.mqtt, client_id=f"{base.mqtt.client_id}-{name}")
        store = PgStore(pg_cluster.url(pg_database), pg_cluster.password)
        replicas.append(Coordinator(dataclasses.replace(base, mqtt=mqtt), store=store))
    a, b = replicas
    try:
        for replica in replicas:
            await replica.start(http=False)
            await replica.wait_connected(10)
        await a.add_device(device.device_id, device.public_b64)  # b learns it from the store
        await device.start()
        seqs = [device.enqueue(Kind.RESULT, {"n": n}) for n in range(40)]
        await eventually(lambda: device.queued() == 0, what="outbox drained by receipts")
        assert a.store.count() == 40  # type: ignore[attr-defined]
        rows = a.store.results_since(device.device_id, 0, 100)
        assert sorted(r["seq"] for r in rows) == seqs
        seq = await a.send_command(device.device_id, "ping", {}, 60_000)
        for _ in range(500):
            got = await a.command(device.device_id, seq)
            if got is not None and got["status"] == "replied":
                break
            await asyncio.sleep(0.02)
        assert got is not None
        assert got["reply"]["data"] == {"pong": True}
        # The other replica answers the same from the store.
        assert await b.command(device.device_id, seq) == got
        # A device removed through one replica is refused by both within 5 s (SPEC §7.1).
        assert await asyncio.to_thread(a.store.remove_device, device.device_id)
        for replica in replicas:
            assert replica.registry is not None
            await eventually(
                lambda r=replica: not r.registry.enrolled(device.device_id),
                timeout=10,
                what="the removal reaches every replica",
            )
    finally:
        await device.link.stop()
        for replica in replicas:
            await replica.stop()


def test_a_cursor_never_skips_a_row_another_replica_commits_late(
    pg_cluster: Any, pg_database: str
) -> None:
    """Replica A's batch for a device is held mid-transaction (a trigger waits on an
    advisory lock the test holds) when replica B stores the same device's next result.
    B must wait for A's commit: had B committed its higher id first, a `results_since`
    reader would have passed it and never seen A's lower id."""
    import psycopg

    pg_cluster.sql(
        "CREATE FUNCTION hold_seq_1() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        " IF NEW.seq = 1 THEN PERFORM pg_advisory_xact_lock(4242); END IF; RETURN NEW; END $$",
        database=pg_database,
    )
    a, b = (PgStore(pg_cluster.url(pg_database), pg_cluster.password) for _ in range(2))
    gate = psycopg.connect(pg_cluster.url(pg_database), password=pg_cluster.password)
    try:
        a.add_device("edge-1", KEY)
        pg_cluster.sql(
            "CREATE TRIGGER hold BEFORE INSERT ON messages FOR EACH ROW"
            " EXECUTE FUNCTION hold_seq_1()",
            database=pg_database,
        )
        gate.execute("SELECT pg_advisory_lock(4242)")
        done = {name: threading.Event() for name in "ab"}

        def ingest(store: Any, seq: int, name: str) -> None:
            store.store_batch([result(seq)], NOW)
            done[name].set()

        workers = [
            threading.Thread(target=ingest, args=(a, 1, "a")),
            threading.Thread(target=ingest, args=(b, 2, "b")),
        ]
        workers[0].start()
        time.sleep(0.3)  # A is now inside its transaction, held by the trigger
        workers[1].start()
        assert not done["b"].wait(0.7), "B committed while A's batch for the device was open"
        assert not done["a"].is_set()
        gate.execute("SELECT pg_advisory_unlock(4242)")
        assert done["a"].wait(10)
        assert done["b"].wait(10)
        for w in workers:
            w.join()
        rows = a.results_since("edge-1", 0, 10)
        assert [r["seq"] for r in rows] == [1, 2]  # id order = commit order
    finally:
        gate.close()
        a.close()
        b.close()
