"""The `Store` contract, run against both stores: a real SQLite file and a real PostgreSQL
database (a private cluster, tests/pg.py). Every method, duplicates, replies, down-seq
uniqueness under concurrent replicas, and the shared migrations."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dgdm.sync.coordinator.config import CoordinatorConfig, CoordinatorSection, StoreSection
from dgdm.sync.coordinator.migrations import (
    MIGRATIONS,
    SchemaTooNew,
    migrate_postgres,
    migrate_sqlite,
)
from dgdm.sync.coordinator.store import (
    QUARANTINE_PER_DEVICE,
    Incoming,
    Quarantined,
    SqliteStore,
    Store,
)
from dgdm.sync.coordinator.stores import open_store
from dgdm.sync.envelope import Kind

KEY_A = "A" * 43 + "="
KEY_B = "B" * 43 + "="
NOW = 1_700_000_000_000

Opener = Callable[[], Store]


@pytest.fixture(params=["sqlite", "postgres"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Opens (another) store on one database: each call is a new connection, as a second
    replica would have. Every store opened is closed at the end."""
    if request.param == "sqlite":
        config = _config(tmp_path, None, None)
    else:
        cluster = request.getfixturevalue("pg_cluster")
        database = request.getfixturevalue("pg_database")
        config = _config(tmp_path, cluster.url(database), cluster.password)
    opened: list[Store] = []

    def open_one() -> Store:
        opened.append(open_store(config))
        return opened[-1]

    yield open_one
    for store in opened:
        store.close()


@pytest.fixture
def store(opener: Opener) -> Store:
    return opener()


def _config(tmp_path: Path, url: str | None, password: str | None) -> CoordinatorConfig:
    return CoordinatorConfig(
        coordinator=CoordinatorSection(data_dir=tmp_path / "coord"),
        store=StoreSection(url=url, password=password),
    )


def msg(device: str, kind: Kind, seq: int, **body: Any) -> Incoming:
    return Incoming(device, kind, seq, NOW - 1000 + seq, body or {"n": seq})


# -- registry ------------------------------------------------------------------------------


def test_a_device_quota_is_stored_replaced_and_cleared(store: Store) -> None:
    store.add_device("edge-1", KEY_A)
    store.add_device("edge-2", KEY_B)
    assert store.quotas() == {}
    assert store.set_quota("edge-1", {"telemetry_per_s": 50.0})
    assert store.set_quota("edge-1", {"result_per_s": 9.5, "bytes_per_s": 1e6})
    assert not store.set_quota("nobody", {"result_per_s": 1.0})
    (text,) = store.quotas().values()
    assert json.loads(text) == {"result_per_s": 9.5, "bytes_per_s": 1e6}
    assert store.set_quota("edge-1", None)
    assert store.quotas() == {}


def test_enrol_rotate_remove_and_reenrol(store: Store) -> None:
    assert store.device("edge-1") is None
    store.add_device("edge-1", KEY_A)
    store.add_device("edge-2", KEY_B)
    assert store.public_keys() == {"edge-1": KEY_A, "edge-2": KEY_B}
    row = store.device("edge-1")
    assert row is not None
    assert row["public_key"] == KEY_A
    assert row["online"] == 0
    assert row["down_seq"] == 0
    assert [d["device_id"] for d in store.devices()] == ["edge-1", "edge-2"]

    store.add_device("edge-1", KEY_B)  # a rotated key replaces the old one
    assert store.public_keys()["edge-1"] == KEY_B

    assert store.new_command("edge-1", {"cmd": "ping"}, NOW) == 1
    assert store.remove_device("edge-1") is True
    assert store.remove_device("edge-1") is False  # already withdrawn
    assert store.remove_device("never-enrolled") is False
    assert store.public_keys() == {"edge-2": KEY_B}
    assert store.device("edge-1") is not None  # its history stays

    store.add_device("edge-1", KEY_A)  # enrolled again: the command seqs continue
    assert store.new_command("edge-1", {"cmd": "ping"}, NOW) == 2


