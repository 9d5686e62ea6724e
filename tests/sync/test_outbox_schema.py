"""The outbox's schema bookkeeping: a file of a release that recorded its migrations by
name (`_migrations`) opens with its messages, seqs and state and nothing applied again; a
file newer than the code is refused; a backup reads both schemes."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import pytest

from dgdm.sync import backup
from dgdm.sync.envelope import PRIORITY, Kind
from dgdm.sync.errors import OutboxError
from dgdm.sync.outbox import Outbox

from .test_outbox import _open, sealer

# The layout the releases with `_migrations` wrote (sqlite-utils' DDL of 001_initial).
NAMED_SCHEME = (
    "CREATE TABLE _migrations (name TEXT PRIMARY KEY, applied_ms INTEGER NOT NULL)",
    'CREATE TABLE "messages" ("seq" INTEGER PRIMARY KEY, "priority" INTEGER NOT NULL,'
    ' "kind" INTEGER NOT NULL, "created_ms" INTEGER NOT NULL, "size" INTEGER NOT NULL,'
    ' "payload" BLOB NOT NULL)',
    'CREATE INDEX "messages_order" ON "messages" ("priority", "seq")',
    'CREATE INDEX "messages_kind" ON "messages" ("kind", "seq")',
    'CREATE TABLE "counters" ("name" TEXT PRIMARY KEY, "value" INTEGER NOT NULL)',
    'CREATE TABLE "state" ("key" TEXT PRIMARY KEY, "value" TEXT NOT NULL)',
)
APPLIED_MS = 1_700_000_000_000
QUEUED = {3: (Kind.ALERT, 1_000), 7: (Kind.RESULT, 2_000)}
SEALED = {
    seq: sealer(kind, seq, created_ms, {"n": seq}) for seq, (kind, created_ms) in QUEUED.items()
}


def named_scheme_outbox(path: Path, names: tuple[str, ...] = ("001_initial",)) -> None:
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("PRAGMA page_size=4096")
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        conn.execute("PRAGMA journal_mode=WAL")
        for statement in NAMED_SCHEME:
            conn.execute(statement)
        conn.executemany("INSERT INTO _migrations VALUES (?, ?)", [(n, APPLIED_MS) for n in names])
        for seq, (kind, created_ms) in QUEUED.items():
            conn.execute(
                "INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?)",
                (seq, PRIORITY[kind], int(kind), created_ms, len(SEALED[seq]), SEALED[seq]),
            )
        conn.execute("INSERT INTO counters VALUES ('next_seq', 50), ('dropped:telemetry', 4)")
        conn.execute("INSERT INTO state VALUES ('last_cmd_seq', '41')")


def versions(path: Path) -> list[tuple[int, int]]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return conn.execute("SELECT version, applied_ms FROM schema_version").fetchall()


def test_a_named_scheme_outbox_opens_with_everything_and_nothing_applied_again(
    tmp_path: Path,
) -> None:
    path = tmp_path / "outbox.db"
    named_scheme_outbox(path)
    box = _open(path)  # a migration applied again would fail: its tables exist
    try:
        assert [(m.seq, m.kind, m.created_ms, m.payload) for m in box.pending(10)] == [
            (seq, kind, created_ms, SEALED[seq]) for seq, (kind, created_ms) in QUEUED.items()
        ]
        assert box.get_state("last_cmd_seq") == "41"
        assert box.stats().dropped == 4
        assert box.enqueue(Kind.RESULT, {}) == 50
    finally:
        box.close()
    assert versions(path) == [(1, APPLIED_MS)]  # adopted with when it was applied
    with contextlib.closing(sqlite3.connect(path)) as conn:  # left for the release before
        assert conn.execute("SELECT * FROM _migrations").fetchall() == [("001_initial", APPLIED_MS)]
    _open(path).close()
    assert versions(path) == [(1, APPLIED_MS)]


def test_an_outbox_newer_than_the_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    _open(path).close()
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("INSERT INTO schema_version VALUES (99, 'from the future', 0)")
    with pytest.raises(OutboxError, match="schema version 99, newer than the 1 this dgdm-edge"):
        _open(path)


def test_a_named_scheme_outbox_with_a_name_this_code_does_not_know_is_refused(
    tmp_path: Path,
) -> None:
    path = tmp_path / "o.db"
    named_scheme_outbox(path, ("001_initial", "002_future"))
    with pytest.raises(OutboxError, match=r"unknown outbox migrations \['002_future'\]"):
        _open(path)
    with contextlib.closing(sqlite3.connect(path)) as conn:  # refused before anything changed
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "schema_version" not in tables


@pytest.mark.parametrize("scheme", ["named", "numbered"])
def test_a_backup_of_either_scheme_restores(tmp_path: Path, scheme: str) -> None:
    live = tmp_path / "live" / "outbox.db"
    live.parent.mkdir()
    if scheme == "named":
        named_scheme_outbox(live)
    else:
        _open(live).close()
    out = tmp_path / "agent.dgdm"
    manifest = backup.create(out, "agent", [backup.Part("outbox.db", live, backup.OUTBOX)], {})
    assert manifest["files"][0]["schema_version"] == 1
    staging = tmp_path / "staging"
    staging.mkdir()
    backup.read(out, "agent", staging)
    backup.advance_seqs(staging, manifest, 10**15)
    box: Outbox = _open(staging / "outbox.db")
    try:
        assert box.enqueue(Kind.RESULT, {}) == 10**15
    finally:
        box.close()


def test_a_backup_of_an_outbox_newer_than_the_code_is_refused(tmp_path: Path) -> None:
    live = tmp_path / "outbox.db"
    _open(live).close()
    with contextlib.closing(sqlite3.connect(live, isolation_level=None)) as conn:
        conn.execute("INSERT INTO schema_version VALUES (2, 'from the future', 0)")
    with pytest.raises(backup.BackupError, match="outbox database has schema version 2, newer"):
        backup.create(tmp_path / "b.dgdm", "agent", [backup.Part("o", live, backup.OUTBOX)], {})
