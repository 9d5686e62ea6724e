"""The coordinator's database is the owner's only, whatever the umask (issue 16 item 10), and
plaintext telemetry is a per-device enrolment choice (item 3): real CLI processes, real
SQLite files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from dgdm.sync.coordinator.store import SqliteStore
from dgdm.sync.crypto import generate_keypair

from .test_sync_cli import _config, _dgdm


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_database_wal_and_shm_are_0600_and_the_data_dir_0700_under_umask_022(tmp_path) -> None:
    old = os.umask(0o022)
    try:
        data = tmp_path / "data"
        store = SqliteStore(data / "coordinator.db")
        store.add_device("d", "key")
        store.set_status("d", {"state": "online"}, 1)  # the WAL and SHM exist once written
        try:
            db = data / "coordinator.db"
            assert (data / "coordinator.db-wal").exists()
            assert _mode(data) == 0o700
            assert {p.name: _mode(p) for p in data.iterdir()} == {
                "coordinator.db": 0o600,
                "coordinator.db-wal": 0o600,
                "coordinator.db-shm": 0o600,
            }
        finally:
            store.close()
        # A file an older release left world-readable is tightened on the next open.
        os.chmod(db, 0o644)
        SqliteStore(db).close()
        assert _mode(db) == 0o600
    finally:
        os.umask(old)


def test_an_old_database_gains_the_plaintext_column_off(tmp_path) -> None:
    import sqlite3

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:  # the devices table as the previous release made it
        db.execute(
            "CREATE TABLE devices (device_id TEXT PRIMARY KEY, public_key TEXT NOT NULL,"
            " first_seen_ms INTEGER, last_seen_ms INTEGER, online INTEGER NOT NULL DEFAULT 0,"
            " status_ms INTEGER, agent_version TEXT, backend TEXT,"
            " down_seq INTEGER NOT NULL DEFAULT 0, added_ms INTEGER NOT NULL)"
        )
        db.execute("INSERT INTO devices (device_id, public_key, added_ms) VALUES ('d', 'k', 1)")
    db.close()
    store = SqliteStore(path)
    try:
        assert store.plaintext_telemetry("d") is False
        assert store.device("d")["plaintext_telemetry"] == 0
        store.store_batch([], 1)  # the quarantine table is there too
        assert store.quarantined("d") == []
    finally:
        store.close()
    SqliteStore(path).close()  # and opening again is a no-op


async def test_devices_add_plaintext_telemetry_flag(tmp_path, mqtt_broker) -> None:
    config, _ = _config(tmp_path, mqtt_broker.url)
    _, _, public = generate_keypair(tmp_path / "dev", name="device")
    add = (
        "coordinator",
        "devices",
        "add",
        "cam-1",
        "--public-key",
        public,
        "--config",
        str(config),
    )
    old = os.umask(0o022)
    try:
        code, out, err = await _dgdm(*add, "--plaintext-telemetry")
    finally:
        os.umask(old)
    assert code == 0, err
    assert "plaintext telemetry accepted" in out
    db = tmp_path / "data" / "coordinator.db"
    assert _mode(db) == 0o600
    assert _mode(db.parent) == 0o700
    store = SqliteStore(db)
    try:
        assert store.plaintext_telemetry("cam-1") is True
    finally:
        store.close()
    # Re-enrolling (a key rotation) without the flag turns plaintext off again.
    code, out, err = await _dgdm(*add)
    assert code == 0, err
    store = SqliteStore(db)
    try:
        assert store.plaintext_telemetry("cam-1") is False
        assert store.plaintext_telemetry("nobody") is False
    finally:
        store.close()