def test_status_updates_the_device_and_ignores_bad_values(store: Store) -> None:
    store.add_device("edge-1", KEY_A)
    store.set_status(
        "edge-1", {"state": "online", "ts_ms": 123, "agent_version": "1.2", "backend": "numpy"}, NOW
    )
    row = store.device("edge-1")
    assert row is not None
    assert (row["online"], row["status_ms"], row["agent_version"], row["backend"]) == (
        1,
        123,
        "1.2",
        "numpy",
    )
    assert (row["first_seen_ms"], row["last_seen_ms"]) == (NOW, NOW)
    # A hostile status: wrong types are dropped, long strings cut, and it is still offline.
    store.set_status(
        "edge-1",
        {"state": "offline", "ts_ms": True, "agent_version": "x" * 999, "backend": 7},
        NOW + 5,
    )
    row = store.device("edge-1")
    assert row is not None
    assert (row["online"], row["status_ms"], len(row["agent_version"]), row["backend"]) == (
        0,
        None,
        200,
        None,
    )
    assert (row["first_seen_ms"], row["last_seen_ms"]) == (NOW, NOW + 5)
    store.set_status("unknown", {"state": "online"}, NOW)  # nothing to update, no error
    assert store.device("unknown") is None


# -- ingest --------------------------------------------------------------------------------


def test_batches_are_idempotent_and_every_batch_gets_a_receipt_seq(store: Store) -> None:
    store.add_device("edge-1", KEY_A)
    store.add_device("edge-2", KEY_B)
    batch = [
        msg("edge-1", Kind.RESULT, 1),
        msg("edge-1", Kind.TELEMETRY, 1),  # same seq, other kind: a different message
        msg("edge-1", Kind.ALERT, 1),
        msg("edge-2", Kind.RESULT, 1),
        msg("edge-1", Kind.RESULT, 1),  # a duplicate inside the batch
    ]
    first = store.store_batch(batch, NOW)
    assert (first.stored, first.duplicates) == (4, 1)
    assert first.receipt_seqs == {"edge-1": 1, "edge-2": 1}

    again = store.store_batch(batch[:2], NOW + 1)  # a resend after a lost receipt
    assert (again.stored, again.duplicates) == (0, 2)
    assert again.receipt_seqs == {"edge-1": 2}  # still receipted, with a fresh down seq
    assert store.count() == 4  # type: ignore[attr-defined]
    row = store.device("edge-1")
    assert row is not None
    assert (row["first_seen_ms"], row["last_seen_ms"], row["down_seq"]) == (NOW, NOW + 1, 2)

    empty = store.store_batch([], NOW)
    assert (empty.stored, empty.duplicates, empty.receipt_seqs) == (0, 0, {})


def test_large_seqs_and_bodies_round_trip(store: Store) -> None:
    store.add_device("edge-1", KEY_A)
    body = {
        "z": [[0.5, -1e-30]],
        "s": "caf\u00e9 \u0000 \ud800",
        "big": 2**70,
        "nested": {"a": None},
    }
    seq = 2**63 - 1
    result = store.store_batch([Incoming("edge-1", Kind.RESULT, seq, NOW, body)], NOW)
    assert result.stored == 1
    [row] = store.latest("edge-1", Kind.RESULT, 10)
    assert row["seq"] == seq
    assert row["body"] == body


def test_queries_page_by_cursor_and_name_kinds(store: Store) -> None:
    store.add_device("edge-1", KEY_A)
    store.add_device("edge-2", KEY_B)
    store.store_batch([msg("edge-1", Kind.RESULT, s) for s in range(1, 6)], NOW)
    store.store_batch([msg("edge-1", Kind.TELEMETRY, 1), msg("edge-2", Kind.RESULT, 1)], NOW)

    page = store.results_since("edge-1", 0, 3)
    assert [r["seq"] for r in page] == [1, 2, 3]
    assert page[0]["kind"] == "result"
    assert page[0]["body"] == {"n": 1}
    assert (page[0]["created_ms"], page[0]["received_ms"]) == (NOW - 999, NOW)
    rest = store.results_since("edge-1", page[-1]["cursor"], 100)
    assert [r["seq"] for r in rest] == [4, 5]
    assert store.results_since("edge-1", rest[-1]["cursor"], 100) == []
    assert store.results_since("nobody", 0, 10) == []

    latest = store.latest("edge-1", Kind.RESULT, 2)
    assert [r["seq"] for r in latest] == [5, 4]
    [telemetry] = store.latest("edge-1", Kind.TELEMETRY, 10)
    assert telemetry["kind"] == "telemetry"


