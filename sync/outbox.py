"""The device's durable, bounded priority queue of sealed envelopes (SQLite, WAL, FULL sync).

One writer thread owns the write connection. A producer takes the next seq, seals its
message in its own thread (so sealing overlaps the writer's fsync, which releases the
GIL), hands it to the writer and blocks until the batch holding it has committed: a burst
of producers shares one transaction and one fsync (group commit) while every `enqueue`
still returns only once durable. The writer commits strictly in seq order (a message
sealed late waits for its predecessors), so a reader paging by (priority, seq) never skips
one committed late. The high-water mark is persisted in the same transaction as the rows,
so a seq anyone has seen is never handed out again, even after a crash.

Reads go through a second connection (WAL lets them run beside the writer). The rules of
what to evict and what has expired live in `outbox_policy`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

from dgdm.sync import outbox_policy as policy
from dgdm.sync.envelope import PRIORITY, Kind
from dgdm.sync.errors import OutboxError, OutboxFull, StorageFull

log = logging.getLogger(__name__)

Sealer = Callable[[Kind, int, int, Any], bytes]
OUTBOX_KINDS = (Kind.ALERT, Kind.REPLY, Kind.RESULT, Kind.TELEMETRY)
PAGE_SIZE = 4096
MAX_BATCH = 512
BALLAST_BYTES = 1024 * 1024
# Below this the fixed pages (schema, indexes) leave too little room for messages.
MIN_MAX_BYTES = 64 * 1024
RECOVERY_INTERVAL_S = 1.0
# Rows per delete transaction while the disk is full (about a page each in the WAL).
FULL_DISK_DELETE_CHUNK = 16
FULL_MESSAGE = "the disk is full: the outbox serves reads and deletes but takes no messages"
MAINTENANCE_INTERVAL_S = 1.0
EVICT_LOG_INTERVAL_S = 60.0
SQLITE_FULL = 13


@dataclass(frozen=True)
class OutboxMessage:
    seq: int
    kind: Kind
    priority: int
    created_ms: int
    payload: bytes


@dataclass(frozen=True)
class KindStats:
    messages: int
    bytes: int
    oldest_age_ms: int | None
    dropped: int


@dataclass(frozen=True)
class OutboxStats:
    kinds: dict[str, KindStats]
    messages: int
    bytes: int
    dropped: int
    max_bytes: int
    file_bytes: int
    storage_full: bool


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _outbox_kind(kind: Kind | int) -> Kind:
    kind = Kind(kind)
    if kind not in OUTBOX_KINDS:
        raise OutboxError(f"kind {kind.name.lower()} is not sent from a device outbox")
    return kind


def _free_bytes(directory: Path) -> int:
    try:
        fs = os.statvfs(directory)
    except OSError:
        return 0
    return fs.f_bavail * fs.f_frsize


def _is_full(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code == SQLITE_FULL or "full" in str(exc).lower()


# --- schema ----------------------------------------------------------------------------


def _m001_initial(db: sqlite_utils.Database) -> None:
    db["messages"].create(  # type: ignore[union-attr]
        {
            "seq": int,
            "priority": int,
            "kind": int,
            "created_ms": int,
            "size": int,
            "payload": bytes,
        },
        pk="seq",
        not_null={"priority", "kind", "created_ms", "size", "payload"},
    )
    # Read order is ORDER BY priority, seq: index exactly that, so a pop is a seek, not a sort.
    db["messages"].create_index(["priority", "seq"], index_name="messages_order")  # type: ignore[union-attr]
    # Eviction and TTL walk one kind oldest first.
    db["messages"].create_index(["kind", "seq"], index_name="messages_kind")  # type: ignore[union-attr]
    db["counters"].create({"name": str, "value": int}, pk="name", not_null={"value"})  # type: ignore[union-attr]
    db["state"].create({"key": str, "value": str}, pk="key", not_null={"value"})  # type: ignore[union-attr]


MIGRATIONS: tuple[tuple[str, Callable[[sqlite_utils.Database], None]], ...] = (
    ("001_initial", _m001_initial),
)


def _migrate(conn: sqlite3.Connection) -> None:
    """Apply pending migrations, each recorded in `_migrations` in its own transaction."""
    db = sqlite_utils.Database(conn)
    conn.execute(
        "CREATE TABLE IF NOT EXISTS _migrations "
        "(name TEXT PRIMARY KEY, applied_ms INTEGER NOT NULL)"
    )
    done = {row[0] for row in conn.execute("SELECT name FROM _migrations")}
    for name, apply in MIGRATIONS:
        if name in done:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            apply(db)
            conn.execute("INSERT INTO _migrations VALUES (?, ?)", (name, _now_ms()))
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


# --- the outbox --------------------------------------------------------------------------


class _Op:
    """One request to the writer thread; `wait()` returns once its transaction committed.

    A pre-acquired lock is the cheapest hand-off CPython has: with dozens of producers a
    Future's condition variable costs more than the fsync they share.
    """

    __slots__ = ("_done", "_error", "_lock", "_result", "args", "name")

    def __init__(self, name: str, args: tuple[Any, ...]) -> None:
        self.name = name
        self.args = args
        self._lock = threading.Lock()
        self._lock.acquire()
        self._done = False
        self._result: Any = None
        self._error: BaseException | None = None

    def settle(self, result: Any = None, error: BaseException | None = None) -> None:
        if self._done:
            return
        self._done = True
        self._result, self._error = result, error
        self._lock.release()

    def wait(self) -> Any:
        self._lock.acquire()
        if self._error is not None:
            raise self._error
        return self._result


class _AsyncOp(_Op):
    """An enqueue from a coroutine: no lock and no thread per producer. The writer seals
    its body in bulk and resolves a whole batch of these with one `call_soon_threadsafe`."""

    __slots__ = ("_sink", "future")

    def __init__(self, args: tuple[Any, ...], future: asyncio.Future[int], sink: list[Any]):
        self.name = "enqueue"
        self.args = args
        self._done = False
        self._result = None
        self._error = None
        self.future = future
        self._sink = sink

    def settle(self, result: Any = None, error: BaseException | None = None) -> None:
        if self._done:
            return
        self._done = True
        self._result, self._error = result, error
        self._sink.append(self)

    def resolve(self) -> None:
        """On the producer's loop."""
        if self.future.done():  # the producer was cancelled; the message may still be stored
            return
        if self._error is not None:
            self.future.set_exception(self._error)
        else:
            self.future.set_result(self._result)


