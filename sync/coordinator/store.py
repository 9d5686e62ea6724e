"""The coordinator's storage: a small interface and its SQLite implementation.

`Store` is what the service needs (a PostgreSQL store can implement the same methods).
`SqliteStore` uses WAL with synchronous=FULL: a receipt is only published after the batch
it covers has committed, so "receipted" means "on disk". Messages are unique by
(device_id, kind, seq); a duplicate is counted and ignored but still receipted, so the
device can delete it. A message that cannot be stored (an integer beyond 64 bits, a
non-finite number, a refused body) is kept in `quarantine` instead and never costs the
other rows of its batch. The file, its WAL and the data dir are the owner's only.
Cloud -> device seqs (commands and receipts share the direction) come from a persisted
per-device counter, so they are never reused.

All methods block; the service calls them from one worker thread.
"""

from __future__ import annotations

import abc
import contextlib
import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeVar

from dgdm.sync.coordinator import jobs_store
from dgdm.sync.coordinator.jobs_store import Send, Tick
from dgdm.sync.coordinator.migrations import migrate_sqlite
from dgdm.sync.coordinator.tags import merged
from dgdm.sync.envelope import Kind
from dgdm.sync.wallclock import now_ms

# A device's stored bytes (its message bodies; ASCII JSON, so length() is bytes) are kept
# in devices.stored_bytes by every insert and delete here, per transaction (a trigger per
# row halved the insert rate), for the per-device quota without scanning the table.
_ADD_STORED_BYTES = (
    "UPDATE devices SET stored_bytes = stored_bytes + n.bytes FROM"
    " (SELECT device_id, sum(length(body)) AS bytes FROM messages WHERE id > ?"
    " GROUP BY device_id) AS n WHERE devices.device_id = n.device_id"
)
if TYPE_CHECKING:
    from dgdm.sync.coordinator.jobs import JobSpec

T = TypeVar("T")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Enough to see what a device sends wrong; a hostile device cannot fill the disk with it.
QUARANTINE_PER_DEVICE = 1000
SAMPLE_CHARS = 512


class Incoming(NamedTuple):
    """A validated, decrypted message from a device (a tuple: one is made per message)."""

    device_id: str
    kind: Kind
    seq: int
    created_ms: int
    body: dict[str, Any]


class Quarantined(NamedTuple):
    """A message refused after it was authenticated (or at insert): recorded, not stored."""

    device_id: str
    kind: Kind
    seq: int
    reason: str
    sample: str


@dataclass(frozen=True)
class StoreResult:
    stored: int
    duplicates: int
    receipt_seqs: dict[str, int]  # device -> the down seq allocated for its receipt
    # Rows of `items` that could not be stored and went to quarantine instead.
    quarantined: tuple[Quarantined, ...] = ()


def quarantine_record(
    device_id: str, kind: Kind, seq: int, reason: str, *, message: str, sample: bytes
) -> Quarantined:
    """What is kept of a refused message: why, and the start of its bytes."""
    text = sample[:SAMPLE_CHARS].decode("utf-8", "backslashreplace")
    return Quarantined(device_id, kind, seq, reason, f"{message}: {text}"[:SAMPLE_CHARS])


def merge_results(results: list[StoreResult]) -> StoreResult:
    """Several transactions of one ingest as one: a device's receipt takes its last seq."""
    receipt_seqs: dict[str, int] = {}
    for result in results:
        receipt_seqs.update(result.receipt_seqs)
    return StoreResult(
        sum(r.stored for r in results),
        sum(r.duplicates for r in results),
        receipt_seqs,
        tuple(q for r in results for q in r.quarantined),
    )