def test_replies_complete_their_command_once(store: Store) -> None:
    store.add_device("edge-1", KEY_A)
    seq = store.new_command("edge-1", {"cmd": "diffuse", "args": {"k": 3}}, NOW)
    assert seq == 1
    pending = store.command("edge-1", seq)
    assert pending == {
        "seq": 1,
        "command": {"cmd": "diffuse", "args": {"k": 3}},
        "created_ms": NOW,
        "status": "pending",
        "reply": None,
        "replied_ms": None,
    }
    reply = Incoming("edge-1", Kind.REPLY, 1, NOW, {"cmd_seq": seq, "ok": True})
    result = store.store_batch([reply, msg("edge-1", Kind.RESULT, 1)], NOW + 10)
    assert (result.stored, result.duplicates) == (2, 0)
    # The reply's receipt seq comes after the command's: one counter per device.
    assert result.receipt_seqs == {"edge-1": 2}
    done = store.command("edge-1", seq)
    assert done is not None
    assert (done["status"], done["reply"], done["replied_ms"]) == (
        "replied",
        {"cmd_seq": 1, "ok": True},
        NOW + 10,
    )
    # A second copy of the reply (another body!) is a duplicate and changes nothing.
    copy = Incoming("edge-1", Kind.REPLY, 1, NOW, {"cmd_seq": seq, "ok": False})
    assert store.store_batch([copy], NOW + 20).duplicates == 1
    assert store.command("edge-1", seq)["reply"] == {"cmd_seq": 1, "ok": True}  # type: ignore[index]
    # A reply naming no command, or naming it as text, is stored and updates nothing.
    odd = [
        Incoming("edge-1", Kind.REPLY, 2, NOW, {"cmd_seq": 99}),
        Incoming("edge-1", Kind.REPLY, 3, NOW, {"cmd_seq": "1"}),
    ]
    assert store.store_batch(odd, NOW).stored == 2
    assert store.command("edge-1", 99) is None
    assert store.command("edge-2", 1) is None


def test_a_row_that_cannot_be_stored_is_quarantined_alone(store: Store) -> None:
    store.add_device("edge-1", KEY_A)
    store.add_device("edge-2", KEY_B)
    given = Quarantined("edge-2", Kind.TELEMETRY, 9, "bad_tag", "sealed but refused: ...")
    batch = [
        Incoming("edge-1", Kind.REPLY, 1, NOW, {"cmd_seq": 2**80}),
        Incoming("edge-1", Kind.RESULT, 2, NOW, {"x": float("nan")}),
        Incoming("edge-1", Kind.RESULT, 2**64, NOW, {}),
        msg("edge-1", Kind.RESULT, 1),
    ]
    result = store.store_batch(batch, NOW, [given])
    assert (result.stored, result.duplicates) == (1, 0)
    assert result.receipt_seqs == {"edge-1": 1, "edge-2": 1}  # both get their receipt
    assert [(q.device_id, q.seq, q.reason) for q in result.quarantined] == [
        ("edge-2", 9, "bad_tag"),
        ("edge-1", 1, "malformed"),
        ("edge-1", 2, "bad_body"),
        ("edge-1", 2**64, "malformed"),
    ]
    rows = store.quarantined("edge-1")
    assert [(r["kind"], r["seq"], r["reason"]) for r in rows] == [
        ("reply", "1", "malformed"),
        ("result", "2", "bad_body"),
        ("result", str(2**64), "malformed"),
    ]
    assert all(r["received_ms"] == NOW for r in rows)
    assert store.quarantined("edge-2", limit=5)[0]["sample"] == "sealed but refused: ..."
    assert [r["seq"] for r in store.latest("edge-1", Kind.RESULT, 10)] == [1]


def test_quarantine_is_capped_per_device(store: Store) -> None:
    store.add_device("edge-1", KEY_A)
    flood = [
        Quarantined("edge-1", Kind.ALERT, n, "bad_tag", "x")
        for n in range(QUARANTINE_PER_DEVICE + 50)
    ]
    store.store_batch([], NOW, flood)
    assert len(store.quarantined("edge-1", limit=10**6)) == QUARANTINE_PER_DEVICE