@dataclass(frozen=True)
class _Unsealed:
    """A body the writer seals (async producers hand bodies over unsealed)."""

    body: Any


def _resolve_all(ops: list[_AsyncOp]) -> None:
    for op in ops:
        op.resolve()


class Outbox:
    """Durable priority queue; all public methods are blocking and thread-safe, except
    `enqueue_async`, which is for coroutines on an event loop."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        device_id: str,
        sealer: Sealer,
        max_bytes: int,
        ttl_s: Mapping[Kind, float] | None = None,
        on_evict: Callable[[Kind, int], None] | None = None,
        ballast_bytes: int = BALLAST_BYTES,
    ) -> None:
        if max_bytes < MIN_MAX_BYTES:
            raise OutboxError(f"max_outbox_bytes must be at least {MIN_MAX_BYTES}, got {max_bytes}")
        for kind, ttl in (ttl_s or {}).items():
            if ttl is not None and ttl <= 0:
                raise OutboxError(f"ttl for {Kind(kind).name.lower()} must be positive, got {ttl}")
        self.path = Path(path)
        self.device_id = device_id
        self.max_bytes = max_bytes
        self._sealer = sealer
        self._ttl_s = {int(k): v for k, v in (ttl_s or {}).items()}
        self._on_evict = on_evict
        self._ballast = self.path.with_name(self.path.name + ".ballast")
        self._ballast_bytes = ballast_bytes
        self._budget = policy.row_budget(max_bytes, PAGE_SIZE)
        self._last_evict_log = -EVICT_LOG_INTERVAL_S
        self._evicted_since_log: dict[str, int] = {}
        # One item per hand-off, so that the writer never splits a producer's messages
        # across two transactions (and two fsyncs); None is the stop marker.
        self._queue: queue.SimpleQueue[list[_Op] | None] = queue.SimpleQueue()
        self._read_lock = threading.Lock()
        # Held while checking `_closed` and putting on the queue, and by close() while it
        # sets `_closed` and puts the stop marker: nothing can land behind that marker,
        # where no writer would ever take it and its producer would wait forever.
        self._handoff_lock = threading.Lock()
        self._closed = False
        self._full = False
        self._last_recovery = 0.0
        self._last_maintenance = 0.0
        try:
            self._wconn = self._open_writer()
            self._rconn = _connect(self.path)
        except sqlite3.Error as exc:
            raise OutboxError(f"cannot open outbox {self.path}: {exc}") from exc
        self._load_accounting()
        self._next_seq = self._load_next_seq()
        self._alloc_lock = threading.Lock()
        self._alloc_next = self._next_seq
        self._arrived: dict[int, _Op] = {}
        self._settled_async: list[_AsyncOp] = []  # appended to by the writer thread only
        self._deleted = False
        self._full = not self._ensure_ballast()
        self._thread = threading.Thread(target=self._run, name="outbox-writer", daemon=True)
        self._thread.start()

    # -- opening --------------------------------------------------------------------------

    def _open_writer(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = _connect(self.path)
        # auto_vacuum must be chosen before the first table exists; INCREMENTAL lets a full
        # disk get space back after deletes without a whole-file VACUUM.
        conn.execute(f"PRAGMA page_size={PAGE_SIZE}")
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        conn.execute("PRAGMA journal_mode=WAL")
        # Checkpoint often enough that the WAL stays a small fraction of the budget.
        wal_pages = policy.wal_pages(self.max_bytes, PAGE_SIZE, _free_bytes(self.path.parent))
        conn.execute(f"PRAGMA wal_autocheckpoint={wal_pages}")
        conn.execute(f"PRAGMA journal_size_limit={wal_pages * PAGE_SIZE}")
        _migrate(conn)
        self._page_cap = policy.page_cap(self.max_bytes, PAGE_SIZE)
        conn.execute(f"PRAGMA max_page_count={self._page_cap}")
        return conn

    def _load_accounting(self) -> None:
        """In-memory totals the writer keeps in step with every insert and delete."""
        conn = self._wconn
        self._bytes_by_priority: dict[int, int] = {}
        for priority, count, size in conn.execute(
            "SELECT priority, count(*), total(size) FROM messages GROUP BY priority"
        ):
            self._bytes_by_priority[priority] = int(size) + count * policy.ROW_OVERHEAD_BYTES

    def _load_next_seq(self) -> int:
        """Once, at open: the writer then owns the number (its reorder buffer waits on it)."""
        max_seq = self._wconn.execute("SELECT max(seq) FROM messages").fetchone()[0] or 0
        return max(self._counter(self._wconn, "next_seq"), max_seq + 1, 1)

    @staticmethod
    def _counter(conn: sqlite3.Connection, name: str) -> int:
        row = conn.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    # -- public API -----------------------------------------------------------------------

    def enqueue(self, kind: Kind | int, body: Any, *, created_ms: int | None = None) -> int:
        """Seal and store one message; returns its seq once the commit is durable."""
        return self.enqueue_many([(kind, body)], created_ms=created_ms)[0]

    def enqueue_many(
        self, items: Sequence[tuple[Kind | int, Any]], *, created_ms: int | None = None
    ) -> list[int]:
        """Seal and store several messages with one hand-off to the writer; returns their
        seqs once all are durable. Each message stands alone: if one fails (bad body, full
        outbox) its error is raised after all were settled, and the others may be stored."""
        kinds = [_outbox_kind(kind) for kind, _ in items]
        stamp = _now_ms() if created_ms is None else created_ms
        if self._closed:
            raise OutboxError("the outbox is closed")
        with self._alloc_lock:
            first = self._alloc_next
            self._alloc_next += len(items)
        ops = []
        try:
            for offset, (kind, (_, body)) in enumerate(zip(kinds, items, strict=True)):
                ops.append(self._sealed_op(first + offset, kind, stamp, body))
        finally:
            # Hand every allocated seq over, even after a failure: the writer commits in seq
            # order and would otherwise wait for the missing one forever.
            for seq in range(first + len(ops), first + len(items)):
                interrupted = OutboxError(f"sealing was interrupted before seq {seq}")
                ops.append(_Op("enqueue", (seq, kinds[seq - first], stamp, interrupted)))
            self._hand_over(ops)
        return [int(op.wait()) for op in ops]

    async def enqueue_async(
        self, kind: Kind | int, body: Any, *, created_ms: int | None = None
    ) -> int:
        """`enqueue` for coroutines: returns the seq once durable, without a thread per
        producer. The writer thread seals and commits a whole batch and wakes the loop once
        per batch, so thousands of concurrent producers cost one hand-off each."""
        kind = _outbox_kind(kind)
        stamp = _now_ms() if created_ms is None else created_ms
        if self._closed:
            raise OutboxError("the outbox is closed")
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        with self._alloc_lock:
            seq = self._alloc_next
            self._alloc_next += 1
        with self._handoff_lock:
            if self._closed:
                raise OutboxError("the outbox is closed")
            self._queue.put(
                [_AsyncOp((seq, kind, stamp, _Unsealed(body)), future, self._settled_async)]
            )
        return await future

    def _hand_over(self, ops: list[_Op]) -> None:
        """Queue ops for the writer as one item, so that they share a transaction, or fail
        them all if close() got there first (sealing runs unlocked, so a close can begin
        after the caller's first check)."""
        with self._handoff_lock:
            if not self._closed:
                self._queue.put(ops)
                return
        self._fail(ops, OutboxError("the outbox was closed before this message was stored"))

    def _sealed_op(self, seq: int, kind: Kind, stamp: int, body: Any) -> _Op:
        try:
            sealed: bytes | BaseException = self._sealer(kind, seq, stamp, body)
        except Exception as exc:  # noqa: BLE001 - handed to its producer via the writer
            sealed = exc
        return _Op("enqueue", (seq, kind, stamp, sealed))

    def apply_receipt(self, ranges: Iterable[tuple[int, int]]) -> int:
        """Delete every stored seq inside the inclusive ranges; returns how many went."""
        checked = []
        for item in ranges:
            if not (
                isinstance(item, (tuple, list))
                and len(item) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in item)
            ):
                raise OutboxError(f"receipt range {item!r} must be two integers [first, last]")
            checked.append((item[0], item[1]))
        return int(self._submit("receipt", (checked,)))

    def set_state(self, key: str, value: str) -> None:
        self._submit("state", (key, value))

    def get_state(self, key: str) -> str | None:
        row = self._read("SELECT value FROM state WHERE key = ?", (key,))
        return row[0][0] if row else None

    def pending(self, limit: int, after: tuple[int, int] | None = None) -> list[OutboxMessage]:
        """The next `limit` messages in send order (priority, then seq) after the cursor."""
        if limit <= 0:  # SQLite reads a negative LIMIT as "no limit"
            return []
        cols = "seq, kind, priority, created_ms, payload"
        if after is None:
            rows = self._read(
                f"SELECT {cols} FROM messages ORDER BY priority, seq LIMIT ?",  # noqa: S608
                (limit,),
            )
        else:
            # Two seeks rather than a row-value range, which SQLite turns into a scan of
            # the cursor's whole priority tier.
            priority, seq = after
            rows = self._read(
                f"SELECT {cols} FROM messages WHERE priority = ? AND seq > ? "  # noqa: S608
                "ORDER BY seq LIMIT ?",
                (priority, seq, limit),
            )
            if len(rows) < limit:
                rows += self._read(
                    f"SELECT {cols} FROM messages WHERE priority > ? "  # noqa: S608
                    "ORDER BY priority, seq LIMIT ?",
                    (priority, limit - len(rows)),
                )
        return [OutboxMessage(r[0], Kind(r[1]), r[2], r[3], bytes(r[4])) for r in rows]

    def stats(self) -> OutboxStats:
        now = _now_ms()
        groups = self._read(
            "SELECT kind, count(*), total(size), min(created_ms) FROM messages GROUP BY kind", ()
        )
        dropped = dict(self._read("SELECT name, value FROM counters", ()))
        kinds: dict[str, KindStats] = {}
        by_kind = {kind: (count, size, oldest) for kind, count, size, oldest in groups}
        for kind in OUTBOX_KINDS:
            count, size, oldest = by_kind.get(int(kind), (0, 0, None))
            kinds[kind.name.lower()] = KindStats(
                messages=count,
                bytes=int(size) + count * policy.ROW_OVERHEAD_BYTES,
                oldest_age_ms=None if oldest is None else max(0, now - oldest),
                dropped=int(dropped.get(f"dropped:{kind.name.lower()}", 0)),
            )
        return OutboxStats(
            kinds=kinds,
            messages=sum(k.messages for k in kinds.values()),
            bytes=sum(k.bytes for k in kinds.values()),
            dropped=sum(k.dropped for k in kinds.values()),
            max_bytes=self.max_bytes,
            file_bytes=self._file_bytes(),
            storage_full=self._full,
        )

    def close(self) -> None:
        """Finish queued work, checkpoint the WAL away and close both connections."""
        self._shutdown(checkpoint=True)

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing -------------------------------------------------------------------------

    def _submit(self, name: str, args: tuple[Any, ...]) -> Any:
        if self._closed:
            raise OutboxError("the outbox is closed")
        op = _Op(name, args)
        self._hand_over([op])
        return op.wait()

    def _read(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        if self._closed:
            raise OutboxError("the outbox is closed")
        with self._read_lock:
            try:
                return self._rconn.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise OutboxError(f"outbox read failed: {exc}") from exc

    def _file_bytes(self) -> int:
        total = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):
                total += os.stat(f"{self.path}{suffix}").st_size
        return total

    def _shutdown(self, *, checkpoint: bool) -> None:
        """Stop the writer; without `checkpoint` the files are left as a crash leaves them."""
        with self._handoff_lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self._thread.join()
        self._fail_leftovers()
        if checkpoint:
            with contextlib.suppress(sqlite3.Error):
                self._wconn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        with self._read_lock:  # not under a reader that passed the closed check
            self._rconn.close()
        self._wconn.close()

    def _fail_leftovers(self) -> None:
        """Producers that raced close() must not wait forever for a writer that is gone."""
        closed = OutboxError("the outbox was closed before this message was stored")
        leftovers = list(self._arrived.values())
        self._arrived.clear()
        while True:
            try:
                ops = self._queue.get_nowait()
            except queue.Empty:
                break
            if ops is not None:
                leftovers += ops
        self._fail(leftovers, closed)
        self._wake_async()

    # -- the writer thread ----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=MAINTENANCE_INTERVAL_S)
            except queue.Empty:
                self._maintain()
                continue
            if first is None:
                return
            batch = list(first)
            stop = self._drain_into(batch)
            try:
                self._seal_unsealed(batch)
                self._process(batch)
                self._maintain()
            except Exception as exc:  # a bug here must not leave producers blocked forever
                log.exception("outbox writer failed on a batch")
                self._rollback()
                self._abandon(batch, OutboxError(f"outbox writer failed: {exc}"))
            self._wake_async()
            if stop:
                return

    def _seal_unsealed(self, batch: list[_Op]) -> None:
        """Seal what async producers handed over; a failure belongs to that message alone."""
        for op in batch:
            if op.name == "enqueue" and isinstance(op.args[3], _Unsealed):
                seq, kind, stamp, unsealed = op.args
                try:
                    sealed: bytes | BaseException = self._sealer(kind, seq, stamp, unsealed.body)
                except Exception as exc:  # noqa: BLE001 - handed to its producer
                    sealed = exc
                op.args = (seq, kind, stamp, sealed)

    def _wake_async(self) -> None:
        """One `call_soon_threadsafe` per loop for every async producer settled so far."""
        if not self._settled_async:
            return
        settled, self._settled_async[:] = list(self._settled_async), []
        by_loop: dict[asyncio.AbstractEventLoop, list[_AsyncOp]] = {}
        for op in settled:
            by_loop.setdefault(op.future.get_loop(), []).append(op)
        for loop, ops in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                loop.call_soon_threadsafe(_resolve_all, ops)

    def _abandon(self, batch: list[_Op], exc: OutboxError) -> None:
        """Fail the batch and everything waiting for its turn, and skip past their seqs."""
        waiting = [*batch, *self._arrived.values()]
        self._arrived.clear()
        self._fail(waiting, exc)
        seqs = [op.args[0] for op in waiting if op.name == "enqueue"]
        if seqs:
            self._next_seq = max(self._next_seq, max(seqs) + 1)

    def _drain_into(self, batch: list[_Op]) -> bool:
        """Add queued hand-offs until MAX_BATCH ops; True when the stop marker came.

        A hand-off is never split, so one `enqueue_many` larger than MAX_BATCH is still
        one transaction."""
        while len(batch) < MAX_BATCH:
            try:
                ops = self._queue.get_nowait()
            except queue.Empty:
                return False
            if ops is None:
                return True
            batch += ops
        return False

    def _process(self, batch: list[_Op]) -> None:
        """Run a batch in one transaction; on SQLITE_FULL fall back as the cause demands."""
        self._try_recover()
        enqueues = self._in_seq_order([op for op in batch if op.name == "enqueue"])
        others = [op for op in batch if op.name != "enqueue"]
        if self._full:
            enqueues = self._refuse(enqueues, StorageFull(FULL_MESSAGE))
            others = self._receipts_while_full(others)
        shrinks, truncated = 0, False
        while True:
            try:
                self._transaction(enqueues, others)
                return
            except sqlite3.Error as exc:
                self._rollback()
                if not _is_full(exc):
                    self._refuse(enqueues, OutboxError(f"outbox write failed: {exc}"))
                    self._fail(others, OutboxError(f"outbox write failed: {exc}"))
                    return
                if enqueues and not self._disk_is_full(enqueues):
                    # Rows took more pages than accounted for: shrink the budget, evict more.
                    if shrinks < 20:
                        self._budget = int(self._budget * 0.9)
                        shrinks += 1
                        continue
                    self._count_refused(enqueues)
                    enqueues = self._refuse(enqueues, OutboxFull("outbox is at its page cap"))
                    continue
                if not truncated:
                    # The WAL is the one thing here that gives space back at once.
                    truncated = True
                    self._checkpoint_truncate()
                    continue
                if not enqueues or self._full:
                    self._fail(others, StorageFull("the disk is full even for deletes"))
                    return
                self._enter_full_mode(exc)
                enqueues = self._refuse(enqueues, StorageFull(FULL_MESSAGE))

    def _receipts_while_full(self, others: list[_Op]) -> list[_Op]:
        """Apply receipts in small chunks, giving the space back after each; returns the
        ops left for the ordinary transaction."""
        rest = []
        for op in others:
            if op.name != "receipt":
                rest.append(op)
                continue
            try:
                op.settle(sum(self._delete_chunked(first, last) for first, last in op.args[0]))
            except sqlite3.Error as exc:
                self._rollback()
                self._load_accounting()
                op.settle(error=StorageFull(f"the disk is full even for deletes: {exc}"))
        return rest

    def _delete_chunked(self, first: int, last: int) -> int:
        """A delete dirties a page per row; on a full disk the WAL has only the ballast's room,
        so delete a few rows per transaction and truncate the WAL in between."""
        removed = 0
        while True:
            self._wconn.execute("BEGIN IMMEDIATE")
            rows = self._wconn.execute(
                "DELETE FROM messages WHERE seq IN (SELECT seq FROM messages "
                "WHERE seq BETWEEN ? AND ? ORDER BY seq LIMIT ?) RETURNING priority, size",
                (first, last, FULL_DISK_DELETE_CHUNK),
            ).fetchall()
            self._persist_high_water()
            self._wconn.execute("COMMIT")
            for priority, size in rows:
                cost = policy.row_cost(size)
                self._bytes_by_priority[priority] = self._bytes_by_priority.get(priority, 0) - cost
            removed += len(rows)
            self._compact()
            if len(rows) < FULL_DISK_DELETE_CHUNK:
                return removed

    def _count_refused(self, enqueues: list[_Op]) -> None:
        """Messages refused outside a committed batch still count as dropped."""
        evicted: dict[Kind, int] = {}
        try:
            self._wconn.execute("BEGIN IMMEDIATE")
            for op in enqueues:
                self._bump_dropped(op.args[1], 1, evicted)
            self._wconn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            log.warning("outbox could not count refused messages: %s", exc)
            return
        self._report_evictions(evicted)

    def _refuse(self, enqueues: list[_Op], exc: BaseException) -> list[_Op]:
        """Fail these producers; their seqs are skipped, never reused for anything stored."""
        self._fail(enqueues, exc)
        if enqueues:
            self._next_seq = max(self._next_seq, enqueues[-1].args[0] + 1)
        return []

    def _in_seq_order(self, arrivals: list[_Op]) -> list[_Op]:
        """The contiguous run of seqs from the next expected one; later ones wait."""
        for op in arrivals:
            if op.args[0] < self._next_seq:  # skipped by _abandon while still being sealed
                op.settle(error=OutboxError(f"seq {op.args[0]} was abandoned by the writer"))
            else:
                self._arrived[op.args[0]] = op
        ready = []
        seq = self._next_seq
        while seq in self._arrived:
            ready.append(self._arrived.pop(seq))
            seq += 1
        return ready

    def _transaction(self, enqueues: list[_Op], others: list[_Op]) -> None:
        conn = self._wconn
        snapshot = (dict(self._bytes_by_priority), self._next_seq)
        self._deleted = False
        evicted: dict[Kind, int] = {}
        results: list[tuple[_Op, Any]] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for op in others:
                results.append((op, self._apply_other(op)))
            results += self._insert_all(enqueues, evicted)
            if self._deleted:
                self._persist_high_water()
            conn.execute("COMMIT")
        except BaseException:
            self._bytes_by_priority, self._next_seq = snapshot
            raise
        if enqueues:
            self._calibrate()
        for op, result in results:
            self._settle(op, result)
        self._report_evictions(evicted)
        if self._full:
            self._compact()

    def _persist_high_water(self) -> None:
        """Save the next seq whenever rows go: while nothing is deleted, max(seq) + 1 is the
        same number, so the common all-insert batch skips this write."""
        self._wconn.execute(
            "INSERT OR REPLACE INTO counters VALUES ('next_seq', ?)", (self._next_seq,)
        )

    def _apply_other(self, op: _Op) -> Any:
        if op.name == "receipt":
            return self._delete_ranges(op.args[0])
        if op.name == "state":
            self._wconn.execute("INSERT OR REPLACE INTO state VALUES (?, ?)", op.args)
            return None
        raise AssertionError(op.name)

    def _insert_all(self, enqueues: list[_Op], evicted: dict[Kind, int]) -> list[tuple[_Op, Any]]:
        """Insert sealed messages in one executemany, evicting first where the budget demands.

        Each op's result is its seq, or an exception for that producer alone.
        """
        results: list[tuple[_Op, Any]] = []
        rows: list[tuple[int, int, int, int, int, bytes]] = []
        for op in enqueues:
            seq, kind, created_ms, payload = op.args
            self._next_seq = seq + 1
            if isinstance(payload, BaseException):
                results.append((op, payload))
                continue
            priority, cost = PRIORITY[kind], policy.row_cost(len(payload))
            if self._over_budget(cost):
                self._flush(rows)  # eviction must see every row of this batch so far
                if not self._make_room(cost, priority, evicted):
                    self._bump_dropped(kind, 1, evicted)
                    results.append((op, self._full_error(kind, len(payload))))
                    continue
            rows.append((seq, priority, int(kind), created_ms, len(payload), payload))
            self._bytes_by_priority[priority] = self._bytes_by_priority.get(priority, 0) + cost
            results.append((op, seq))
        self._flush(rows)
        return results

    def _flush(self, rows: list[tuple[int, int, int, int, int, bytes]]) -> None:
        if rows:
            self._wconn.executemany("INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?)", rows)
            rows.clear()

    def _calibrate(self) -> None:
        """Near the limit, scale the byte budget by what the file really uses per byte.

        The per-row overhead is an estimate: rows that fill pages badly (say 2.1 KiB rows in
        4 KiB pages) take twice their size. Only the page count tells, so it steers.
        """
        used = sum(self._bytes_by_priority.values())
        if used < 0.9 * self._budget:
            return
        pages = self._wconn.execute("PRAGMA page_count").fetchone()[0]
        free = self._wconn.execute("PRAGMA freelist_count").fetchone()[0]
        self._budget = policy.calibrated_budget(
            used, (pages - free) * PAGE_SIZE, self.max_bytes, PAGE_SIZE
        )

    def _over_budget(self, cost: int) -> bool:
        return policy.bytes_to_free(sum(self._bytes_by_priority.values()), cost, self._budget) > 0

    def _full_error(self, kind: Kind, size: int) -> OutboxFull:
        return OutboxFull(
            f"outbox full ({self.max_bytes} bytes): no room for a {size}-byte "
            f"{kind.name.lower()} without evicting more urgent messages"
        )

    def _make_room(self, cost: int, priority: int, evicted: dict[Kind, int]) -> bool:
        used = sum(self._bytes_by_priority.values())
        need = policy.bytes_to_free(used, cost, self._budget)
        if need == 0:
            return True
        need += policy.eviction_headroom(self._budget)
        plan = policy.plan_eviction(need, self._bytes_by_priority, priority)
        if plan is None:
            return False
        for tier, amount in plan.items():
            self._evict_oldest(tier, amount, evicted)
        return True

    def _evict_oldest(self, priority: int, amount: int, evicted: dict[Kind, int]) -> None:
        rows = self._wconn.execute(
            "SELECT seq, size + ? FROM messages WHERE priority = ? ORDER BY seq",
            (policy.ROW_OVERHEAD_BYTES, priority),
        )
        last_seq, _count, _freed = policy.oldest_covering(rows, amount)
        rows.close()
        deleted = self._wconn.execute(
            "DELETE FROM messages WHERE priority = ? AND seq <= ? RETURNING kind, size",
            (priority, last_seq),
        ).fetchall()
        self._deleted = True
        self._account_deleted(priority, deleted, evicted)

    def _account_deleted(
        self, priority: int, deleted: list[tuple[int, int]], evicted: dict[Kind, int]
    ) -> None:
        freed = sum(size for _, size in deleted) + len(deleted) * policy.ROW_OVERHEAD_BYTES
        self._bytes_by_priority[priority] = self._bytes_by_priority.get(priority, 0) - freed
        counts: dict[Kind, int] = {}
        for kind, _ in deleted:
            counts[Kind(kind)] = counts.get(Kind(kind), 0) + 1
        for kind, count in counts.items():
            self._bump_dropped(kind, count, evicted)

    def _bump_dropped(self, kind: Kind, count: int, evicted: dict[Kind, int]) -> None:
        self._wconn.execute(
            "INSERT INTO counters VALUES (?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
            (f"dropped:{kind.name.lower()}", count),
        )
        evicted[kind] = evicted.get(kind, 0) + count

    def _delete_ranges(self, ranges: list[tuple[int, int]]) -> int:
        removed = 0
        for first, last in ranges:
            rows = self._wconn.execute(
                "DELETE FROM messages WHERE seq BETWEEN ? AND ? RETURNING priority, size",
                (first, last),
            ).fetchall()
            for priority, size in rows:
                cost = policy.row_cost(size)
                self._bytes_by_priority[priority] = self._bytes_by_priority.get(priority, 0) - cost
            removed += len(rows)
        self._deleted = True
        return removed

    def _settle(self, op: _Op, result: Any) -> None:
        if isinstance(result, BaseException):
            op.settle(error=result)
        else:
            op.settle(result)

    def _fail(self, ops: list[_Op], exc: BaseException) -> None:
        for op in ops:
            op.settle(error=exc)

    def _rollback(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._wconn.execute("ROLLBACK")

    def _report_evictions(self, evicted: dict[Kind, int]) -> None:
        if not evicted:
            return
        for kind, count in evicted.items():
            name = kind.name.lower()
            self._evicted_since_log[name] = self._evicted_since_log.get(name, 0) + count
        if time.monotonic() - self._last_evict_log >= EVICT_LOG_INTERVAL_S:
            # One line a minute at most: a full outbox evicts on every batch.
            log.warning("outbox full, evicted messages: %s", self._evicted_since_log)
            self._last_evict_log = time.monotonic()
            self._evicted_since_log = {}
        if self._on_evict is None:
            return
        for kind, count in evicted.items():
            try:
                self._on_evict(kind, count)
            except Exception:  # a failing callback must not stop the writer
                log.exception("outbox on_evict callback failed")

    # -- TTL, full disk -------------------------------------------------------------------

    def _maintain(self) -> None:
        now = time.monotonic()
        if now - self._last_maintenance < MAINTENANCE_INTERVAL_S:
            return
        self._last_maintenance = now
        self._try_recover()
        cutoffs = policy.expiry_cutoffs(self._ttl_s, _now_ms())
        if not cutoffs:
            return
        evicted: dict[Kind, int] = {}
        try:
            self._wconn.execute("BEGIN IMMEDIATE")
            for kind, cutoff in cutoffs.items():
                deleted = self._wconn.execute(
                    "DELETE FROM messages WHERE kind = ? AND created_ms < ? RETURNING kind, size",
                    (kind, cutoff),
                ).fetchall()
                if deleted:
                    self._account_deleted(PRIORITY[Kind(kind)], deleted, evicted)
            self._persist_high_water()
            self._wconn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            self._load_accounting()
            log.warning("outbox TTL purge failed: %s", exc)
            return
        self._report_evictions(evicted)

    def _disk_is_full(self, enqueues: list[_Op]) -> bool:
        """SQLITE_FULL means the page cap or the file system; only the latter has no room."""
        batch = sum(len(op.args[3]) for op in enqueues if isinstance(op.args[3], bytes))
        return _free_bytes(self.path.parent) < 2 * batch + policy.DISK_MARGIN_BYTES

    def _enter_full_mode(self, exc: sqlite3.Error) -> None:
        """Free the ballast so that deletes and checkpoints have room to work in."""
        if not self._full:
            log.error("outbox storage full, refusing new messages: %s", exc)
        self._full = True
        self._last_recovery = time.monotonic()
        self._ballast.unlink(missing_ok=True)
        self._compact()

    def _compact(self) -> None:
        """Hand freed pages back to the file system while the disk is full."""
        with contextlib.suppress(sqlite3.Error):
            self._wconn.execute("PRAGMA incremental_vacuum")
        self._checkpoint_truncate()

    def _checkpoint_truncate(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._wconn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _try_recover(self) -> None:
        if not self._full or time.monotonic() - self._last_recovery < RECOVERY_INTERVAL_S:
            return
        self._last_recovery = time.monotonic()
        self._compact()
        # Re-reserving the ballast in the very space its release gave back would only fill
        # the disk again: wait until there is room for it and a margin besides.
        if _free_bytes(self.path.parent) < self._ballast_bytes + policy.DISK_MARGIN_BYTES:
            return
        if self._ensure_ballast():
            self._full = False
            log.warning("outbox storage available again, accepting messages")

    def _ensure_ballast(self) -> bool:
        """Reserve `ballast_bytes` of disk; False (and no partial file) when there is none."""
        if self._ballast_bytes <= 0:
            return True
        with contextlib.suppress(OSError):
            if self._ballast.stat().st_size >= self._ballast_bytes:
                return True
        try:
            fd = os.open(self._ballast, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(bytes(self._ballast_bytes))  # real blocks, not a sparse hole
                handle.flush()
                os.fsync(handle.fileno())
        except OSError:
            self._ballast.unlink(missing_ok=True)
            return False
        return True
