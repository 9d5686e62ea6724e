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

from dgdm.sync import migrations_sqlite
from dgdm.sync import outbox_policy as policy
from dgdm.sync.envelope import PRIORITY, Kind
from dgdm.sync.errors import OutboxError, OutboxFull, StorageFull
from dgdm.sync.migrations import SCHEMA_VERSION_TABLE, TooNew, checked, numbered
from dgdm.sync.wallclock import now_ms

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


@dataclass(frozen=True)
class OutboxMigration:
    version: int
    description: str
    apply: Callable[[sqlite_utils.Database], None]


MIGRATIONS = numbered(
    (OutboxMigration(1, "messages in read order and by kind, counters, state", _m001_initial),)
)
# Releases before the numbered scheme recorded the outbox's migrations by name in
# `_migrations`; the version each name stands for (no other name was ever released).
NAMED_VERSIONS = {"001_initial": 1}


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring the outbox up to date (`migrations.TooNew` when a newer release wrote it)."""
    _adopt_named(conn)
    migrations_sqlite.migrate(conn, MIGRATIONS, lambda db, m: m.apply(sqlite_utils.Database(db)))


def _adopt_named(conn: sqlite3.Connection) -> None:
    """A file that records its migrations by name only gets them as versions, with their
    applied_ms, so that none is applied again. `_migrations` is left as it was: should a
    rollback start the release before, it still opens the file."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(SCHEMA_VERSION_TABLE)
        if migrations_sqlite.version(conn) == 0 and migrations_sqlite.has_table(
            conn, "_migrations"
        ):
            named = conn.execute("SELECT name, applied_ms FROM _migrations").fetchall()
            _named_version(name for name, _ in named)  # refuses names it does not know
            for name, applied_ms in named:
                migrations_sqlite.record(conn, MIGRATIONS[NAMED_VERSIONS[name] - 1], applied_ms)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def schema_version(conn: sqlite3.Connection) -> int:
    """The outbox file's schema version, in either scheme; `OutboxError` or
    `migrations.TooNew` when this code does not know it."""
    if migrations_sqlite.has_table(conn, "schema_version"):
        version = migrations_sqlite.version(conn)
        if version:
            return checked(version, MIGRATIONS)
    if migrations_sqlite.has_table(conn, "_migrations"):
        return _named_version(row[0] for row in conn.execute("SELECT name FROM _migrations"))
    return 0


def _named_version(names: Iterable[str]) -> int:
    names = list(names)
    unknown = sorted(set(names) - set(NAMED_VERSIONS))
    if unknown:
        raise OutboxError(f"unknown outbox migrations {unknown}")
    return max((NAMED_VERSIONS[name] for name in names), default=0)


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


# --- the outbox --------------------------------------------------------------------------


class _Waiter:
    """How a blocking producer learns its request's outcome: `wait()` returns (or raises)
    once the writer settled it, after its transaction committed.

    A pre-acquired lock is the cheapest hand-off CPython has: with dozens of producers a
    Future's condition variable costs more than the fsync they share.
    """

    __slots__ = ("_error", "_lock", "_result", "_settled")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self._settled = False
        self._result: Any = None
        self._error: BaseException | None = None

    def settle(self, result: Any = None, error: BaseException | None = None) -> None:
        if self._settled:
            return
        self._settled = True
        self._result, self._error = result, error
        self._lock.release()

    def wait(self) -> Any:
        self._lock.acquire()
        if self._error is not None:
            raise self._error
        return self._result


class _FutureWaiter:
    """A coroutine producer's outcome: no lock and no thread per producer. The writer
    settles it into `sink`; `Outbox._wake_async` resolves a whole batch of them on their
    loop with one `call_soon_threadsafe`."""

    __slots__ = ("_error", "_result", "_settled", "_sink", "future")

    def __init__(self, future: asyncio.Future[int], sink: list[_FutureWaiter]) -> None:
        self.future = future
        self._sink = sink
        self._settled = False
        self._result: Any = None
        self._error: BaseException | None = None

    def settle(self, result: Any = None, error: BaseException | None = None) -> None:
        if self._settled:
            return
        self._settled = True
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


@dataclass(slots=True, eq=False)
class _Enqueue:
    """Store one message under `seq`. The payload is the sealed bytes, the error sealing
    raised (handed to its producer alone), or a body the writer seals itself."""

    seq: int
    kind: Kind
    created_ms: int
    payload: bytes | BaseException | _Unsealed
    waiter: _Waiter | _FutureWaiter


