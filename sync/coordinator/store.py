"""The coordinator's storage: a small interface and its SQLite implementation.

`Store` is what the service needs (a PostgreSQL store can implement the same methods).
`SqliteStore` uses WAL with synchronous=FULL: a receipt is only published after the batch
it covers has committed, so "receipted" means "on disk". Messages are unique by
(device_id, kind, seq); a duplicate is counted and ignored but still receipted, so the
device can delete it. Cloud -> device seqs (commands and receipts share the direction)
come from a persisted per-device counter, so they are never reused.

All methods block; the service calls them from one worker thread.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from dgdm.sync.envelope import Kind

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    public_key TEXT NOT NULL,
    first_seen_ms INTEGER,
    last_seen_ms INTEGER,
    online INTEGER NOT NULL DEFAULT 0,
    status_ms INTEGER,
    agent_version TEXT,
    backend TEXT,
    down_seq INTEGER NOT NULL DEFAULT 0,
    added_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL,
    kind INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    body TEXT NOT NULL,
    UNIQUE (device_id, kind, seq)
);
CREATE INDEX IF NOT EXISTS messages_by_device_kind ON messages (device_id, kind, id);
CREATE TABLE IF NOT EXISTS commands (
    device_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    body TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    reply TEXT,
    replied_ms INTEGER,
    PRIMARY KEY (device_id, seq)
);
"""


class Incoming(NamedTuple):
    """A validated, decrypted message from a device (a tuple: one is made per message)."""

    device_id: str
    kind: Kind
    seq: int
    created_ms: int
    body: dict[str, Any]


@dataclass(frozen=True)
class StoreResult:
    stored: int
    duplicates: int
    receipt_seqs: dict[str, int]  # device -> the down seq allocated for its receipt


class Store(Protocol):
    def add_device(self, device_id: str, public_key: str) -> None: ...
    def remove_device(self, device_id: str) -> bool: ...
    def devices(self) -> list[dict[str, Any]]: ...
    def device(self, device_id: str) -> dict[str, Any] | None: ...
    def public_keys(self) -> dict[str, str]: ...
    def store_batch(self, items: list[Incoming], now_ms: int) -> StoreResult: ...
    def set_status(self, device_id: str, status: dict[str, Any], now_ms: int) -> None: ...
    def new_command(self, device_id: str, body: dict[str, Any], now_ms: int) -> int: ...
    def command(self, device_id: str, seq: int) -> dict[str, Any] | None: ...
    def results_since(self, device_id: str, cursor: int, limit: int) -> list[dict[str, Any]]: ...
    def latest(self, device_id: str, kind: Kind, limit: int) -> list[dict[str, Any]]: ...
    def close(self) -> None: ...