def test_the_plaintext_telemetry_flag_follows_the_latest_enrolment(store: Store) -> None:
    store.add_device("edge-1", KEY_A, plaintext_telemetry=True)
    assert store.plaintext_telemetry("edge-1") is True
    assert store.device("edge-1")["plaintext_telemetry"] == 1  # type: ignore[index]
    store.add_device("edge-1", KEY_B)  # re-enrolled without the flag: off
    assert store.plaintext_telemetry("edge-1") is False
    store.add_device("edge-1", KEY_B, plaintext_telemetry=True)
    store.remove_device("edge-1")
    assert store.plaintext_telemetry("edge-1") is False  # a removed device has no rights
    assert store.plaintext_telemetry("never") is False


# -- replicas --------------------------------------------------------------------------------


def test_two_replicas_never_hand_out_the_same_down_seq(opener: Opener) -> None:
    """Two stores (separate connections, as two coordinator replicas) and two threads each,
    all allocating command and receipt seqs for the same devices at once."""
    replicas = [opener(), opener()]
    replicas[0].add_device("edge-1", KEY_A)
    replicas[0].add_device("edge-2", KEY_B)
    rounds = 25
    seqs: dict[str, list[int]] = {"edge-1": [], "edge-2": []}
    guard = threading.Lock()
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def work(store: Store, worker: int) -> None:
        try:
            start.wait()
            for n in range(rounds):
                got = [("edge-1", store.new_command("edge-1", {"cmd": "ping"}, NOW))]
                batch = [
                    msg("edge-1", Kind.RESULT, worker * 1000 + n),
                    msg("edge-2", Kind.RESULT, worker * 1000 + n),
                ]
                got += store.store_batch(batch, NOW).receipt_seqs.items()
                with guard:
                    for device, seq in got:
                        seqs[device].append(seq)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(replicas[w % 2], w)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(seqs["edge-1"]) == list(range(1, 4 * rounds * 2 + 1))
    assert sorted(seqs["edge-2"]) == list(range(1, 4 * rounds + 1))
    assert replicas[1].count() == 4 * rounds * 2  # type: ignore[attr-defined]


def _claim_round(store: Store, now_ms: int) -> list[dict[str, Any]]:
    """One resend round's claim as the coordinator makes it (10 s after creation or after the
    last resend), ten at a time, of edge-1's commands only (`keep`: edge-2 is offline)."""
    return store.claim_resends(
        NOW - 1, now_ms - 10_000, 10, now_ms, lambda row: row["device_id"] == "edge-1"
    )