@dataclass(slots=True, frozen=True, eq=False)
class _Receipt:
    """Delete every stored seq inside the inclusive ranges; settles with how many went."""

    ranges: list[tuple[int, int]]
    waiter: _Waiter


@dataclass(slots=True, frozen=True, eq=False)
class _SetState:
    key: str
    value: str
    waiter: _Waiter


_Request = _Enqueue | _Receipt | _SetState
_Other = _Receipt | _SetState


def _resolve_all(waiters: list[_FutureWaiter]) -> None:
    for waiter in waiters:
        waiter.resolve()


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
        self._queue: queue.SimpleQueue[list[_Request] | None] = queue.SimpleQueue()
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
        except (sqlite3.Error, TooNew) as exc:
            raise OutboxError(f"cannot open outbox {self.path}: {exc}") from exc
        self._load_accounting()
        self._next_seq = self._load_next_seq()
        self._alloc_lock = threading.Lock()
        self._alloc_next = self._next_seq
        self._arrived: dict[int, _Enqueue] = {}
        self._settled_async: list[_FutureWaiter] = []  # appended to by the writer thread only
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
        stamp = now_ms() if created_ms is None else created_ms
        if self._closed:
            raise OutboxError("the outbox is closed")
        with self._alloc_lock:
            first = self._alloc_next
            self._alloc_next += len(items)
        requests: list[_Request] = []
        waiters = []
        try:
            for offset, (kind, (_, body)) in enumerate(zip(kinds, items, strict=True)):
                waiter = _Waiter()
                requests.append(self._sealed(first + offset, kind, stamp, body, waiter))
                waiters.append(waiter)
        finally:
            # Hand every allocated seq over, even after a failure: the writer commits in seq
            # order and would otherwise wait for the missing one forever.
            for seq in range(first + len(requests), first + len(items)):
                interrupted = OutboxError(f"sealing was interrupted before seq {seq}")
                waiter = _Waiter()
                requests.append(_Enqueue(seq, kinds[seq - first], stamp, interrupted, waiter))
                waiters.append(waiter)
            self._hand_over(requests)
        return [int(waiter.wait()) for waiter in waiters]

    async def enqueue_async(
        self, kind: Kind | int, body: Any, *, created_ms: int | None = None
    ) -> int:
        """`enqueue` for coroutines: returns the seq once durable, without a thread per
        producer. The writer thread seals and commits a whole batch and wakes the loop once
        per batch, so thousands of concurrent producers cost one hand-off each."""
        kind = _outbox_kind(kind)
        stamp = now_ms() if created_ms is None else created_ms
        if self._closed:
            raise OutboxError("the outbox is closed")
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        with self._alloc_lock:
            seq = self._alloc_next
            self._alloc_next += 1
        with self._handoff_lock:
            if self._closed:
                raise OutboxError("the outbox is closed")
            waiter = _FutureWaiter(future, self._settled_async)
            self._queue.put([_Enqueue(seq, kind, stamp, _Unsealed(body), waiter)])
        return await future

    def _hand_over(self, requests: list[_Request]) -> None:
        """Queue requests for the writer as one item, so that they share a transaction, or
        fail them all if close() got there first (sealing runs unlocked, so a close can
        begin after the caller's first check)."""
        with self._handoff_lock:
            if not self._closed:
                self._queue.put(requests)
                return
        self._fail(requests, OutboxError("the outbox was closed before this message was stored"))

    def _sealed(self, seq: int, kind: Kind, stamp: int, body: Any, waiter: _Waiter) -> _Enqueue:
        try:
            sealed: bytes | BaseException = self._sealer(kind, seq, stamp, body)
        except Exception as exc:  # noqa: BLE001 - handed to its producer via the writer
            sealed = exc
        return _Enqueue(seq, kind, stamp, sealed, waiter)

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
        return int(self._submit(_Receipt(checked, _Waiter())))

    def set_state(self, key: str, value: str) -> None:
        self._submit(_SetState(key, value, _Waiter()))

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
        now = now_ms()
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

    def _submit(self, request: _Other) -> Any:
        if self._closed:
            raise OutboxError("the outbox is closed")
        self._hand_over([request])
        return request.waiter.wait()

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
        leftovers: list[_Request] = list(self._arrived.values())
        self._arrived.clear()
        while True:
            try:
                requests = self._queue.get_nowait()
            except queue.Empty:
                break
            if requests is not None:
                leftovers += requests
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

    def _seal_unsealed(self, batch: list[_Request]) -> None:
        """Seal what async producers handed over; a failure belongs to that message alone."""
        for request in batch:
            if isinstance(request, _Enqueue) and isinstance(request.payload, _Unsealed):
                try:
                    request.payload = self._sealer(
                        request.kind, request.seq, request.created_ms, request.payload.body
                    )
                except Exception as exc:  # noqa: BLE001 - handed to its producer
                    request.payload = exc

    def _wake_async(self) -> None:
        """One `call_soon_threadsafe` per loop for every async producer settled so far."""
        if not self._settled_async:
            return
        settled, self._settled_async[:] = list(self._settled_async), []
        by_loop: dict[asyncio.AbstractEventLoop, list[_FutureWaiter]] = {}
        for waiter in settled:
            by_loop.setdefault(waiter.future.get_loop(), []).append(waiter)
        for loop, waiters in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                loop.call_soon_threadsafe(_resolve_all, waiters)

    def _abandon(self, batch: list[_Request], exc: OutboxError) -> None:
        """Fail the batch and everything waiting for its turn, and skip past their seqs."""
        waiting = [*batch, *self._arrived.values()]
        self._arrived.clear()
        self._fail(waiting, exc)
        seqs = [request.seq for request in waiting if isinstance(request, _Enqueue)]
        if seqs:
            self._next_seq = max(self._next_seq, max(seqs) + 1)

    def _drain_into(self, batch: list[_Request]) -> bool:
        """Add queued hand-offs until MAX_BATCH requests; True when the stop marker came.

        A hand-off is never split, so one `enqueue_many` larger than MAX_BATCH is still
        one transaction."""
        while len(batch) < MAX_BATCH:
            try:
                requests = self._queue.get_nowait()
            except queue.Empty:
                return False
            if requests is None:
                return True
            batch += requests
        return False

    def _process(self, batch: list[_Request]) -> None:
        """Run a batch in one transaction; on SQLITE_FULL fall back as the cause demands
        (`outbox_policy.after_write_error` decides, this executes)."""
        self._try_recover()
        enqueues = self._in_seq_order([r for r in batch if isinstance(r, _Enqueue)])
        others = [r for r in batch if not isinstance(r, _Enqueue)]
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
                error = exc
            step = policy.after_write_error(
                sqlite_full=_is_full(error),
                has_messages=bool(enqueues),
                disk_has_room=bool(enqueues) and not self._disk_is_full(enqueues),
                shrinks=shrinks,
                wal_truncated=truncated,
                full_mode=self._full,
            )
            if step is policy.WriteFallback.FAIL_ALL:
                self._refuse(enqueues, OutboxError(f"outbox write failed: {error}"))
                self._fail(others, OutboxError(f"outbox write failed: {error}"))
                return
            if step is policy.WriteFallback.SHRINK_BUDGET:
                self._budget = int(self._budget * policy.BUDGET_SHRINK)
                shrinks += 1
            elif step is policy.WriteFallback.REFUSE_AT_PAGE_CAP:
                self._count_refused(enqueues)
                enqueues = self._refuse(enqueues, OutboxFull("outbox is at its page cap"))
            elif step is policy.WriteFallback.TRUNCATE_WAL:
                truncated = True
                self._checkpoint_truncate()
            elif step is policy.WriteFallback.FAIL_OTHERS:
                self._fail(others, StorageFull("the disk is full even for deletes"))
                return
            else:
                self._enter_full_mode(error)
                enqueues = self._refuse(enqueues, StorageFull(FULL_MESSAGE))

    def _receipts_while_full(self, others: list[_Other]) -> list[_Other]:
        """Apply receipts in small chunks, giving the space back after each; returns the
        requests left for the ordinary transaction."""
        rest: list[_Other] = []
        for request in others:
            if not isinstance(request, _Receipt):
                rest.append(request)
                continue
            try:
                removed = sum(self._delete_chunked(first, last) for first, last in request.ranges)
                request.waiter.settle(removed)
            except sqlite3.Error as exc:
                self._rollback()
                self._load_accounting()
                full = StorageFull(f"the disk is full even for deletes: {exc}")
                request.waiter.settle(error=full)
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

    def _count_refused(self, enqueues: list[_Enqueue]) -> None:
        """Messages refused outside a committed batch still count as dropped."""
        evicted: dict[Kind, int] = {}
        try:
            self._wconn.execute("BEGIN IMMEDIATE")
            for request in enqueues:
                self._bump_dropped(request.kind, 1, evicted)
            self._wconn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            log.warning("outbox could not count refused messages: %s", exc)
            return
        self._report_evictions(evicted)

    def _refuse(self, enqueues: list[_Enqueue], exc: BaseException) -> list[_Enqueue]:
        """Fail these producers; their seqs are skipped, never reused for anything stored."""
        self._fail(enqueues, exc)
        if enqueues:
            self._next_seq = max(self._next_seq, enqueues[-1].seq + 1)
        return []

    def _in_seq_order(self, arrivals: list[_Enqueue]) -> list[_Enqueue]:
        """The contiguous run of seqs from the next expected one; later ones wait."""
        for request in arrivals:
            if request.seq < self._next_seq:  # skipped by _abandon while still being sealed
                abandoned = OutboxError(f"seq {request.seq} was abandoned by the writer")
                request.waiter.settle(error=abandoned)
            else:
                self._arrived[request.seq] = request
        ready = []
        seq = self._next_seq
        while seq in self._arrived:
            ready.append(self._arrived.pop(seq))
            seq += 1
        return ready

    def _transaction(self, enqueues: list[_Enqueue], others: list[_Other]) -> None:
        conn = self._wconn
        snapshot = (dict(self._bytes_by_priority), self._next_seq)
        self._deleted = False
        evicted: dict[Kind, int] = {}
        results: list[tuple[_Request, Any]] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for request in others:
                results.append((request, self._apply_other(request)))
            results += self._insert_all(enqueues, evicted)
            if self._deleted:
                self._persist_high_water()
            conn.execute("COMMIT")
        except BaseException:
            self._bytes_by_priority, self._next_seq = snapshot
            raise
        if enqueues:
            self._calibrate()
        for done, result in results:
            self._settle(done, result)
        self._report_evictions(evicted)
        if self._full:
            self._compact()

    def _persist_high_water(self) -> None:
        """Save the next seq whenever rows go: while nothing is deleted, max(seq) + 1 is the
        same number, so the common all-insert batch skips this write."""
        self._wconn.execute(
            "INSERT OR REPLACE INTO counters VALUES ('next_seq', ?)", (self._next_seq,)
        )

    def _apply_other(self, request: _Other) -> Any:
        if isinstance(request, _Receipt):
            return self._delete_ranges(request.ranges)
        self._wconn.execute(
            "INSERT OR REPLACE INTO state VALUES (?, ?)", (request.key, request.value)
        )
        return None

    def _insert_all(
        self, enqueues: list[_Enqueue], evicted: dict[Kind, int]
    ) -> list[tuple[_Request, Any]]:
        """Insert sealed messages in one executemany, evicting first where the budget demands.

        Each op's result is its seq, or an exception for that producer alone.
        """
        results: list[tuple[_Request, Any]] = []
        rows: list[tuple[int, int, int, int, int, bytes]] = []
        for request in enqueues:
            seq, kind, payload = request.seq, request.kind, request.payload
            self._next_seq = seq + 1
            if not isinstance(payload, bytes):  # sealing failed (the writer sealed the rest)
                results.append((request, payload))
                continue
            priority, cost = PRIORITY[kind], policy.row_cost(len(payload))
            if self._over_budget(cost):
                self._flush(rows)  # eviction must see every row of this batch so far
                if not self._make_room(cost, priority, evicted):
                    self._bump_dropped(kind, 1, evicted)
                    results.append((request, self._full_error(kind, len(payload))))
                    continue
            rows.append((seq, priority, int(kind), request.created_ms, len(payload), payload))
            self._bytes_by_priority[priority] = self._bytes_by_priority.get(priority, 0) + cost
            results.append((request, seq))
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

    def _settle(self, request: _Request, result: Any) -> None:
        if isinstance(result, BaseException):
            request.waiter.settle(error=result)
        else:
            request.waiter.settle(result)

    def _fail(self, requests: Sequence[_Request], exc: BaseException) -> None:
        for request in requests:
            request.waiter.settle(error=exc)

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
        cutoffs = policy.expiry_cutoffs(self._ttl_s, now_ms())
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

    def _disk_is_full(self, enqueues: list[_Enqueue]) -> bool:
        """SQLITE_FULL means the page cap or the file system; only the latter has no room."""
        batch = sum(len(r.payload) for r in enqueues if isinstance(r.payload, bytes))
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
