"""The coordinator's PostgreSQL store: the `Store` protocol on psycopg 3 and psycopg_pool,
for several coordinator replicas sharing one database (SPEC §7.1).

Semantics are SqliteStore's: a batch is one transaction (a receipt is published only after
its commit), messages are unique by (device_id, kind, seq) and a duplicate is counted,
ignored and still receipted. What replicas add:

- Each batch first locks the rows of the devices it touches, in device-id order (so two
  replicas never deadlock), and takes their receipt seqs there with
  `UPDATE ... down_seq = down_seq + 1 RETURNING`: one counter per device in the database,
  so two replicas never hand out the same down-seq. The lock also orders a device's rows:
  a batch that touches a device waits for the one before it to commit, so `messages.id`
  grows in commit order per device and a `results_since` cursor never skips a row that
  committed late.
- A replica's registry sees another's enrolments by polling `public_keys()` every 5 s
  (Registry.REFRESH_S): one index-free scan of the small devices table.
- PostgreSQL going away raises `StoreUnavailable` within `timeout_s` instead of hanging
  (connect timeout, TCP keepalives and user timeout, a statement timeout); the pool checks
  a connection before lending it and reconnects by itself when the server is back.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg
from psycopg import errors
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from dgdm.sync.coordinator import jobs_store
from dgdm.sync.coordinator.migrations import migrate_postgres
from dgdm.sync.coordinator.store import (
    QUARANTINE_PER_DEVICE,
    VIEW_COLUMNS,
    Incoming,
    Quarantined,
    StoreJobs,
    StoreResult,
    command_row,
    command_view,
    device_view_row,
    quarantine_row,
    split_batch,
    view_filters,
)
from dgdm.sync.coordinator.stores import StoreUnavailable
from dgdm.sync.coordinator.tags import merged
from dgdm.sync.envelope import Kind
from dgdm.sync.errors import ConfigError
from dgdm.sync.wallclock import now_ms

if TYPE_CHECKING:
    from typing_extensions import LiteralString


T = TypeVar("T")
BIGINT_MAX = 2**63 - 1
# A batch that lost a deadlock or serialisation race is simply run again (it is all or
# nothing); more than a few losses in a row means something else is wrong.
RETRIES = 3

# Ingest goes through COPY into a per-connection staging table, then one INSERT ... ON
# CONFLICT DO NOTHING: measured 1.5-2x faster than an unnest() of arrays or executemany()
# in a pipeline for batches of 500 (README). ON COMMIT DELETE ROWS empties it every batch.
_STAGING = (
    "CREATE TEMP TABLE IF NOT EXISTS incoming (device_id text, kind smallint, seq bigint,"
    " created_ms bigint, received_ms bigint, body text) ON COMMIT DELETE ROWS"
)
_COPY = "COPY incoming (device_id, kind, seq, created_ms, received_ms, body) FROM STDIN"
# Sorted: every replica inserts conflicting keys in one order. The rows really inserted
# (not the duplicates) add their bytes to their device's stored_bytes (the quota's count,
# as SqliteStore keeps it: once per transaction, not a trigger per row); the rows stored.
_INSERT = (
    "WITH ins AS (INSERT INTO messages (device_id, kind, seq, created_ms, received_ms, body)"
    " SELECT * FROM incoming ORDER BY device_id, kind, seq ON CONFLICT DO NOTHING"
    " RETURNING device_id, octet_length(body) AS bytes),"
    " per AS (SELECT device_id, sum(bytes) AS bytes, count(*) AS n FROM ins GROUP BY device_id),"
    " upd AS (UPDATE devices AS d SET stored_bytes = d.stored_bytes + per.bytes FROM per"
    " WHERE d.device_id = per.device_id)"
    " SELECT coalesce(sum(n), 0) FROM per"
)
_INSERT_ONE = (
    "INSERT INTO messages (device_id, kind, seq, created_ms, received_ms, body)"
    " VALUES (%s, %s, %s, %s, %s, '{}') ON CONFLICT DO NOTHING"
)
_ADD_BYTES = "UPDATE devices SET stored_bytes = stored_bytes + %s WHERE device_id = %s"
# A page of messages deleted, and their bytes taken off their devices; (rows, bytes).
# SKIP LOCKED: two replicas' housekeeping take different pages instead of queueing.
_DELETE_PAGE = (
    "WITH del AS (DELETE FROM messages WHERE id IN (SELECT id FROM messages {where}"
    " FOR UPDATE SKIP LOCKED) RETURNING device_id, octet_length(body) AS bytes),"
    " per AS (SELECT device_id, sum(bytes) AS bytes, count(*) AS n FROM del GROUP BY device_id),"
    " upd AS (UPDATE devices AS d SET stored_bytes = greatest(0, d.stored_bytes - per.bytes)"
    " FROM per WHERE d.device_id = per.device_id)"
    " SELECT coalesce(sum(n), 0), coalesce(sum(bytes), 0) FROM per"
)
# Lock in device-id order, then touch and allocate each device's receipt seq.
_LOCK_TOUCH_SEQ = (
    "WITH locked AS (SELECT device_id FROM devices WHERE device_id = ANY(%s)"
    " ORDER BY device_id FOR UPDATE)"
    " UPDATE devices AS d SET last_seen_ms = %s,"
    " first_seen_ms = coalesce(d.first_seen_ms, %s), down_seq = d.down_seq + 1"
    " FROM locked WHERE d.device_id = locked.device_id RETURNING d.device_id, d.down_seq"
)
# Capped per device (the device's row is locked by then, so replicas cannot overshoot).
_QUARANTINE = (
    "INSERT INTO quarantine (device_id, kind, seq, reason, received_ms, sample)"
    " SELECT %s, %s, %s, %s, %s, %s WHERE"
    " (SELECT count(*) FROM quarantine WHERE device_id = %s) < %s"
)
_PASSWORD_REFUSED = ("password authentication failed", "no password supplied")
_MESSAGE_COLUMNS = "SELECT id, kind, seq, created_ms, received_ms, body FROM messages"
# SqliteStore's device view with lateral joins: one index lookup per device and kind. The
# last telemetry sample is cut out in SQL, except from a body with any \u escape (the
# stored text is ASCII JSON, so that is rare): PostgreSQL's json parser refuses some
# (\u0000, a lone surrogate), and such a body must not fail the whole fleet list, so it
# is parsed here instead. strpos is a plain byte search, far cheaper than a regex.
_UNPARSABLE = r"strpos(m.body, '\u') > 0"
_PG_VIEWS = (
    f"SELECT {VIEW_COLUMNS}, t.tags, tel.sample, tel.body AS telemetry, al.seq AS alert_seq,"  # noqa: S608
    " al.created_ms AS alert_created_ms, al.received_ms AS alert_received_ms,"
    " al.body AS alert_body FROM devices d"
    " LEFT JOIN LATERAL (SELECT json_object_agg(key, value) AS tags FROM device_tags"
    "  WHERE device_id = d.device_id) t ON true"
    f" LEFT JOIN LATERAL (SELECT CASE WHEN {_UNPARSABLE} THEN m.body END AS body,"
    f"  CASE WHEN NOT {_UNPARSABLE} THEN (m.body::json -> 'samples' -> -1)::text END"
    "  AS sample FROM messages m WHERE m.device_id = d.device_id"
    f"  AND m.kind = {int(Kind.TELEMETRY)} ORDER BY m.id DESC LIMIT 1) tel ON true"
    " LEFT JOIN LATERAL (SELECT seq, created_ms, received_ms, body FROM messages m"
    f"  WHERE m.device_id = d.device_id AND m.kind = {int(Kind.ALERT)}"
    "  ORDER BY m.id DESC LIMIT 1) al ON true"
    " {where} ORDER BY d.device_id"
)


class PgStore(StoreJobs):
    def __init__(
        self,
        conninfo: str,
        password: str | None = None,
        *,
        timeout_s: float = 5.0,
        pool_size: int = 2,
        display: str | None = None,
    ) -> None:
        """`conninfo` is a libpq URL or key=value string without a password; `display` is
        how errors and repr name the store (the URL: it never holds the password)."""
        self._display = display or "the PostgreSQL store"
        self._password = password
        seconds = max(1, math.ceil(timeout_s))
        kwargs: dict[str, Any] = {
            "connect_timeout": seconds,
            "keepalives": 1,
            "keepalives_idle": seconds,
            "keepalives_interval": 1,
            "keepalives_count": 3,
            "tcp_user_timeout": seconds * 1000,
            "options": f"-c statement_timeout={max(30, 6 * seconds) * 1000}",
            "application_name": "dgdm-coordinator",
        }
        if password is not None:
            kwargs["password"] = password
        with self._connect_for_startup(conninfo, kwargs) as conn:
            try:
                self.schema_version = migrate_postgres(conn)
            except errors.InsufficientPrivilege as exc:
                raise ConfigError(
                    "store.url",
                    f"{self._display}: the schema needs migrating but this role may not "
                    f"create tables ({self._scrub(exc)}); open the store once as its owner",
                ) from exc
            try:
                _configure(conn)  # as every pooled connection will: refused now, not later
            except errors.InsufficientPrivilege as exc:
                raise ConfigError(
                    "store.url",
                    f"{self._display}: this role may not create the temporary staging table "
                    f"({self._scrub(exc)}); GRANT TEMPORARY ON DATABASE to it",
                ) from exc
        self._pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            conninfo,
            kwargs=kwargs,
            min_size=1,
            max_size=pool_size,
            timeout=timeout_s,
            reconnect_timeout=timeout_s,
            check=ConnectionPool.check_connection,
            configure=_configure,
            name="dgdm-store",
            open=False,
        )
        self._pool.open(wait=False)

    def __repr__(self) -> str:
        return f"PgStore({self._display})"

    def close(self) -> None:
        self._pool.close()

    def ping(self) -> None:
        """For /healthz: one round trip, or StoreUnavailable within `timeout_s`."""
        with self._tx() as conn:
            conn.execute("SELECT 1")

    # -- start-up ----------------------------------------------------------------------

    def _connect_for_startup(self, conninfo: str, kwargs: dict[str, Any]) -> Any:
        """One direct connection, so that a bad URL or password is told apart (SPEC §7.1:
        exit 2 naming `store.url` or `store.password`) instead of a pool timing out."""
        try:
            return psycopg.connect(conninfo, **kwargs)
        except psycopg.OperationalError as exc:
            raise self._startup_error(exc) from None

    def _startup_error(self, exc: psycopg.OperationalError) -> ConfigError:
        # libpq reports a failed connection without a SQLSTATE, so the server's (English,
        # the lc_messages default) sentence is what tells the cases apart.
        reason = self._scrub(exc)
        if any(s in reason for s in _PASSWORD_REFUSED):
            return ConfigError("store.password", f"refused by {self._display}: {reason}")
        if "does not exist" in reason:
            return ConfigError("store.url", f"{self._display}: {reason}")
        return ConfigError("store.url", f"cannot connect to {self._display}: {reason}")

    def _scrub(self, exc: BaseException) -> str:
        """The server's reason on one line, without the password should it ever echo it."""
        text = " ".join(str(exc).split())
        text = text.rsplit(" failed: ", 1)[-1]
        if self._password:
            text = text.replace(self._password, "***")
        return text

    # -- plumbing ----------------------------------------------------------------------

    @contextlib.contextmanager
    def _tx(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection in a transaction, committed when the block ends."""
        try:
            with self._pool.connection() as conn:
                yield conn
        except errors.TransactionRollback:
            raise
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(f"{self._display} is unavailable: {self._scrub(exc)}") from exc

    def _retrying(self, fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        for attempt in range(RETRIES):
            try:
                with self._tx() as conn:
                    return fn(conn)
            except errors.TransactionRollback:
                if attempt == RETRIES - 1:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _rows(self, sql: str, params: tuple[Any, ...]) -> list[dict[str, Any]]:
        with self._tx() as conn, conn.cursor(row_factory=dict_row) as cur:
            cur.execute(sql, params)
            return cur.fetchall()

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
        given become the device's tags, replacing any."""

        def run(conn: psycopg.Connection[Any]) -> None:
            conn.execute(
                "INSERT INTO devices (device_id, public_key, added_ms, plaintext_telemetry)"
                " VALUES (%s, %s, %s, %s) ON CONFLICT (device_id) DO UPDATE SET"
                " public_key = excluded.public_key,"
                " plaintext_telemetry = excluded.plaintext_telemetry",
                (device_id, public_key, now_ms(), int(plaintext_telemetry)),
            )
            if tags is not None:
                _write_tags(conn, device_id, dict(tags))

        self._retrying(run)

    # -- tags (as SqliteStore; the device's row is locked, so two writers queue) ---------

    def tag(self, device_id: str, add: Mapping[str, str], *, replace: bool = False) -> bool:
        def run(conn: psycopg.Connection[Any]) -> bool:
            if not _lock_device(conn, device_id):
                return False
            current = {} if replace else _device_tags(conn, device_id)
            _write_tags(conn, device_id, merged(current, add))
            return True

        return self._retrying(run)

    def untag(self, device_id: str, keys: Iterable[str]) -> bool:
        def run(conn: psycopg.Connection[Any]) -> bool:
            if not _lock_device(conn, device_id):
                return False
            conn.execute(
                "DELETE FROM device_tags WHERE device_id = %s AND key = ANY(%s)",
                (device_id, list(keys)),
            )
            return True

        return self._retrying(run)

    def tags(self) -> dict[str, dict[str, str]]:
        found: dict[str, dict[str, str]] = {}
        with self._tx() as conn:
            rows = conn.execute(
                "SELECT device_id, key, value FROM device_tags ORDER BY device_id, key"
            ).fetchall()
        for device_id, key, value in rows:
            found.setdefault(device_id, {})[key] = value
        return found

    def device_views(
        self,
        tags: Mapping[str, str] | None = None,
        online: bool | None = None,
        device_id: str | None = None,
    ) -> list[dict[str, Any]]:
        where, params = view_filters(tags, online, device_id, "%s")
        with self._tx() as conn, conn.cursor(row_factory=dict_row) as cur:
            # JIT compiling costs more than this index-driven plan ever runs
            cur.execute("SET LOCAL jit = off")
            cur.execute(_PG_VIEWS.format(where=where), tuple(params))
            rows = cur.fetchall()
        for row in rows:
            body = row.pop("telemetry")
            if body is not None:
                row["sample"] = _last_sample(body)
            alert = [row.pop(f"alert_{k}") for k in ("seq", "created_ms", "received_ms", "body")]
            row["alert"] = None if alert[0] is None else [*alert[:3], json.loads(alert[3])]
        return [device_view_row(r) for r in rows]

    def plaintext_telemetry(self, device_id: str) -> bool:
        with self._tx() as conn:
            row = conn.execute(
                "SELECT plaintext_telemetry FROM devices WHERE device_id = %s AND public_key <> ''",
                (device_id,),
            ).fetchone()
        return bool(row and row[0])

    def devices(self) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM devices ORDER BY device_id", ())

    def device(self, device_id: str) -> dict[str, Any] | None:
        rows = self._rows("SELECT * FROM devices WHERE device_id = %s", (device_id,))
        return rows[0] if rows else None

    def remove_device(self, device_id: str) -> bool:
        """As SqliteStore: the key is cleared (its messages are refused), the row stays."""
        with self._tx() as conn:
            cur = conn.execute(
                "UPDATE devices SET public_key = '', online = 0"
                " WHERE device_id = %s AND public_key <> ''",
                (device_id,),
            )
            return cur.rowcount == 1

    def public_keys(self) -> dict[str, str]:
        with self._tx() as conn:
            rows = conn.execute(
                "SELECT device_id, public_key FROM devices WHERE public_key <> ''"
            ).fetchall()
        return dict(rows)

    def set_quota(self, device_id: str, quota: dict[str, float] | None) -> bool:
        text = json.dumps(quota, separators=(",", ":")) if quota else None
        with self._tx() as conn:
            cursor = conn.execute(
                "UPDATE devices SET quota = %s WHERE device_id = %s", (text, device_id)
            )
        return cursor.rowcount == 1

    def quotas(self) -> dict[str, str]:
        with self._tx() as conn:
            rows = conn.execute(
                "SELECT device_id, quota FROM devices WHERE quota IS NOT NULL"
            ).fetchall()
        return dict(rows)

    def set_status(self, device_id: str, status: dict[str, Any], now_ms: int) -> None:
        online = 1 if status.get("state") == "online" else 0
        with self._tx() as conn:
            conn.execute(
                "UPDATE devices SET online = %s, status_ms = %s, agent_version = %s,"
                " backend = %s, first_seen_ms = coalesce(first_seen_ms, %s), last_seen_ms = %s"
                " WHERE device_id = %s",
                (
                    online,
                    _bigint_or_none(status.get("ts_ms")),
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
        """As SqliteStore.store_batch: one transaction; an item failing SqliteStore's row
        checks (64-bit range, storable JSON) is quarantined alone. After those checks
        PostgreSQL has nothing left to refuse (bigints, ASCII JSON text), so a database
        error fails the whole batch: nothing is receipted and the devices resend it."""
        given = list(quarantine)
        rows, replies, refused, devices = split_batch(items, now_ms, given)
        held = given + refused

        def run(conn: psycopg.Connection[Any]) -> StoreResult:
            seqs = conn.execute(_LOCK_TOUCH_SEQ, (devices, now_ms, now_ms)).fetchall()
            stored = 0
            if rows:
                with conn.cursor() as cur:
                    with cur.copy(_COPY) as copy:
                        for row in rows:
                            copy.write_row(row)
                    stored = int(_first(cur.execute(_INSERT)))
            stored += self._store_replies(conn, replies, now_ms)
            if held:
                with conn.cursor() as cur:
                    cur.executemany(
                        _QUARANTINE,
                        [
                            (*quarantine_row(q, now_ms), q.device_id, QUARANTINE_PER_DEVICE)
                            for q in held
                        ],
                    )
            duplicates = len(items) - len(refused) - stored
            return StoreResult(stored, duplicates, dict(seqs), tuple(held))

        return self._retrying(run)

    @staticmethod
    def _store_replies(
        conn: psycopg.Connection[Any], replies: list[tuple[Incoming, str]], now_ms: int
    ) -> int:
        """A reply is stored with its command; a second copy of the same reply is a duplicate."""
        stored = 0
        for item, text in replies:
            cur = conn.execute(
                _INSERT_ONE, (item.device_id, int(item.kind), item.seq, item.created_ms, now_ms)
            )
            if cur.rowcount != 1:
                continue
            stored += 1
            conn.execute(_ADD_BYTES, (len("{}"), item.device_id))
            conn.execute(
                "UPDATE commands SET reply = %s, replied_ms = %s"
                " WHERE device_id = %s AND seq = %s AND reply IS NULL",  # the first reply wins
                (text, now_ms, item.device_id, _bigint_or_none(item.body.get("cmd_seq"))),
            )
        return stored

    # -- housekeeping (housekeeping.py; SqliteStore's methods, in small transactions) ----

    def prune(self, kind: Kind, older_than_ms: int, limit: int) -> int:
        """Delete up to `limit` of the oldest `kind` messages received before
        `older_than_ms` (Kind.COMMAND: commands created before it); the count deleted."""
        if kind is Kind.COMMAND:
            with self._tx() as conn:
                return conn.execute(
                    "DELETE FROM commands WHERE (device_id, seq) IN (SELECT device_id, seq"
                    " FROM commands WHERE created_ms < %s ORDER BY created_ms DESC LIMIT %s"
                    " FOR UPDATE SKIP LOCKED)",
                    (older_than_ms, limit),
                ).rowcount
        where = "WHERE kind = %s AND received_ms < %s ORDER BY received_ms LIMIT %s"
        return self._delete_page(where, (int(kind), older_than_ms, limit))[0]

    def prune_quarantine(self, older_than_ms: int, limit: int) -> int:
        with self._tx() as conn:
            return conn.execute(
                "DELETE FROM quarantine WHERE id IN (SELECT id FROM quarantine"
                " WHERE received_ms < %s ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED)",
                (older_than_ms, limit),
            ).rowcount

    def telemetry_page(
        self, after: tuple[int, int], before_ms: int, limit: int
    ) -> list[tuple[int, int, str]]:
        """(received_ms, id, device_id) of telemetry received before `before_ms`, in that
        order, after the cursor `after` = (received_ms, id): the downsampler's reading."""
        with self._tx() as conn:
            rows = conn.execute(
                "SELECT received_ms, id, device_id FROM messages"
                " WHERE kind = %s AND (received_ms, id) > (%s, %s) AND received_ms < %s"
                " ORDER BY received_ms, id LIMIT %s",
                (int(Kind.TELEMETRY), after[0], after[1], before_ms, limit),
            ).fetchall()
        return [(int(r[0]), int(r[1]), str(r[2])) for r in rows]

    def delete_messages(self, ids: list[int]) -> int:
        return self._delete_page("WHERE id = ANY(%s)", (ids,))[0]

    def storage_by_device(self, more_than: int) -> dict[str, int]:
        """Devices whose stored message bytes exceed `more_than`."""
        with self._tx() as conn:
            rows = conn.execute(
                "SELECT device_id, stored_bytes FROM devices WHERE stored_bytes > %s",
                (more_than,),
            ).fetchall()
        return {str(d): int(b) for d, b in rows}

    def prune_device(self, device_id: str, kind: Kind, limit: int) -> tuple[int, int]:
        """Delete the device's `limit` oldest messages of `kind`; (rows, bytes) freed."""
        where = "WHERE device_id = %s AND kind = %s ORDER BY id LIMIT %s"
        return self._delete_page(where, (device_id, int(kind), limit))

    def size_bytes(self) -> int:
        """The database's size on disk (tables, indexes, TOAST; the WAL is the cluster's)."""
        with self._tx() as conn:
            return int(_first(conn.execute("SELECT pg_database_size(current_database())")))

    def _delete_page(self, where: LiteralString, params: tuple[Any, ...]) -> tuple[int, int]:
        sql = _DELETE_PAGE.format(where=where)

        def run(conn: psycopg.Connection[Any]) -> tuple[int, int]:
            row = conn.execute(sql, params).fetchone()
            return (int(row[0]), int(row[1])) if row else (0, 0)

        # An ingest batch locks devices in id order, a page's UPDATE in its own: a rare
        # deadlock between them is run again.
        return self._retrying(run)

    def quarantined(self, device_id: str, limit: int = 100) -> list[dict[str, Any]]:
        rows = self._rows(
            "SELECT kind, seq, reason, received_ms, sample FROM quarantine"
            " WHERE device_id = %s ORDER BY id LIMIT %s",
            (device_id, limit),
        )
        for row in rows:
            row["kind"] = Kind(row["kind"]).name.lower()
        return rows

    # -- commands ----------------------------------------------------------------------

    def new_command(self, device_id: str, body: dict[str, Any], now_ms: int) -> int:
        def run(conn: psycopg.Connection[Any]) -> int:
            row = conn.execute(
                "UPDATE devices SET down_seq = down_seq + 1 WHERE device_id = %s"
                " RETURNING down_seq",
                (device_id,),
            ).fetchone()
            if row is None:
                raise KeyError(device_id)
            conn.execute(
                "INSERT INTO commands (device_id, seq, body, created_ms) VALUES (%s, %s, %s, %s)",
                (device_id, row[0], _dumps(body), now_ms),
            )
            return int(row[0])

        return self._retrying(run)

    def claim_resends(
        self,
        since_ms: int,
        until_ms: int,
        limit: int,
        now_ms: int,
        keep: Callable[[dict[str, Any]], bool],
    ) -> list[dict[str, Any]]:
        """As SqliteStore's. The candidates are locked `SKIP LOCKED`: a replica's round at
        the same moment takes other rows instead of waiting, then skips these once marked."""

        def run(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
            with conn.cursor(row_factory=dict_row) as cur:
                cur.execute(
                    "SELECT device_id, seq, body, created_ms FROM commands"
                    " WHERE reply IS NULL AND created_ms BETWEEN %s AND %s"
                    " AND (resent_ms IS NULL OR resent_ms <= %s)"
                    " ORDER BY created_ms DESC LIMIT %s FOR UPDATE SKIP LOCKED",
                    (since_ms, until_ms, until_ms, limit),
                )
                claimed = [row for row in map(command_row, cur.fetchall()) if keep(row)]
            if not claimed:
                return claimed
            conn.execute(
                "UPDATE commands SET resent_ms = %s FROM unnest(%s::text[], %s::bigint[])"
                " AS claimed (device_id, seq)"
                " WHERE commands.device_id = claimed.device_id AND commands.seq = claimed.seq",
                (now_ms, [r["device_id"] for r in claimed], [r["seq"] for r in claimed]),
            )
            return claimed

        return self._retrying(run)

    def command(self, device_id: str, seq: int) -> dict[str, Any] | None:
        if _bigint_or_none(seq) is None:
            return None
        rows = self._rows(
            "SELECT seq, body, created_ms, reply, replied_ms FROM commands"
            " WHERE device_id = %s AND seq = %s",
            (device_id, seq),
        )
        if not rows:
            return None
        return command_view(rows[0])

    def commands(self, device_id: str, limit: int) -> list[dict[str, Any]]:
        rows = self._rows(
            "SELECT seq, body, created_ms, reply, replied_ms FROM commands"
            " WHERE device_id = %s ORDER BY seq DESC LIMIT %s",
            (device_id, limit),
        )
        return [command_view(r) for r in rows]

    # -- jobs (StoreJobs; each call one transaction, run again if it lost a race) -------

    def _job_tx(self, fn: Callable[..., T], *args: Any, write: bool = True) -> T:
        """`write` is for SqliteStore: here a read's snapshot never waits for a writer."""
        return self._retrying(lambda conn: fn(jobs_store.Tx(conn, jobs_store.POSTGRES), *args))

    # -- queries -----------------------------------------------------------------------

    def telemetry(self, device_id: str, since_ms: int | None, limit: int) -> list[dict[str, Any]]:
        if since_ms is None:
            rows = self._messages(
                f"{_MESSAGE_COLUMNS} WHERE device_id = %s AND kind = %s ORDER BY id DESC LIMIT %s",
                (device_id, int(Kind.TELEMETRY), limit),
            )
            return rows[::-1]
        return self._messages(
            f"{_MESSAGE_COLUMNS} WHERE device_id = %s AND kind = %s AND received_ms >= %s"
            " ORDER BY id LIMIT %s",
            (device_id, int(Kind.TELEMETRY), min(since_ms, BIGINT_MAX), limit),
        )

    def results_since(self, device_id: str, cursor: int, limit: int) -> list[dict[str, Any]]:
        return self._messages(
            f"{_MESSAGE_COLUMNS} WHERE device_id = %s AND kind = %s AND id > %s"
            " ORDER BY id LIMIT %s",
            (device_id, int(Kind.RESULT), min(cursor, BIGINT_MAX), limit),
        )

    def latest(self, device_id: str, kind: Kind, limit: int) -> list[dict[str, Any]]:
        return self._messages(
            f"{_MESSAGE_COLUMNS} WHERE device_id = %s AND kind = %s ORDER BY id DESC LIMIT %s",
            (device_id, int(kind), limit),
        )

    def count(self) -> int:
        with self._tx() as conn:
            row = conn.execute("SELECT count(*) FROM messages").fetchone()
        return int(row[0]) if row else 0

    def _messages(self, sql: str, params: tuple[Any, ...]) -> list[dict[str, Any]]:
        rows = self._rows(sql, params)
        for row in rows:
            row["cursor"] = row.pop("id")
            row["kind"] = Kind(row["kind"]).name.lower()
            row["body"] = json.loads(row["body"])
        return rows


def _first(cur: Any) -> Any:
    """The one value a one-row, one-column statement returns."""
    row = cur.fetchone()
    assert row is not None
    return row[0]


def _lock_device(conn: psycopg.Connection[Any], device_id: str) -> bool:
    sql = "SELECT 1 FROM devices WHERE device_id = %s FOR UPDATE"
    return conn.execute(sql, (device_id,)).fetchone() is not None


def _device_tags(conn: psycopg.Connection[Any], device_id: str) -> dict[str, str]:
    sql = "SELECT key, value FROM device_tags WHERE device_id = %s"
    return dict(conn.execute(sql, (device_id,)).fetchall())


def _write_tags(conn: psycopg.Connection[Any], device_id: str, tags: dict[str, str]) -> None:
    conn.execute("DELETE FROM device_tags WHERE device_id = %s", (device_id,))
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO device_tags (device_id, key, value) VALUES (%s, %s, %s)",
            [(device_id, k, v) for k, v in tags.items()],
        )


def _last_sample(body: str) -> Any:
    """The last sample of a telemetry body (SqliteStore's `$.samples[#-1]`)."""
    loaded = json.loads(body)
    samples = loaded.get("samples") if isinstance(loaded, dict) else None
    return samples[-1] if isinstance(samples, list) and samples else None


def _configure(conn: psycopg.Connection[Any]) -> None:
    """Each pooled connection gets its staging table once (a temp table is per session)."""
    conn.execute(_STAGING)
    conn.commit()


# As SqliteStore's: the same JSON text in both stores.
_dumps = json.JSONEncoder(separators=(",", ":")).encode


def _bigint_or_none(value: Any) -> int | None:
    """A device-supplied integer, or None when it is not one or does not fit a bigint."""
    if (
        isinstance(value, int)
        and not isinstance(value, bool)
        and -BIGINT_MAX <= value <= BIGINT_MAX
    ):
        return value
    return None


def _str_or_none(value: Any) -> str | None:
    return value[:200] if isinstance(value, str) else None
