"""`migrations`' scheme on a SQLite file: the outbox and the coordinator's SQLite store.

All pending migrations are applied in one transaction under `BEGIN IMMEDIATE` (the write
lock), so two processes opening the file together neither race nor apply a step twice,
and a crash leaves the file at its old version or at the new one, nothing in between.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence

from dgdm.sync.migrations import (
    CURRENT_VERSION,
    SCHEMA_VERSION_TABLE,
    M,
    Migration,
    pending,
    version_row,
)
from dgdm.sync.wallclock import now_ms

_RECORD = "INSERT INTO schema_version (version, description, applied_ms) VALUES (?, ?, ?)"


def migrate(
    db: sqlite3.Connection, migrations: Sequence[M], apply: Callable[[sqlite3.Connection, M], None]
) -> int:
    """Bring the database (an autocommit connection) up to date, each pending migration
    run by `apply`; returns its version. `migrations.TooNew` when it is newer."""
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute(SCHEMA_VERSION_TABLE)
        current = version(db)
        todo = pending(current, migrations)
        for migration in todo:
            apply(db, migration)
            record(db, migration, now_ms())
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return todo[-1].version if todo else current


def record(db: sqlite3.Connection, migration: Migration, applied_ms: int) -> None:
    db.execute(_RECORD, version_row(migration, applied_ms))


def version(db: sqlite3.Connection) -> int:
    """The database's schema version (0: none applied); it must have `schema_version`."""
    return int(db.execute(CURRENT_VERSION).fetchone()[0])


def has_table(db: sqlite3.Connection, name: str) -> bool:
    sql = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
    return db.execute(sql, (name,)).fetchone() is not None