class Store(Protocol):
    def add_device(
        self,
        device_id: str,
        public_key: str,
        *,
        plaintext_telemetry: bool = False,
        tags: Mapping[str, str] | None = None,
    ) -> None: ...
    def plaintext_telemetry(self, device_id: str) -> bool: ...
    def remove_device(self, device_id: str) -> bool: ...
    def devices(self) -> list[dict[str, Any]]: ...
    def device(self, device_id: str) -> dict[str, Any] | None: ...
    def tag(self, device_id: str, add: Mapping[str, str], *, replace: bool = False) -> bool: ...
    def untag(self, device_id: str, keys: Iterable[str]) -> bool: ...
    def tags(self) -> dict[str, dict[str, str]]: ...
    def device_views(
        self,
        tags: Mapping[str, str] | None = None,
        online: bool | None = None,
        device_id: str | None = None,
    ) -> list[dict[str, Any]]: ...
    def commands(self, device_id: str, limit: int) -> list[dict[str, Any]]: ...
    def telemetry(
        self, device_id: str, since_ms: int | None, limit: int
    ) -> list[dict[str, Any]]: ...
    def public_keys(self) -> dict[str, str]: ...
    def set_quota(self, device_id: str, quota: dict[str, float] | None) -> bool: ...
    def quotas(self) -> dict[str, str]: ...
    def store_batch(
        self, items: list[Incoming], now_ms: int, quarantine: Iterable[Quarantined] = ()
    ) -> StoreResult: ...
    def quarantined(self, device_id: str, limit: int = 100) -> list[dict[str, Any]]: ...
    def set_status(self, device_id: str, status: dict[str, Any], now_ms: int) -> None: ...
    def new_command(self, device_id: str, body: dict[str, Any], now_ms: int) -> int: ...
    def command(self, device_id: str, seq: int) -> dict[str, Any] | None: ...
    def claim_resends(
        self,
        since_ms: int,
        until_ms: int,
        limit: int,
        now_ms: int,
        keep: Callable[[dict[str, Any]], bool],
    ) -> list[dict[str, Any]]: ...
    def results_since(self, device_id: str, cursor: int, limit: int) -> list[dict[str, Any]]: ...
    def latest(self, device_id: str, kind: Kind, limit: int) -> list[dict[str, Any]]: ...
    # jobs (jobs_store.py holds their SQL, shared by both stores)
    def create_job(self, spec: JobSpec, now_ms: int) -> dict[str, Any]: ...
    def jobs(self, limit: int) -> list[dict[str, Any]]: ...
    def job(self, job_id: int) -> dict[str, Any] | None: ...
    def job_targets(self, job_id: int, after: str, limit: int) -> list[dict[str, Any]]: ...
    def cancel_job(self, job_id: int, now_ms: int) -> dict[str, Any] | None: ...
    def job_tick(self, now_ms: int, owner: str, lease_ms: int, max_sends: int) -> Tick: ...
    def job_published(self, owner: str, sent: list[Send], now_ms: int) -> None: ...
    def ping(self) -> None: ...
    def close(self) -> None: ...


class StoreJobs(abc.ABC):
    """The `Store` job methods of both stores: each runs one of jobs_store.py's functions
    in one transaction of the store's own (`_job_tx`; `write=False`: a read)."""

    @abc.abstractmethod
    def _job_tx(self, fn: Callable[..., T], *args: Any, write: bool = True) -> T: ...

    def create_job(self, spec: JobSpec, now_ms: int) -> dict[str, Any]:
        return self._job_tx(jobs_store.create_job, spec, now_ms)

    def jobs(self, limit: int) -> list[dict[str, Any]]:
        return self._job_tx(jobs_store.list_jobs, limit, write=False)

    def job(self, job_id: int) -> dict[str, Any] | None:
        return self._job_tx(jobs_store.get_job, job_id, write=False)

    def job_targets(self, job_id: int, after: str, limit: int) -> list[dict[str, Any]]:
        return self._job_tx(jobs_store.job_targets, job_id, after, limit, write=False)

    def cancel_job(self, job_id: int, now_ms: int) -> dict[str, Any] | None:
        return self._job_tx(jobs_store.cancel_job, job_id, now_ms)

    def job_tick(self, now_ms: int, owner: str, lease_ms: int, max_sends: int) -> Tick:
        return self._job_tx(jobs_store.tick, now_ms, owner, lease_ms, max_sends)

    def job_published(self, owner: str, sent: list[Send], now_ms: int) -> None:
        self._job_tx(jobs_store.published, owner, sent, now_ms)


