"""The coordinator stores' migrations (SPEC §7.1 "Schema"), in `dgdm.sync.migrations`'
numbered scheme, and their runners for both dialects.

Whichever process opens a store first applies the missing migrations, in order, inside
one transaction under a lock, so replicas starting together neither race nor apply a
step twice: `pg_advisory_xact_lock` on PostgreSQL (released by the commit), `BEGIN
IMMEDIATE` on SQLite (the write lock). A store whose schema is newer than this code knows
is refused with `SchemaTooNew`.

A new migration is appended to `MIGRATIONS` with its statements for both dialects.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dgdm.sync import migrations_sqlite
from dgdm.sync.errors import ConfigError
from dgdm.sync.migrations import (
    CURRENT_VERSION,
    SCHEMA_VERSION_TABLE,
    TooNew,
    numbered,
    pending,
    version_row,
)
from dgdm.sync.wallclock import now_ms

if TYPE_CHECKING:
    import psycopg
    from typing_extensions import LiteralString


@dataclass(frozen=True)
class AddColumn:
    """A column added after a release; a no-op where it exists already (SQLite has no
    `ADD COLUMN IF NOT EXISTS`, and a file of an older release may have it from its own
    `CREATE TABLE`)."""

    table: str
    column: str
    definition: str
    backfill: str | None = None  # run once, right after the column was added


Step = str | AddColumn


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    sqlite: tuple[Step, ...]
    postgres: tuple[Step, ...]


# Version 1 is the schema SqliteStore created before migrations existed; `IF NOT EXISTS`
# lets such a database adopt it without change.
_MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "devices, messages unique by (device_id, kind, seq), commands",
        sqlite=(
            """CREATE TABLE IF NOT EXISTS devices (
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
            )""",
            """CREATE TABLE IF NOT EXISTS messages (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                device_id TEXT NOT NULL,
                kind INTEGER NOT NULL,
                seq INTEGER NOT NULL,
                created_ms INTEGER NOT NULL,
                received_ms INTEGER NOT NULL,
                body TEXT NOT NULL,
                UNIQUE (device_id, kind, seq)
            )""",
            "CREATE INDEX IF NOT EXISTS messages_by_device_kind ON messages (device_id, kind, id)",
            """CREATE TABLE IF NOT EXISTS commands (
                device_id TEXT NOT NULL,
                seq INTEGER NOT NULL,
                body TEXT NOT NULL,
                created_ms INTEGER NOT NULL,
                reply TEXT,
                replied_ms INTEGER,
                PRIMARY KEY (device_id, seq)
            )""",
        ),
        # Bodies are the JSON text, as on SQLite, not jsonb: jsonb refuses what JSON text
        # carries fine (a "\u0000" escape, a lone surrogate), so one hostile body would fail
        # its whole batch; dashboards can still query `body::jsonb`. bigint everywhere a
        # device or clock supplies the number (seqs are < 2^63, SPEC §6).
        postgres=(
            """CREATE TABLE devices (
                device_id text PRIMARY KEY,
                public_key text NOT NULL,
                first_seen_ms bigint,
                last_seen_ms bigint,
                online integer NOT NULL DEFAULT 0,
                status_ms bigint,
                agent_version text,
                backend text,
                down_seq bigint NOT NULL DEFAULT 0,
                added_ms bigint NOT NULL
            )""",
            """CREATE TABLE messages (
                id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                device_id text NOT NULL,
                kind smallint NOT NULL,
                seq bigint NOT NULL,
                created_ms bigint NOT NULL,
                received_ms bigint NOT NULL,
                body text NOT NULL,
                UNIQUE (device_id, kind, seq)
            )""",
            "CREATE INDEX messages_by_device_kind ON messages (device_id, kind, id)",
            """CREATE TABLE commands (
                device_id text NOT NULL,
                seq bigint NOT NULL,
                body text NOT NULL,
                created_ms bigint NOT NULL,
                reply text,
                replied_ms bigint,
                PRIMARY KEY (device_id, seq)
            )""",
        ),
    ),
    Migration(
        2,
        "devices.plaintext_telemetry, quarantine of refused rows",
        sqlite=(
            AddColumn("devices", "plaintext_telemetry", "INTEGER NOT NULL DEFAULT 0"),
            """CREATE TABLE IF NOT EXISTS quarantine (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                device_id TEXT NOT NULL,
                kind INTEGER NOT NULL,
                seq TEXT NOT NULL,
                reason TEXT NOT NULL,
                received_ms INTEGER NOT NULL,
                sample TEXT NOT NULL
            )""",
            "CREATE INDEX IF NOT EXISTS quarantine_by_device ON quarantine (device_id, id)",
        ),
        # seq is text: a quarantined seq may be the one that did not fit 64 bits.
        postgres=(
            AddColumn("devices", "plaintext_telemetry", "integer NOT NULL DEFAULT 0"),
            """CREATE TABLE quarantine (
                id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                device_id text NOT NULL,
                kind smallint NOT NULL,
                seq text NOT NULL,
                reason text NOT NULL,
                received_ms bigint NOT NULL,
                sample text NOT NULL
            )""",
            "CREATE INDEX quarantine_by_device ON quarantine (device_id, id)",
        ),
    ),
    Migration(
        3,
        "devices.stored_bytes for the per-device quota, messages by (kind, received_ms)",
        sqlite=(
            AddColumn(
                "devices",
                "stored_bytes",
                "INTEGER NOT NULL DEFAULT 0",
                "UPDATE devices SET stored_bytes = (SELECT coalesce(sum(length(body)), 0)"
                " FROM messages WHERE messages.device_id = devices.device_id)",
            ),
            "CREATE INDEX IF NOT EXISTS messages_by_kind_received ON messages (kind, received_ms)",
        ),
        postgres=(
            AddColumn(
                "devices",
                "stored_bytes",
                "bigint NOT NULL DEFAULT 0",
                "UPDATE devices SET stored_bytes = (SELECT coalesce(sum(octet_length(body)), 0)"
                " FROM messages WHERE messages.device_id = devices.device_id)",
            ),
            "CREATE INDEX messages_by_kind_received ON messages (kind, received_ms)",
        ),
    ),
    Migration(
        4,
        "devices.quota: a device's own ingest rates (JSON), over the [ingest] defaults",
        sqlite=(AddColumn("devices", "quota", "TEXT"),),
        postgres=(AddColumn("devices", "quota", "text"),),
    ),
    Migration(
        5,
        "device_tags; jobs and their per-device job_targets",
        sqlite=(
            """CREATE TABLE IF NOT EXISTS device_tags (
                device_id TEXT NOT NULL,
                key TEXT NOT NULL,
                value TEXT NOT NULL,
                PRIMARY KEY (device_id, key)
            )""",
            "CREATE INDEX IF NOT EXISTS device_tags_by_value ON device_tags (key, value)",
            """CREATE TABLE IF NOT EXISTS jobs (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                created_ms INTEGER NOT NULL,
                target TEXT NOT NULL,
                command TEXT NOT NULL,
                rate_per_s REAL NOT NULL,
                max_failure_ratio REAL NOT NULL,
                timeout_s REAL NOT NULL,
                ttl_ms INTEGER NOT NULL,
                state TEXT NOT NULL,
                next_send_ms INTEGER NOT NULL DEFAULT 0,
                finished_ms INTEGER,
                reason TEXT
            )""",
            "CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, id)",
            """CREATE TABLE IF NOT EXISTS job_targets (
                job_id INTEGER NOT NULL,
                device_id TEXT NOT NULL,
                state TEXT NOT NULL,
                seq INTEGER,
                owner TEXT,
                lease_ms INTEGER,
                sent_ms INTEGER,
                decided_ms INTEGER,
                error TEXT,
                PRIMARY KEY (job_id, device_id)
            )""",
            "CREATE INDEX IF NOT EXISTS job_targets_by_state ON job_targets (state, job_id)",
        ),
        postgres=(
            """CREATE TABLE device_tags (
                device_id text NOT NULL,
                key text NOT NULL,
                value text NOT NULL,
                PRIMARY KEY (device_id, key)
            )""",
            "CREATE INDEX device_tags_by_value ON device_tags (key, value)",
            """CREATE TABLE jobs (
                id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                created_ms bigint NOT NULL,
                target text NOT NULL,
                command text NOT NULL,
                rate_per_s double precision NOT NULL,
                max_failure_ratio double precision NOT NULL,
                timeout_s double precision NOT NULL,
                ttl_ms bigint NOT NULL,
                state text NOT NULL,
                next_send_ms bigint NOT NULL DEFAULT 0,
                finished_ms bigint,
                reason text
            )""",
            "CREATE INDEX jobs_by_state ON jobs (state, id)",
            """CREATE TABLE job_targets (
                job_id bigint NOT NULL,
                device_id text NOT NULL,
                state text NOT NULL,
                seq bigint,
                owner text,
                lease_ms bigint,
                sent_ms bigint,
                decided_ms bigint,
                error text,
                PRIMARY KEY (job_id, device_id)
            )""",
            "CREATE INDEX job_targets_by_state ON job_targets (state, job_id)",
        ),
    ),
    Migration(
        6,
        "commands waiting for a reply, by age: the coordinator publishes them again",
        sqlite=(
            "CREATE INDEX IF NOT EXISTS commands_unreplied ON commands (created_ms)"
            " WHERE reply IS NULL",
        ),
        postgres=(
            "CREATE INDEX IF NOT EXISTS commands_unreplied ON commands (created_ms)"
            " WHERE reply IS NULL",
        ),
    ),
    Migration(
        7,
        "when an unreplied command was last published again: one replica resends it a round",
        sqlite=(AddColumn("commands", "resent_ms", "INTEGER"),),
        postgres=(AddColumn("commands", "resent_ms", "bigint"),),
    ),
)
MIGRATIONS = numbered(_MIGRATIONS)

_RECORD_PG = "INSERT INTO schema_version (version, description, applied_ms) VALUES (%s, %s, %s)"
# Any constant both sides agree on; it only has to differ from other advisory locks taken
# in the same database ("dgdm" in ASCII).
PG_LOCK_KEY = 0x6467646D


class SchemaTooNew(ConfigError):
    """The store was migrated by a newer dgdm-edge than this one (start-up stops, exit 2)."""

    def __init__(self, found: int, known: int) -> None:
        super().__init__(
            "store.url",
            f"the store's schema is version {found}, newer than the {known} this dgdm-edge "
            "knows: upgrade dgdm-edge on this host (a newer coordinator migrated the store)",
        )
        self.found = found
        self.known = known


def migrate_sqlite(db: sqlite3.Connection, migrations: Sequence[Migration] = MIGRATIONS) -> int:
    """Bring a SQLite database (an autocommit connection) up to date; returns its version."""
    try:
        return migrations_sqlite.migrate(db, migrations, _apply_sqlite)
    except TooNew as exc:
        raise SchemaTooNew(exc.found, exc.known) from None


def migrate_postgres(
    conn: psycopg.Connection[Any], migrations: Sequence[Migration] = MIGRATIONS
) -> int:
    """Bring a PostgreSQL database up to date; returns its version. The advisory lock is
    taken before anything is read or created: concurrent `CREATE TABLE IF NOT EXISTS` is
    not safe on PostgreSQL."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (PG_LOCK_KEY,))
        # Created only when missing: a role with table rights but no CREATE on the schema
        # (least privilege) can then open a store that is already up to date.
        if _pg_scalar(conn, "SELECT to_regclass('schema_version')") is None:
            conn.execute(SCHEMA_VERSION_TABLE)
        current = int(_pg_scalar(conn, CURRENT_VERSION))
        try:
            todo = pending(current, migrations)
        except TooNew as exc:
            raise SchemaTooNew(exc.found, exc.known) from None
        for migration in todo:
            for step in migration.postgres:
                for statement in _pg_steps(step):
                    conn.execute(statement)
            conn.execute(_RECORD_PG, version_row(migration, now_ms()))
    return todo[-1].version if todo else current


def _apply_sqlite(db: sqlite3.Connection, migration: Migration) -> None:
    for step in migration.sqlite:
        _sqlite_step(db, step)


def _sqlite_step(db: sqlite3.Connection, step: Step) -> None:
    if isinstance(step, str):
        db.execute(step)
        return
    have = {row[1] for row in db.execute(f"PRAGMA table_info({step.table})")}
    if step.column not in have:
        db.execute(f"ALTER TABLE {step.table} ADD COLUMN {step.column} {step.definition}")
        if step.backfill:
            db.execute(step.backfill)


def _pg_steps(step: Step) -> list[Any]:
    """The statements of a step; a PostgreSQL migration runs once, so its backfill too."""
    if isinstance(step, str):
        return [step]
    add = f"ALTER TABLE {step.table} ADD COLUMN IF NOT EXISTS {step.column} {step.definition}"
    return [add, step.backfill] if step.backfill else [add]


def _pg_scalar(conn: psycopg.Connection[Any], sql: LiteralString) -> Any:
    row = conn.execute(sql).fetchone()
    assert row is not None  # a SELECT of one value returns one row
    return row[0]
