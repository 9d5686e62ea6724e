"""Numbered schema migrations, the one scheme of every dgdm-edge database (the agent's
outbox, the coordinator's SQLite and PostgreSQL stores); no I/O here.

A database records each migration it applied as a row of `schema_version` (version,
description, applied_ms). The migrations a release knows are numbered 1, 2, 3 ... with
no gap; a database at version v gets those above v, in order. A database above the last
one was migrated by a newer dgdm-edge and is refused (`TooNew`): an older release must
not write rows a newer one no longer reads. A released migration is never edited
(databases out there applied it); a new one is appended.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

from dgdm.sync.errors import SyncError

SCHEMA_VERSION_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_version ("
    " version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_ms BIGINT NOT NULL)"
)
CURRENT_VERSION = "SELECT coalesce(max(version), 0) FROM schema_version"


class Migration(Protocol):
    @property
    def version(self) -> int: ...
    @property
    def description(self) -> str: ...


M = TypeVar("M", bound=Migration)


class TooNew(SyncError):
    """A database migrated by a newer dgdm-edge than this one."""

    def __init__(self, found: int, known: int) -> None:
        super().__init__(f"schema version {found}, newer than the {known} this dgdm-edge knows")
        self.found = found
        self.known = known


def numbered(migrations: Sequence[M]) -> tuple[M, ...]:
    """`migrations` once checked to be numbered 1, 2, 3 ... in order (a slip in a new
    migration's number fails at import, not on a database)."""
    for expected, migration in enumerate(migrations, start=1):
        if migration.version != expected:
            raise ValueError(f"migration {migration.version} stands where {expected} belongs")
    return tuple(migrations)


def latest(migrations: Sequence[Migration]) -> int:
    """The version a database has once all of `migrations` are applied."""
    return migrations[-1].version if migrations else 0


def checked(current: int, migrations: Sequence[Migration]) -> int:
    """`current`, once known to be no newer than `migrations`; `TooNew` otherwise."""
    known = latest(migrations)
    if current > known:
        raise TooNew(current, known)
    return current


def pending(current: int, migrations: Sequence[M]) -> list[M]:
    """The migrations still to apply to a database at `current` (0: a new one), in order;
    `TooNew` when `current` is beyond them."""
    checked(current, migrations)
    return [m for m in migrations if m.version > current]


def version_row(migration: Migration, applied_ms: int) -> tuple[int, str, int]:
    """The `schema_version` row that says `migration` was applied at `applied_ms`."""
    return (migration.version, migration.description, applied_ms)
