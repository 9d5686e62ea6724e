"""`dgdm coordinator backup|restore` with real parts: a coordinator on a private mosquitto
ingesting from a real device link while `dgdm coordinator backup` (a separate process)
copies its live SQLite store; the restore into a fresh data dir holds everything receipted
before the backup began, opens, ingests on, and hands out seqs above any used before.
Refusals: a store locked by a running coordinator, truncated / corrupt / foreign files, a
database that fails `PRAGMA integrity_check`, a schema newer than this code, PostgreSQL.
A PostgreSQL store: `pg_dump` of a live store restored by `pg_restore` into a fresh
cluster, on which a coordinator carries on."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import sqlite3
import subprocess
import sys
import tarfile
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dgdm.sync import backup
from dgdm.sync.broker import free_port
from dgdm.sync.coordinator.config import StoreSection
from dgdm.sync.coordinator.store import SqliteStore
from dgdm.sync.crypto import generate_keypair
from dgdm.sync.envelope import Kind

from .conftest import eventually


def dgdm(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dgdm.agent", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        check=False,
    )


async def dgdm_async(*argv: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dgdm.agent", *argv,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def coordinator_toml(path: Path, data_dir: Path, **store: str) -> Path:
    lines = ["[coordinator]", f"data_dir = {json.dumps(str(data_dir))}"]
    if store:
        lines += ["[store]", *(f"{k} = {json.dumps(v)}" for k, v in store.items())]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def stored_seqs(db: Path, device_id: str) -> set[int]:
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute("SELECT seq FROM messages WHERE device_id = ?", (device_id,))
        return {int(r[0]) for r in rows}
    finally:
        conn.close()


async def produce(device: Any, sent: list[int], stop: asyncio.Event) -> None:
    i = 0
    while not stop.is_set():
        sent.append(await asyncio.to_thread(device.enqueue, Kind.RESULT, {"i": i}))
        i += 1
        await asyncio.sleep(0.002)


@contextlib.asynccontextmanager
async def flowing(device: Any, sent: list[int]) -> AsyncIterator[None]:
    """Messages enqueued on `device` (seqs into `sent`) until the block ends, however."""
    stop = asyncio.Event()
    producer = asyncio.create_task(produce(device, sent, stop))
    try:
        yield
    finally:
        stop.set()
        await producer


def receipted(device: Any, sent: list[int]) -> set[int]:
    """Seqs the coordinator has receipted: sent, and gone from the device's outbox."""
    pending = {m.seq for m in device.outbox.pending(1_000_000)}
    return set(sent) - pending