def test_two_replicas_claim_each_unreplied_command_once_a_round(opener: Opener) -> None:
    """Two stores (two replicas) claiming one round's resends at once, from threads: each
    unreplied command is handed to one of them; a replied one, or one `keep` refuses, to
    neither; a claimed one again only once the next round is due."""
    a, b = opener(), opener()
    a.add_device("edge-1", KEY_A)
    a.add_device("edge-2", KEY_B)
    seqs = [a.new_command("edge-1", {"cmd": "ping", "n": n}, NOW + n) for n in range(40)]
    a.new_command("edge-2", {"cmd": "ping"}, NOW)
    replied = a.new_command("edge-1", {"cmd": "ping"}, NOW)
    reply = Incoming("edge-1", Kind.REPLY, 1, NOW, {"cmd_seq": replied, "ok": True})
    a.store_batch([reply], NOW + 1)
    first = NOW + 10_100

    def both_claim(now_ms: int) -> list[list[int]]:
        claimed: list[list[int]] = [[], []]
        errors: list[BaseException] = []
        start = threading.Barrier(2)

        def work(store: Store, into: list[int]) -> None:
            try:
                start.wait()
                while rows := _claim_round(store, now_ms):
                    into.extend(row["seq"] for row in rows)
            except BaseException as exc:  # reported below, in the test's thread
                errors.append(exc)

        pairs = zip((a, b), claimed, strict=True)
        threads = [threading.Thread(target=work, args=pair) for pair in pairs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        return claimed

    for round_ms in (first, first + 10_000):
        claimed = both_claim(round_ms)
        assert sorted(claimed[0] + claimed[1]) == seqs  # each once, none twice
        assert both_claim(round_ms + 9_999) == [[], []]  # the same round, a later replica
    [row] = a.claim_resends(NOW - 1, first, 10, first, lambda row: row["device_id"] == "edge-2")
    assert (row["device_id"], row["body"], row["created_ms"]) == ("edge-2", {"cmd": "ping"}, NOW)


def test_a_registry_change_on_one_replica_is_seen_by_the_other(opener: Opener) -> None:
    a, b = opener(), opener()
    a.add_device("edge-1", KEY_A)
    assert b.public_keys() == {"edge-1": KEY_A}
    b.add_device("edge-1", KEY_B)
    assert a.public_keys() == {"edge-1": KEY_B}
    assert a.remove_device("edge-1")
    assert b.public_keys() == {}
    assert not b.remove_device("edge-1")


def test_a_batch_stored_by_one_replica_is_a_duplicate_for_the_other(opener: Opener) -> None:
    a, b = opener(), opener()
    a.add_device("edge-1", KEY_A)
    batch = [msg("edge-1", Kind.RESULT, s) for s in range(1, 4)]
    assert a.store_batch(batch, NOW).stored == 3
    other = b.store_batch(batch, NOW)
    assert (other.stored, other.duplicates, other.receipt_seqs) == (0, 3, {"edge-1": 2})


# -- migrations ------------------------------------------------------------------------------


def _versions(store: Store) -> list[int]:
    if isinstance(store, SqliteStore):
        with sqlite3.connect(store.path) as db:
            return [r[0] for r in db.execute("SELECT version FROM schema_version ORDER BY 1")]
    with store._tx() as conn:  # type: ignore[attr-defined]
        return [r[0] for r in conn.execute("SELECT version FROM schema_version ORDER BY 1")]


def _add_version(store: Store, version: int) -> None:
    sql = "INSERT INTO schema_version (version, description, applied_ms) VALUES (%s, 'x', 0)"
    if isinstance(store, SqliteStore):
        with sqlite3.connect(store.path) as db:
            db.execute(sql.replace("%s", "?"), (version,))
        return
    with store._tx() as conn:  # type: ignore[attr-defined]
        conn.execute(sql, (version,))


def test_a_new_store_is_migrated_once_and_reopens_with_its_data(opener: Opener) -> None:
    first = opener()
    assert _versions(first) == [m.version for m in MIGRATIONS]
    first.add_device("edge-1", KEY_A)
    first.close()
    again = opener()
    assert _versions(again) == [m.version for m in MIGRATIONS]
    assert again.public_keys() == {"edge-1": KEY_A}


def test_a_newer_schema_is_refused_with_a_clear_message(opener: Opener) -> None:
    store = opener()
    newer = MIGRATIONS[-1].version + 7
    _add_version(store, newer)
    with pytest.raises(SchemaTooNew) as info:
        opener()
    assert info.value.key == "store.url"
    assert f"version {newer}, newer than the {MIGRATIONS[-1].version}" in str(info.value)
    assert "upgrade dgdm-edge" in str(info.value)


@pytest.mark.parametrize("flavour", ["sqlite", "postgres"])
def test_a_store_of_an_older_version_is_migrated_in_order(
    flavour: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A store left at version 1 (before the quarantine and the plaintext flag) with an
    enrolled device: opening it applies the later migrations and keeps the device."""
    v1 = MIGRATIONS[:1]
    if flavour == "sqlite":
        path = tmp_path / "coord" / "coordinator.db"
        path.parent.mkdir()
        with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
            migrate_sqlite(db, v1)
            db.execute(
                "INSERT INTO devices (device_id, public_key, added_ms) VALUES ('edge-1', ?, 0)",
                (KEY_A,),
            )
        config = _config(tmp_path, None, None)
    else:
        cluster = request.getfixturevalue("pg_cluster")
        database = request.getfixturevalue("pg_database")
        import psycopg

        with psycopg.connect(cluster.url(database), password=cluster.password) as conn:
            migrate_postgres(conn, v1)
            conn.execute(
                "INSERT INTO devices (device_id, public_key, added_ms) VALUES ('edge-1', %s, 0)",
                (KEY_A,),
            )
        config = _config(tmp_path, cluster.url(database), cluster.password)
    store = open_store(config)
    try:
        assert _versions(store) == [m.version for m in MIGRATIONS]
        assert store.public_keys() == {"edge-1": KEY_A}
        assert store.plaintext_telemetry("edge-1") is False
        store.store_batch([], NOW, [Quarantined("edge-1", Kind.RESULT, 1, "bad_tag", "x")])
        assert len(store.quarantined("edge-1")) == 1
    finally:
        store.close()


# -- housekeeping (retention, downsampling, quota) -------------------------------------------


def _bytes(*bodies: dict[str, Any]) -> int:
    return sum(len(json.dumps(b, separators=(",", ":"))) for b in bodies)


def test_stored_bytes_count_what_was_stored_and_pruning_gives_them_back(store: Store) -> None:
    s: Any = store
    s.add_device("edge-1", KEY_A)
    s.add_device("edge-2", KEY_B)
    old = [msg("edge-1", Kind.TELEMETRY, n) for n in range(1, 4)]
    s.store_batch(old, NOW - 10_000)
    new = [msg("edge-1", Kind.TELEMETRY, 4), msg("edge-1", Kind.RESULT, 1)]
    s.store_batch([*new, old[0]], NOW)  # old[0] again: a duplicate adds nothing
    reply = Incoming("edge-2", Kind.REPLY, 1, NOW, {"cmd_seq": 5})
    s.store_batch([reply], NOW)  # a reply's row has the body '{}'
    expected = _bytes(*(m.body for m in old + new))
    assert s.storage_by_device(0) == {"edge-1": expected, "edge-2": 2}
    assert s.storage_by_device(expected) == {}

    # Retention: only telemetry received before the cut, oldest first, a page at a time.
    assert s.prune(Kind.TELEMETRY, NOW - 1, 2) == 2
    assert s.prune(Kind.TELEMETRY, NOW - 1, 2) == 1
    assert s.prune(Kind.TELEMETRY, NOW - 1, 2) == 0
    assert [r["seq"] for r in s.latest("edge-1", Kind.TELEMETRY, 10)] == [4]
    assert s.storage_by_device(0)["edge-1"] == _bytes(*(m.body for m in new))

    # Quota: the device's oldest rows of a kind, with the bytes they freed.
    assert s.prune_device("edge-1", Kind.TELEMETRY, 10) == (1, _bytes(new[0].body))
    assert s.prune_device("edge-1", Kind.TELEMETRY, 10) == (0, 0)
    assert s.storage_by_device(0)["edge-1"] == _bytes(new[1].body)
    assert s.size_bytes() > 0


def test_commands_and_quarantine_are_pruned_by_age(store: Store) -> None:
    s: Any = store
    s.add_device("edge-1", KEY_A)
    s.new_command("edge-1", {"cmd": "ping"}, NOW - 10_000)
    s.new_command("edge-1", {"cmd": "ping"}, NOW)
    assert s.prune(Kind.COMMAND, NOW - 1, 10) == 1
    assert s.command("edge-1", 1) is None
    assert s.command("edge-1", 2) is not None
    s.store_batch([], NOW - 10_000, [Quarantined("edge-1", Kind.RESULT, 1, "bad_tag", "x")])
    s.store_batch([], NOW, [Quarantined("edge-1", Kind.RESULT, 2, "bad_tag", "y")])
    assert s.prune_quarantine(NOW - 1, 10) == 1
    assert [r["seq"] for r in s.quarantined("edge-1")] == ["2"]


def test_the_downsampler_pages_telemetry_and_deletes_what_it_picks(store: Store) -> None:
    s: Any = store
    s.add_device("edge-1", KEY_A)
    for n in range(1, 6):
        s.store_batch([msg("edge-1", Kind.TELEMETRY, n)], NOW + n)
    s.store_batch([msg("edge-1", Kind.RESULT, 1)], NOW)
    first = s.telemetry_page((0, 0), NOW + 5, 2)
    assert [r[0] for r in first] == [NOW + 1, NOW + 2]
    assert all(r[2] == "edge-1" for r in first)
    rest = s.telemetry_page(first[-1][:2], NOW + 5, 10)
    assert [r[0] for r in rest] == [NOW + 3, NOW + 4]  # received before NOW + 5 only
    assert s.delete_messages([first[1][1], rest[0][1]]) == 2
    assert [r["seq"] for r in s.latest("edge-1", Kind.TELEMETRY, 10)] == [5, 4, 1]
    assert s.storage_by_device(0)["edge-1"] == _bytes(*({"n": n} for n in (1, 4, 5)), {"n": 1})