class SqliteStore(StoreJobs):
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        _private_files(self.path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=5000")
        migrate_sqlite(self._db)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- registry ----------------------------------------------------------------------

    def add_device(
        self,
        device_id: str,
        public_key: str,
        *,
        plaintext_telemetry: bool = False,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        """Enrol (or re-enrol: a new key, and the plaintext flag as given now); `tags`
        given (checked by the caller, tags.py) become the device's tags, replacing any."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "INSERT INTO devices (device_id, public_key, added_ms, plaintext_telemetry)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (device_id) DO UPDATE SET"
                " public_key = excluded.public_key,"
                " plaintext_telemetry = excluded.plaintext_telemetry",
                (device_id, public_key, now_ms(), int(plaintext_telemetry)),
            )
            if tags is not None:
                self._write_tags(device_id, dict(tags))

    # -- tags (the rules are tags.py's; at most MAX_TAGS per device, checked on the result)

    def tag(self, device_id: str, add: Mapping[str, str], *, replace: bool = False) -> bool:
        """Set tags (replacing the values of keys it has; `replace`: exactly these); False
        if the device is unknown. TagError when the result would exceed MAX_TAGS."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            if not self._known(device_id):
                return False
            current = {} if replace else self._device_tags(device_id)
            self._write_tags(device_id, merged(current, add))
        return True

    def untag(self, device_id: str, keys: Iterable[str]) -> bool:
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            if not self._known(device_id):
                return False
            self._db.executemany(
                "DELETE FROM device_tags WHERE device_id = ? AND key = ?",
                [(device_id, k) for k in keys],
            )
        return True

    def tags(self) -> dict[str, dict[str, str]]:
        """Device -> its tags, for the devices that have any."""
        found: dict[str, dict[str, str]] = {}
        with self._lock:
            for device_id, key, value in self._db.execute(
                "SELECT device_id, key, value FROM device_tags ORDER BY device_id, key"
            ):
                found.setdefault(device_id, {})[key] = value
        return found

    def _known(self, device_id: str) -> bool:
        sql = "SELECT 1 FROM devices WHERE device_id = ?"
        return self._db.execute(sql, (device_id,)).fetchone() is not None

    def _device_tags(self, device_id: str) -> dict[str, str]:
        sql = "SELECT key, value FROM device_tags WHERE device_id = ?"
        return dict(self._db.execute(sql, (device_id,)).fetchall())

    def _write_tags(self, device_id: str, tags: dict[str, str]) -> None:
        self._db.execute("DELETE FROM device_tags WHERE device_id = ?", (device_id,))
        self._db.executemany(
            "INSERT INTO device_tags (device_id, key, value) VALUES (?, ?, ?)",
            [(device_id, k, v) for k, v in tags.items()],
        )

    def device_views(
        self,
        tags: Mapping[str, str] | None = None,
        online: bool | None = None,
        device_id: str | None = None,
    ) -> list[dict[str, Any]]:
        """Devices with their tags, the last sample of their latest telemetry and their
        latest alert, in one query (correlated subqueries on the (device_id, kind, id)
        index); `tags` AND-ed, `online` and `device_id` filter."""
        where, params = view_filters(tags, online, device_id, "?")
        rows = self._rows(_SQLITE_VIEWS.format(where=where), tuple(params))
        return [device_view_row(r) for r in rows]

    def plaintext_telemetry(self, device_id: str) -> bool:
        """Whether the device was enrolled as sending plaintext telemetry (default no)."""
        with self._lock:
            row = self._db.execute(
                "SELECT plaintext_telemetry FROM devices WHERE device_id = ? AND public_key != ''",
                (device_id,),
            ).fetchone()
        return bool(row and row[0])

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

    def set_quota(self, device_id: str, quota: dict[str, float] | None) -> bool:
        """A device's own ingest rates (None: the [ingest] defaults); False if unknown."""
        text = _dumps(quota) if quota else None
        with self._lock, self._db:
            cursor = self._db.execute(
                "UPDATE devices SET quota = ? WHERE device_id = ?", (text, device_id)
            )
        return cursor.rowcount == 1

    def quotas(self) -> dict[str, str]:
        """Device -> its stored quota override (JSON text), for devices that have one."""
        with self._lock:
            sql = "SELECT device_id, quota FROM devices WHERE quota IS NOT NULL"
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
                    _int64_or_none(status.get("ts_ms")),
                    _str_or_none(status.get("agent_version")),
                    _str_or_none(status.get("backend")),
                    now_ms,
                    now_ms,
                    device_id,
                ),
            )

    # -- ingest ------------------------------------------------------------------------

    def store_batch(
        self, items: list[Incoming], now_ms: int, quarantine: Iterable[Quarantined] = ()
    ) -> StoreResult:
        """Store `items` in one transaction and record `quarantine`; an item that cannot be
        stored is quarantined alone. Every device of either list gets a receipt seq."""
        given = list(quarantine)
        batch = split_batch(items, now_ms, given)
        refused = batch.refused  # and the rows the database refuses
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            last_id = self._db.execute("SELECT coalesce(max(id), 0) FROM messages").fetchone()[0]
            before = self._db.total_changes
            refused += self._insert_messages(batch.rows, items)
            stored = self._db.total_changes - before
            stored += self._store_replies(batch.replies, now_ms)
            if stored:
                self._db.execute(_ADD_STORED_BYTES, (last_id,))
            self._quarantine(given + refused, now_ms)
            self._touch(batch.devices, now_ms)
            receipt_seqs = {d: self._next_down_seq(d) for d in batch.devices}
        duplicates = len(items) - len(refused) - stored
        return StoreResult(stored, duplicates, receipt_seqs, tuple(given + refused))

    def _insert_messages(
        self, rows: list[tuple[Any, ...]], items: list[Incoming]
    ) -> list[Quarantined]:
        """All rows at once; should the database refuse one, row by row, so it fails alone."""
        self._db.execute("SAVEPOINT batch")
        try:
            self._db.executemany(_INSERT, rows)
        except (sqlite3.Error, OverflowError, ValueError):
            self._db.execute("ROLLBACK TO batch")
        else:
            self._db.execute("RELEASE batch")
            return []
        self._db.execute("RELEASE batch")
        by_key = {(i.device_id, int(i.kind), i.seq): i for i in items}
        refused = []
        for row in rows:
            try:
                self._db.execute(_INSERT, row)
            except (sqlite3.Error, OverflowError, ValueError) as exc:
                refused.append(quarantined_item(by_key[row[:3]], "store_error", str(exc)))
        return refused

    def _store_replies(self, replies: list[tuple[Incoming, str]], now_ms: int) -> int:
        """A reply is stored with its command; a second copy of the same reply is a duplicate."""
        stored = 0
        for item, text in replies:
            before = self._db.total_changes
            self._db.execute(
                _INSERT, (item.device_id, int(item.kind), item.seq, item.created_ms, now_ms, "{}")
            )
            if self._db.total_changes == before:
                continue
            stored += 1
            self._db.execute(
                "UPDATE commands SET reply = ?, replied_ms = ?"
                " WHERE device_id = ? AND seq = ? AND reply IS NULL",  # the first reply wins
                (text, now_ms, item.device_id, _int64_or_none(item.body.get("cmd_seq"))),
            )
        return stored

    def _quarantine(self, refused: list[Quarantined], now_ms: int) -> None:
        self._db.executemany(
            "INSERT INTO quarantine (device_id, kind, seq, reason, received_ms, sample)"
            " SELECT ?, ?, ?, ?, ?, ? WHERE"
            " (SELECT count(*) FROM quarantine WHERE device_id = ?) < ?",
            [(*quarantine_row(q, now_ms), q.device_id, QUARANTINE_PER_DEVICE) for q in refused],
        )

    # -- housekeeping (retention, downsampling, quota; see housekeeping.py) -------------

    def prune(self, kind: Kind, older_than_ms: int, limit: int) -> int:
        """Delete up to `limit` of the oldest `kind` messages received before
        `older_than_ms` (Kind.COMMAND: commands created before it); the count deleted."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            if kind is Kind.COMMAND:
                return self._db.execute(
                    "DELETE FROM commands WHERE rowid IN (SELECT rowid FROM commands"
                    " WHERE created_ms < ? ORDER BY created_ms DESC LIMIT ?)",
                    (older_than_ms, limit),
                ).rowcount
            return self._delete_rows(
                "WHERE kind = ? AND received_ms < ? ORDER BY received_ms LIMIT ?",
                (int(kind), older_than_ms, limit),
            )[0]

    def prune_quarantine(self, older_than_ms: int, limit: int) -> int:
        with self._lock, self._db:
            return self._db.execute(
                "DELETE FROM quarantine WHERE id IN (SELECT id FROM quarantine"
                " WHERE received_ms < ? ORDER BY id LIMIT ?)",
                (older_than_ms, limit),
            ).rowcount

    def telemetry_page(
        self, after: tuple[int, int], before_ms: int, limit: int
    ) -> list[tuple[int, int, str]]:
        """(received_ms, id, device_id) of telemetry received before `before_ms`, in that
        order, after the cursor `after` = (received_ms, id): the downsampler's reading."""
        with self._lock:
            return [
                (int(r[0]), int(r[1]), str(r[2]))
                for r in self._db.execute(
                    "SELECT received_ms, id, device_id FROM messages"
                    " WHERE kind = ? AND (received_ms, id) > (?, ?) AND received_ms < ?"
                    " ORDER BY received_ms, id LIMIT ?",
                    (int(Kind.TELEMETRY), after[0], after[1], before_ms, limit),
                )
            ]

    def delete_messages(self, ids: list[int]) -> int:
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            return self._delete_rows(f"WHERE id IN ({','.join('?' * len(ids))})", tuple(ids))[0]

    def _delete_rows(self, where: str, params: tuple[Any, ...]) -> tuple[int, int]:
        """Delete the messages `where` selects (a bounded page) and take their bytes off
        their devices' stored_bytes; (rows, bytes) deleted. Inside the caller's transaction."""
        rows = self._db.execute(
            f"SELECT id, device_id, length(body) FROM messages {where}",  # noqa: S608
            params,
        ).fetchall()
        if not rows:
            return 0, 0
        freed: dict[str, int] = {}
        for _, device_id, size in rows:
            freed[device_id] = freed.get(device_id, 0) + int(size)
        ids = [r[0] for r in rows]
        self._db.execute(
            f"DELETE FROM messages WHERE id IN ({','.join('?' * len(ids))})",  # noqa: S608
            ids,
        )
        self._db.executemany(
            "UPDATE devices SET stored_bytes = max(0, stored_bytes - ?) WHERE device_id = ?",
            [(size, device_id) for device_id, size in freed.items()],
        )
        return len(rows), sum(freed.values())

    def storage_by_device(self, more_than: int) -> dict[str, int]:
        """Devices whose stored message bytes exceed `more_than`."""
        with self._lock:
            return dict(
                self._db.execute(
                    "SELECT device_id, stored_bytes FROM devices WHERE stored_bytes > ?",
                    (more_than,),
                )
            )

    def prune_device(self, device_id: str, kind: Kind, limit: int) -> tuple[int, int]:
        """Delete the device's `limit` oldest messages of `kind`; (rows, bytes) freed."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            return self._delete_rows(
                "WHERE device_id = ? AND kind = ? ORDER BY id LIMIT ?",
                (device_id, int(kind), limit),
            )

    def size_bytes(self) -> int:
        """The database's size on disk: its pages and its WAL."""
        with self._lock:
            pages = self._db.execute("PRAGMA page_count").fetchone()[0]
            page_size = self._db.execute("PRAGMA page_size").fetchone()[0]
        wal = self.path.with_name(self.path.name + "-wal")
        with contextlib.suppress(FileNotFoundError):
            return int(pages) * int(page_size) + wal.stat().st_size
        return int(pages) * int(page_size)

    def quarantined(self, device_id: str, limit: int = 100) -> list[dict[str, Any]]:
        rows = self._rows(
            "SELECT kind, seq, reason, received_ms, sample FROM quarantine"
            " WHERE device_id = ? ORDER BY id LIMIT ?",
            (device_id, limit),
        )
        for row in rows:
            row["kind"] = Kind(row["kind"]).name.lower()
        return rows

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

    def claim_resends(
        self,
        since_ms: int,
        until_ms: int,
        limit: int,
        now_ms: int,
        keep: Callable[[dict[str, Any]], bool],
    ) -> list[dict[str, Any]]:
        """The commands to publish again, claimed for this replica's round: created in
        [since_ms, until_ms] with no reply yet and not published again after until_ms,
        the newest `limit` of them; those `keep` accepts are marked as published again at
        now_ms in the same transaction and returned, so other replicas' rounds skip them
        until until_ms has passed that mark. The device runs each seq at most once."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            cur = self._db.execute(
                "SELECT device_id, seq, body, created_ms FROM commands"
                " WHERE reply IS NULL AND created_ms BETWEEN ? AND ?"
                " AND (resent_ms IS NULL OR resent_ms <= ?)"
                " ORDER BY created_ms DESC LIMIT ?",
                (since_ms, until_ms, until_ms, limit),
            )
            names = [d[0] for d in cur.description]
            rows = [command_row(dict(zip(names, r, strict=True))) for r in cur.fetchall()]
            claimed = [row for row in rows if keep(row)]
            self._db.executemany(
                "UPDATE commands SET resent_ms = ? WHERE device_id = ? AND seq = ?",
                [(now_ms, row["device_id"], row["seq"]) for row in claimed],
            )
        return claimed

    def command(self, device_id: str, seq: int) -> dict[str, Any] | None:
        rows = self._rows(
            "SELECT seq, body, created_ms, reply, replied_ms FROM commands"
            " WHERE device_id = ? AND seq = ?",
            (device_id, seq),
        )
        if not rows:
            return None
        return command_view(rows[0])

    def commands(self, device_id: str, limit: int) -> list[dict[str, Any]]:
        """The device's latest `limit` commands, newest first, each with its reply."""
        rows = self._rows(
            "SELECT seq, body, created_ms, reply, replied_ms FROM commands"
            " WHERE device_id = ? ORDER BY seq DESC LIMIT ?",
            (device_id, limit),
        )
        return [command_view(r) for r in rows]

    # -- jobs (StoreJobs, on jobs_store.py's SQL, shared with PgStore) -------------------

    def _job_tx(self, fn: Callable[..., T], *args: Any, write: bool = True) -> T:
        """One transaction: a write takes the write lock first; a read (the API's, on the
        reader connection) a WAL snapshot, so it never waits for ingest."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            return fn(jobs_store.Tx(self._db, jobs_store.SQLITE), *args)

    # -- queries -------------------------------------------------------------------------

    def telemetry(self, device_id: str, since_ms: int | None, limit: int) -> list[dict[str, Any]]:
        """Telemetry messages oldest first: the first `limit` received at or after
        `since_ms`, or (None) the latest `limit`."""
        if since_ms is None:
            rows = self._messages(
                "WHERE device_id = ? AND kind = ? ORDER BY id DESC LIMIT ?",
                (device_id, int(Kind.TELEMETRY), limit),
            )
            return rows[::-1]
        return self._messages(
            "WHERE device_id = ? AND kind = ? AND received_ms >= ? ORDER BY id LIMIT ?",
            (device_id, int(Kind.TELEMETRY), since_ms, limit),
        )

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

    def ping(self) -> None:
        """For /healthz: the database answers (an error is raised otherwise)."""
        with self._lock:
            self._db.execute("SELECT 1").fetchone()

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


def command_row(row: dict[str, Any]) -> dict[str, Any]:
    """A stored command to publish again: its body decoded."""
    return {**row, "body": json.loads(row["body"])}


def command_view(row: dict[str, Any]) -> dict[str, Any]:
    """A stored command row as the API answers it (both stores)."""
    reply = json.loads(row["reply"]) if row["reply"] else None
    return {
        "seq": row["seq"],
        "command": json.loads(row["body"]),
        "created_ms": row["created_ms"],
        "status": "replied" if reply is not None else "pending",
        "reply": reply,
        "replied_ms": row["replied_ms"],
    }


# The device columns a view shows, then its tags (a JSON object), the last sample of its
# latest telemetry and its latest alert (JSON arrays), each one index lookup per device.
VIEW_COLUMNS = (
    "d.device_id, d.public_key, d.online, d.first_seen_ms, d.last_seen_ms, d.agent_version,"
    " d.backend"
)
_SQLITE_VIEWS = (
    f"SELECT {VIEW_COLUMNS},"  # noqa: S608
    " (SELECT json_group_object(t.key, t.value) FROM device_tags t"
    "  WHERE t.device_id = d.device_id) AS tags,"
    " (SELECT m.body -> '$.samples[#-1]' FROM messages m"
    f"  WHERE m.device_id = d.device_id AND m.kind = {int(Kind.TELEMETRY)}"
    "  ORDER BY m.id DESC LIMIT 1) AS sample,"
    " (SELECT json_array(m.seq, m.created_ms, m.received_ms, json(m.body)) FROM messages m"
    f"  WHERE m.device_id = d.device_id AND m.kind = {int(Kind.ALERT)}"
    "  ORDER BY m.id DESC LIMIT 1) AS alert"
    " FROM devices d {where} ORDER BY d.device_id"
)


def view_filters(
    tags: Mapping[str, str] | None, online: bool | None, device_id: str | None, mark: str
) -> tuple[str, list[Any]]:
    """The WHERE of a device view (`mark`: the driver's placeholder); tags are AND-ed: a
    device matches when it has all of them."""
    clauses: list[str] = []
    params: list[Any] = []
    if device_id is not None:
        clauses.append(f"d.device_id = {mark}")
        params.append(device_id)
    if online is not None:
        clauses.append(f"d.online = {mark}")
        params.append(int(online))
    if tags:
        pairs = " OR ".join([f"(key = {mark} AND value = {mark})"] * len(tags))
        clauses.append(
            f"d.device_id IN (SELECT device_id FROM device_tags WHERE {pairs}"  # noqa: S608
            f" GROUP BY device_id HAVING count(*) = {mark})"
        )
        params += [x for kv in tags.items() for x in kv] + [len(tags)]
    return ("WHERE " + " AND ".join(clauses)) if clauses else "", params


def device_view_row(row: dict[str, Any]) -> dict[str, Any]:
    """A device_views row (both stores; JSON columns as text or already decoded) with its
    `tags`, `summary` and `last_alert` as the API answers them."""
    tags, sample, alert = (
        json.loads(v) if isinstance(v, str) else v
        for v in (row.pop("tags"), row.pop("sample"), row.pop("alert"))
    )
    row["tags"] = tags or {}
    row["summary"] = summary_view(sample, row.get("backend"))
    row["last_alert"] = alert_view(alert)
    return row


def summary_view(sample: Any, backend: Any) -> dict[str, Any] | None:
    """What the fleet table shows of a device's latest telemetry sample (SPEC §6); a field
    the device sent wrong is null, never an error."""
    if not isinstance(sample, dict):
        return None
    tpu = _obj(sample.get("tpu"))
    outbox = _obj(sample.get("outbox"))
    return {
        "ts_ms": _num(sample.get("ts_ms")),
        "backend": backend,
        "tpu": {"present": _bool(tpu.get("present")), "temp_c": _num(tpu.get("temp_c"))},
        "outbox": {k: _num(outbox.get(k)) for k in ("messages", "bytes", "dropped")},
        "cpu_percent": _num(sample.get("cpu_percent")),
        "latency_p99_ms": _num(sample.get("latency_p99_ms")),
    }


def alert_view(alert: Any) -> dict[str, Any] | None:
    """[seq, created_ms, received_ms, body] -> the latest alert as the API answers it."""
    if not isinstance(alert, list) or len(alert) != 4:
        return None
    seq, created_ms, received_ms, body = alert
    body = _obj(body)
    return {
        "code": _text(body.get("code")),
        "severity": _text(body.get("severity")),
        "message": _text(body.get("message")),
        "seq": seq,
        "created_ms": created_ms,
        "received_ms": received_ms,
    }


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _num(value: Any) -> float | int | None:
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def _bool(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


def _text(value: Any) -> str | None:
    return value[:500] if isinstance(value, str) else None


# json.dumps with any non-default argument builds a new encoder per call; one will do.
_dumps = json.JSONEncoder(separators=(",", ":")).encode


_dumps_strict = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
_INSERT = (
    "INSERT OR IGNORE INTO messages"
    " (device_id, kind, seq, created_ms, received_ms, body) VALUES (?, ?, ?, ?, ?, ?)"
)


class Refused(ValueError):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def row_text(item: Incoming) -> str:
    """The body as stored, after the checks SQLite and JSON readers need: 64-bit integers
    (SQLite raises OverflowError beyond them) and finite numbers (`Infinity` is not JSON,
    and the API must always answer JSON)."""
    for name, value in (("seq", item.seq), ("created_ms", item.created_ms)):
        if not 0 <= value <= INT64_MAX:
            raise Refused("malformed", f"{name} {value} is outside 0..2^63-1")
    if item.kind is Kind.REPLY:
        cmd_seq = item.body.get("cmd_seq")
        if isinstance(cmd_seq, int) and not INT64_MIN <= cmd_seq <= INT64_MAX:
            raise Refused("malformed", f"reply cmd_seq {cmd_seq} is beyond 64 bits")
    try:
        return _dumps_strict(item.body)
    except ValueError as exc:
        raise Refused("bad_body", f"body is not storable JSON: {exc}") from exc


class Batch(NamedTuple):
    """An ingest batch sorted out before its transaction (both stores)."""

    rows: list[tuple[Any, ...]]  # messages: (device_id, kind, seq, created_ms, received_ms, body)
    replies: list[tuple[Incoming, str]]  # stored with their commands
    refused: list[Quarantined]  # items no store can take (row_text's checks)
    devices: list[str]  # every device of the batch or its quarantine, sorted: receipts


def split_batch(items: list[Incoming], now_ms: int, quarantine: list[Quarantined]) -> Batch:
    batch = Batch(
        [], [], [], sorted({i.device_id for i in items} | {q.device_id for q in quarantine})
    )
    for item in items:
        try:
            text = row_text(item)
        except Refused as exc:
            batch.refused.append(quarantined_item(item, exc.reason, str(exc)))
            continue
        if item.kind is Kind.REPLY:
            batch.replies.append((item, text))
        else:
            batch.rows.append(
                (item.device_id, int(item.kind), item.seq, item.created_ms, now_ms, text)
            )
    return batch


def quarantined_item(item: Incoming, reason: str, message: str) -> Quarantined:
    sample = json.dumps(item.body, default=str)[:SAMPLE_CHARS]
    return Quarantined(item.device_id, item.kind, item.seq, reason, f"{message}: {sample}")


def quarantine_row(q: Quarantined, now_ms: int) -> tuple[Any, ...]:
    return (q.device_id, int(q.kind), str(q.seq), q.reason, now_ms, q.sample[:SAMPLE_CHARS])


def _private_files(path: Path) -> None:
    """The data dir 0700 and the database 0600 whatever the umask; SQLite creates the WAL
    and SHM files with the database's mode, so they follow. Looser existing files (an older
    release, a copy) are tightened."""
    if not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)  # mkdir's mode would be cut by an odd umask
    os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
    for name in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            st = name.stat()
            if st.st_mode & 0o077 and st.st_uid == os.geteuid():
                os.chmod(name, 0o600)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int64_or_none(value: Any) -> int | None:
    return value if _is_int(value) and INT64_MIN <= value <= INT64_MAX else None


def _str_or_none(value: Any) -> str | None:
    return value[:200] if isinstance(value, str) else None