async def test_backup_while_ingesting_then_restore_carries_on(
    tmp_path: Path, mqtt_broker: Any, sync_rig: Any
) -> None:
    rig = sync_rig(mqtt_broker)
    executed: list[int] = []
    device = rig.device("d1", on_command=recorder(executed))
    coordinator = await rig.start_coordinator()
    await device.start()
    live_db = rig.root / "coord-data" / "coordinator.db"
    live_cfg = coordinator_toml(tmp_path / "live.toml", rig.root / "coord-data")
    sent: list[int] = []
    out = tmp_path / "backups" / "coord.dgdm"
    async with flowing(device, sent):
        await eventually(lambda: len(receipted(device, sent)) >= 200, 30, "200 receipted")
        before = receipted(device, sent)  # all committed before the backup began
        code, stdout, stderr = await dgdm_async("coordinator", "backup", "--out", str(out),
                                                "--config", str(live_cfg))  # fmt: skip
        await eventually(lambda: len(sent) > max(before) + 100, 30, "more after the backup")
    executed_after_backup = await coordinator.send_command(device.device_id, "ping")
    await eventually(lambda: executed_after_backup in executed, 30, "the command executed")
    assert code == 0, stderr
    assert "coordinator.db" in stdout
    assert out.stat().st_mode & 0o777 == 0o600
    assert len(stored_seqs(live_db, device.device_id)) > len(before)  # it kept ingesting

    # Restore into a fresh data dir, and run a coordinator on it.
    await rig.stop_coordinator()
    fresh = tmp_path / "fresh"
    fresh_cfg = coordinator_toml(tmp_path / "fresh.toml", fresh)
    done = await asyncio.to_thread(dgdm, "coordinator", "restore", str(out), "--config",
                                   str(fresh_cfg))  # fmt: skip
    assert done.returncode == 0, done.stderr
    restored_db = fresh / "coordinator.db"
    assert (restored_db.stat().st_mode & 0o777, fresh.stat().st_mode & 0o777) == (0o600, 0o700)
    assert before <= stored_seqs(restored_db, device.device_id), "a receipted message is missing"
    with sqlite3.connect(restored_db) as conn:
        down_seq = conn.execute("SELECT down_seq FROM devices").fetchone()[0]
    assert down_seq >= (time.time_ns() // 1_000_000 - 600_000) * 1000  # seqs jumped ahead

    rig.config = _with_data_dir(rig.config, fresh)
    coordinator = await rig.start_coordinator()
    later = [device.enqueue(Kind.RESULT, {"after": i}) for i in range(20)]
    assert min(later) > max(sent)
    await eventually(lambda: device.queued() == 0, 60, "the device's outbox drained")
    assert set(later) <= stored_seqs(restored_db, device.device_id)
    # Its command seqs continue above the one executed after the backup: not a replay.
    seq = await coordinator.send_command(device.device_id, "ping")
    await eventually(lambda: seq in executed, 30, "a command after the restore executed")
    assert seq > executed_after_backup


def recorder(executed: list[int]) -> Any:
    async def on_command(seq: int, body: dict[str, Any]) -> dict[str, Any]:
        executed.append(seq)
        return {"pong": True}

    return on_command


def _with_data_dir(config: Any, data_dir: Path) -> Any:
    import dataclasses

    def patched(**coord: Any) -> Any:
        cfg = config(**coord)
        return dataclasses.replace(
            cfg, coordinator=dataclasses.replace(cfg.coordinator, data_dir=data_dir)
        )

    return patched


# -- refusals -------------------------------------------------------------------------


@pytest.fixture
def coord_backup(tmp_path: Path) -> Path:
    """A small coordinator store with one device and a message, backed up."""
    data = tmp_path / "src"
    store = SqliteStore(data / "coordinator.db")
    store.add_device("d1", "A" * 43 + "=")
    store.close()
    out = tmp_path / "b.dgdm"
    done = dgdm("coordinator", "backup", "--out", str(out), "--config",
                str(coordinator_toml(tmp_path / "src.toml", data)))  # fmt: skip
    assert done.returncode == 0, done.stderr
    return out


def restore(tmp_path: Path, file: Path, name: str = "dest") -> subprocess.CompletedProcess[str]:
    cfg = coordinator_toml(tmp_path / f"{name}.toml", tmp_path / name)
    return dgdm("coordinator", "restore", str(file), "--config", str(cfg))


def test_restore_refused_while_a_coordinator_runs(
    tmp_path: Path, coord_backup: Path, mqtt_broker: Any
) -> None:
    dest = tmp_path / "dest"
    store = SqliteStore(dest / "coordinator.db")
    store.add_device("other", "B" * 43 + "=")
    key, _, _ = generate_keypair(tmp_path / "keys", name="coordinator")
    port = free_port()
    cfg = tmp_path / "dest.toml"
    cfg.write_text(
        f"[coordinator]\ndata_dir = {json.dumps(str(dest))}\nprivate_key = {json.dumps(str(key))}\n"
        f"[mqtt]\nbroker_url = {json.dumps(mqtt_broker.url)}\n"
        f'mqtt_version = {json.dumps(mqtt_broker.mqtt_version)}\nclient_id = "c-{port}"\n'
        f'share_group = "g-{port}"\nsession_expiry_s = 0\n'  # no share left behind
        f"[http]\nport = {port}\n"
    )
    service = subprocess.Popen(
        [sys.executable, "-m", "dgdm.agent", "coordinator", "--config", str(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_healthy(port, service)
        done = dgdm("coordinator", "restore", str(coord_backup), "--config", str(cfg))
    finally:
        service.terminate()
        service.communicate(timeout=30)
    assert done.returncode == 1
    assert "refusing to restore: a running coordinator holds" in done.stderr
    assert [d["device_id"] for d in store.devices()] == ["other"]  # untouched
    store.close()
    done = restore(tmp_path, coord_backup)  # stopped: now it goes through (same data_dir)
    assert done.returncode == 0, done.stderr
    assert "pre-restore-" in done.stdout
    store = SqliteStore(dest / "coordinator.db")
    assert [d["device_id"] for d in store.devices()] == ["d1"]
    store.close()
    aside = next(dest.glob("pre-restore-*"))
    assert (aside / "coordinator.db").exists()  # the replaced data, kept


def _wait_healthy(port: int, service: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert service.poll() is None, service.stderr.read() if service.stderr else ""
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
                return
        time.sleep(0.1)
    raise AssertionError("the coordinator did not become healthy")


def test_truncated_corrupt_and_foreign_files_are_refused(
    tmp_path: Path, coord_backup: Path
) -> None:
    data = coord_backup.read_bytes()
    cases = {
        "truncated": data[: len(data) // 2],
        "flipped": data[:200] + bytes([data[200] ^ 0xFF]) + data[201:],
        "empty": b"",
        "foreign": b"SQLite format 3\x00" + b"\x00" * 100,
    }
    for name, content in cases.items():
        bad = tmp_path / f"{name}.dgdm"
        bad.write_bytes(content)
        done = restore(tmp_path, bad)
        assert done.returncode == 1, (name, done.stderr)
        assert "not a readable dgdm backup" in done.stderr or "corrupt" in done.stderr, name
        assert "Traceback" not in done.stderr
        assert not (tmp_path / "dest" / "coordinator.db").exists(), name
    missing = restore(tmp_path, tmp_path / "nope.dgdm")
    assert missing.returncode == 2
    assert "nope.dgdm is not a file" in missing.stderr


def test_any_truncation_or_flipped_byte_is_refused_or_harmless(
    tmp_path: Path, coord_backup: Path
) -> None:
    """Whatever is cut off or changed, `read` either raises BackupError (a sentence, exit 1)
    or yields exactly the database that was backed up (a change in tar padding is harmless)."""
    data = coord_backup.read_bytes()
    digest = json.loads(_manifest_bytes(coord_backup))["files"][0]["sha256"]
    counter = iter(range(10**6))

    @settings(max_examples=80, deadline=None)
    @given(cut=st.integers(0, len(data)), flip=st.none() | st.integers(0, len(data) - 1))
    def check(cut: int, flip: int | None) -> None:
        damaged = bytearray(data[:cut])
        if flip is not None and flip < cut:
            damaged[flip] ^= 0xFF
        case = tmp_path / f"case{next(counter)}"
        case.mkdir()
        (case / "b.dgdm").write_bytes(bytes(damaged))
        try:
            backup.read(case / "b.dgdm", "coordinator", case)
        except backup.BackupError:
            return
        assert backup._digest(case / "coordinator.db")["sha256"] == digest

    check()


def _manifest_bytes(path: Path) -> bytes:
    with tarfile.open(path, "r:gz") as tar:
        handle = tar.extractfile(backup.MANIFEST)
        assert handle is not None
        return handle.read()


def rebuilt(source: Path, out: Path, change: Any) -> Path:
    """The backup with its database changed by `change(path)` and the hash updated."""
    work = out.with_suffix(".d")
    work.mkdir()
    manifest = backup.read(source, "coordinator", work)
    db = work / "coordinator.db"
    change(db)
    manifest["files"][0].update(backup._digest(db))
    with tarfile.open(out, "w:gz") as tar:
        raw = json.dumps(manifest).encode()
        info = tarfile.TarInfo(backup.MANIFEST)
        info.size = len(raw)
        tar.addfile(info, io.BytesIO(raw))
        tar.add(db, arcname="coordinator.db")
    return out


@pytest.mark.parametrize("name", ["../escape", "/etc/escape", "a/b/c", "topologies/../x"])
def test_unsafe_member_names_are_refused(tmp_path: Path, name: str) -> None:
    bad = tmp_path / "bad.dgdm"
    manifest = {
        "format": backup.FORMAT,
        "format_version": backup.FORMAT_VERSION,
        "kind": "coordinator",
        "created_ms": 0,
        "parts": ["coordinator.db"],
        "files": [{"name": name, "bytes": 1, "sha256": "0" * 64}],
    }
    with tarfile.open(bad, "w:gz") as tar:
        for member, data in ((backup.MANIFEST, json.dumps(manifest).encode()), (name, b"x")):
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    done = restore(tmp_path, bad)
    assert done.returncode == 1
    assert f"the backup names an unsafe path {name!r}" in done.stderr
    assert not (tmp_path / "escape").exists()


def test_integrity_check_and_newer_schema_are_refused(tmp_path: Path, coord_backup: Path) -> None:
    def corrupt(db: Path) -> None:
        """Change key bytes inside one index leaf page: the file still opens and reads, and
        only `PRAGMA integrity_check` finds the index disagreeing with its table."""
        with sqlite3.connect(db) as conn:
            conn.execute("CREATE TABLE filler (x INTEGER)")
            conn.executemany("INSERT INTO filler VALUES (?)", [(i * 1000,) for i in range(50)])
            conn.execute("CREATE INDEX filler_x ON filler (x)")
            page = conn.execute("PRAGMA page_size").fetchone()[0]
            root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'filler_x'")
            start = (root.fetchone()[0] - 1) * page
        raw = bytearray(db.read_bytes())
        for offset in range(start + page - 200, start + page, 5):
            raw[offset] ^= 0x01
        db.write_bytes(bytes(raw))

    def newer(db: Path) -> None:
        with sqlite3.connect(db) as conn:
            conn.execute("INSERT INTO schema_version VALUES (999, 'from the future', 0)")

    bad = rebuilt(coord_backup, tmp_path / "corrupt.dgdm", corrupt)
    done = restore(tmp_path, bad)
    assert done.returncode == 1
    assert "the coordinator database fails its integrity check" in done.stderr, done.stderr
    bad = rebuilt(coord_backup, tmp_path / "newer.dgdm", newer)
    done = restore(tmp_path, bad)
    assert done.returncode == 1
    assert "schema version 999, newer than the" in done.stderr
    assert not (tmp_path / "dest" / "coordinator.db").exists()


def test_an_agent_backup_is_not_a_coordinator_backup(tmp_path: Path, coord_backup: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[device]\nid = "d1"\ndata_dir = {json.dumps(str(tmp_path / "a"))}\n')
    done = dgdm("agent", "restore", str(coord_backup), "--config", str(cfg))
    assert done.returncode == 1
    assert "is a backup of a coordinator, not of a agent" in done.stderr


def test_postgres_store_says_use_pg_dump(tmp_path: Path) -> None:
    cfg = coordinator_toml(
        tmp_path / "pg.toml", tmp_path, url="postgresql://dgdm@127.0.0.1:1/dgdm", password="x"
    )
    done = dgdm("coordinator", "backup", "--out", str(tmp_path / "x"), "--config", str(cfg))
    assert done.returncode == 2
    assert "pg_dump" in done.stderr
    assert not (tmp_path / "x").exists()


# -- PostgreSQL: pg_dump of a live store, pg_restore into a fresh cluster -----------------


async def test_pg_dump_of_a_live_store_restores_and_the_coordinator_carries_on(
    tmp_path: Path,
    pg_cluster: Any,
    fresh_pg: Any,
    mqtt_broker: Any,
    sync_rig: Any,  # after the clusters: its coordinator stops before they do
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DGDM_TEST_PG_PASSWORD", pg_cluster.password)
    db = pg_cluster.create_database()
    rig = sync_rig(mqtt_broker, StoreSection(url=pg_cluster.url(db),
                                             password="env:DGDM_TEST_PG_PASSWORD"))  # fmt: skip
    executed: list[int] = []
    device = rig.device("d1", on_command=recorder(executed))
    coordinator = await rig.start_coordinator()
    await device.start()
    sent: list[int] = []
    dump = tmp_path / "store.pgdump"
    async with flowing(device, sent):
        await eventually(lambda: len(receipted(device, sent)) >= 200, 30, "200 receipted")
        before = receipted(device, sent)
        env = {**os.environ, "PGPASSWORD": pg_cluster.password}
        proc = await asyncio.create_subprocess_exec(
            str(pg_cluster.bin_dir / "pg_dump"), "--format=custom", "--file", str(dump),
            "--dbname", pg_cluster.url(db), env=env, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        await eventually(lambda: len(sent) > max(before) + 100, 30, "messages during the dump")
    cmd_after_dump = await coordinator.send_command(device.device_id, "ping")
    await eventually(lambda: cmd_after_dump in executed, 30, "the command executed")
    await rig.stop_coordinator()

    fresh_db = fresh_pg.create_database()
    env = {**os.environ, "PGPASSWORD": fresh_pg.password}
    done = await asyncio.to_thread(
        subprocess.run,
        [str(fresh_pg.bin_dir / "pg_restore"), "--no-owner", "--exit-on-error",
         "--dbname", fresh_pg.url(fresh_db), str(dump)],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    await asyncio.to_thread(_pg_execute, fresh_pg, fresh_db, README_SEQ_BUMP)
    monkeypatch.setenv("DGDM_TEST_PG_PASSWORD", fresh_pg.password)
    rig.store = StoreSection(url=fresh_pg.url(fresh_db), password="env:DGDM_TEST_PG_PASSWORD")
    coordinator = await rig.start_coordinator()
    stored = await asyncio.to_thread(_pg_seqs, fresh_pg, fresh_db, device.device_id)
    assert before <= stored, "a receipted message is missing after pg_restore"
    later = [device.enqueue(Kind.RESULT, {"after": i}) for i in range(20)]
    await eventually(lambda: device.queued() == 0, 60, "the device's outbox drained")
    stored = await asyncio.to_thread(_pg_seqs, fresh_pg, fresh_db, device.device_id)
    assert set(later) <= stored
    cmd = await coordinator.send_command(device.device_id, "ping")
    await eventually(lambda: cmd in executed, 30, "a command after the restore executed")
    assert cmd > cmd_after_dump


# The statement README "Backup and restore" tells an operator to run after pg_restore.
README_SEQ_BUMP = (
    "UPDATE devices SET down_seq = greatest(down_seq,"
    " (extract(epoch FROM clock_timestamp()) * 1000)::bigint * 1000)"
)


def _pg_execute(cluster: Any, db: str, sql: str) -> None:
    import psycopg

    with psycopg.connect(cluster.url(db), password=cluster.password) as conn:
        conn.execute(sql)


def _pg_seqs(cluster: Any, db: str, device_id: str) -> set[int]:
    import psycopg

    with psycopg.connect(cluster.url(db), password=cluster.password) as conn:
        rows = conn.execute("SELECT seq FROM messages WHERE device_id = %s", (device_id,))
        return {int(r[0]) for r in rows}