class SqliteStore:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- registry ----------------------------------------------------------------------

    def add_device(self, device_id: str, public_key: str) -> None:
        with self._lock, self._db:
            self._db.execute(
                "INSERT INTO devices (device_id, public_key, added_ms) VALUES (?, ?, ?) "
                "ON CONFLICT (device_id) DO UPDATE SET public_key = excluded.public_key",
                (device_id, public_key, _now_ms()),
            )

    def devices(self) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM devices ORDER BY device_id", ())

    def device(self, device_id: str) -> dict[str, Any] | None:
        rows = self._rows("SELECT * FROM devices WHERE device_id = ?", (device_id,))
        return rows[0] if rows else None

    def remove_device(self, device_id: str) -> bool:
        """Withdraw an enrolment: its messages are refused from then on. The row stays (its
        history, and the command seq a re-enrolment continues from); False if not enrolled."""
        with self._lock, self._db:
            cursor = self._db.execute(
                "UPDATE devices SET public_key = '', online = 0 "
                "WHERE device_id = ? AND public_key != ''",
                (device_id,),
            )
        return cursor.rowcount == 1

    def public_keys(self) -> dict[str, str]:
        """The enrolled devices' keys (a removed device's key is '')."""
        with self._lock:
            sql = "SELECT device_id, public_key FROM devices WHERE public_key != ''"
            return dict(self._db.execute(sql))

    def set_status(self, device_id: str, status: dict[str, Any], now_ms: int) -> None:
        online = 1 if status.get("state") == "online" else 0
        with self._lock, self._db:
            self._db.execute(
                "UPDATE devices SET online = ?, status_ms = ?, agent_version = ?, backend = ?,"
                " first_seen_ms = coalesce(first_seen_ms, ?), last_seen_ms = ?"
                " WHERE device_id = ?",
                (
                    online,
                    _int_or_none(status.get("ts_ms")),
                    _str_or_none(status.get("agent_version")),
                    _str_or_none(status.get("backend")),
                    now_ms,
                    now_ms,
                    device_id,
                ),
            )

    # -- ingest ------------------------------------------------------------------------

    def store_batch(self, items: list[Incoming], now_ms: int) -> StoreResult:
        rows = [
            (i.device_id, int(i.kind), i.seq, i.created_ms, now_ms, _dumps(i.body))
            for i in items
            if i.kind is not Kind.REPLY
        ]
        devices = sorted({i.device_id for i in items})
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            before = self._db.total_changes
            self._db.executemany(
                "INSERT OR IGNORE INTO messages"
                " (device_id, kind, seq, created_ms, received_ms, body) VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
            stored = self._db.total_changes - before
            stored += self._store_replies([i for i in items if i.kind is Kind.REPLY], now_ms)
            self._touch(devices, now_ms)
            receipt_seqs = {d: self._next_down_seq(d) for d in devices}
        return StoreResult(stored, len(items) - stored, receipt_seqs)

    def _store_replies(self, replies: list[Incoming], now_ms: int) -> int:
        """A reply is stored with its command; a second copy of the same reply is a duplicate."""
        stored = 0
        for item in replies:
            cmd_seq = item.body.get("cmd_seq")
            before = self._db.total_changes
            self._db.execute(
                "INSERT OR IGNORE INTO messages"
                " (device_id, kind, seq, created_ms, received_ms, body) VALUES (?, ?, ?, ?, ?, ?)",
                (item.device_id, int(item.kind), item.seq, item.created_ms, now_ms, "{}"),
            )
            if self._db.total_changes == before:
                continue
            stored += 1
            self._db.execute(
                "UPDATE commands SET reply = ?, replied_ms = ? WHERE device_id = ? AND seq = ?",
                (_dumps(item.body), now_ms, item.device_id, _int_or_none(cmd_seq)),
            )
        return stored

    def _touch(self, devices: Iterable[str], now_ms: int) -> None:
        self._db.executemany(
            "UPDATE devices SET last_seen_ms = ?, first_seen_ms = coalesce(first_seen_ms, ?)"
            " WHERE device_id = ?",
            [(now_ms, now_ms, d) for d in devices],
        )

    def _next_down_seq(self, device_id: str) -> int:
        row = self._db.execute(
            "UPDATE devices SET down_seq = down_seq + 1 WHERE device_id = ? RETURNING down_seq",
            (device_id,),
        ).fetchone()
        return int(row[0])

    # -- commands ------------------------------------------------------------------------

    def new_command(self, device_id: str, body: dict[str, Any], now_ms: int) -> int:
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            seq = self._next_down_seq(device_id)
            self._db.execute(
                "INSERT INTO commands (device_id, seq, body, created_ms) VALUES (?, ?, ?, ?)",
                (device_id, seq, _dumps(body), now_ms),
            )
        return seq

    def command(self, device_id: str, seq: int) -> dict[str, Any] | None:
        rows = self._rows(
            "SELECT seq, body, created_ms, reply, replied_ms FROM commands"
            " WHERE device_id = ? AND seq = ?",
            (device_id, seq),
        )
        if not rows:
            return None
        row = rows[0]
        reply = json.loads(row["reply"]) if row["reply"] else None
        return {
            "seq": row["seq"],
            "command": json.loads(row["body"]),
            "created_ms": row["created_ms"],
            "status": "replied" if reply is not None else "pending",
            "reply": reply,
            "replied_ms": row["replied_ms"],
        }

    # -- queries -------------------------------------------------------------------------

    def results_since(self, device_id: str, cursor: int, limit: int) -> list[dict[str, Any]]:
        return self._messages(
            "WHERE device_id = ? AND kind = ? AND id > ? ORDER BY id LIMIT ?",
            (device_id, int(Kind.RESULT), cursor, limit),
        )

    def latest(self, device_id: str, kind: Kind, limit: int) -> list[dict[str, Any]]:
        return self._messages(
            "WHERE device_id = ? AND kind = ? ORDER BY id DESC LIMIT ?",
            (device_id, int(kind), limit),
        )

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM messages").fetchone()[0])

    def _messages(self, where: str, params: tuple[Any, ...]) -> list[dict[str, Any]]:
        rows = self._rows(
            f"SELECT id, kind, seq, created_ms, received_ms, body FROM messages {where}",  # noqa: S608
            params,
        )
        for row in rows:
            row["cursor"] = row.pop("id")
            row["kind"] = Kind(row["kind"]).name.lower()
            row["body"] = json.loads(row["body"])
        return rows

    def _rows(self, sql: str, params: tuple[Any, ...]) -> list[dict[str, Any]]:
        with self._lock:
            cur = self._db.execute(sql, params)
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


# json.dumps with any non-default argument builds a new encoder per call; one will do.
_dumps = json.JSONEncoder(separators=(",", ":")).encode


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str_or_none(value: Any) -> str | None:
    return value[:200] if isinstance(value, str) else None
