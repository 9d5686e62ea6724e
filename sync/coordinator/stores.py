"""Which store a coordinator uses: `open_store(config)` reads `[store]` (SPEC §7.1).

- `url`: a plain path, `sqlite:////absolute/path.db`, `sqlite:///relative/path.db` (the
  SQLAlchemy convention; relative to the working directory) or
  `postgresql://user@host:port/db` (libpq query parameters such as `sslmode` allowed).
  Unset: SQLite at `<coordinator.data_dir>/coordinator.db`.
- `password` (PostgreSQL): `file:/path` (its first line; the settings loader reads it),
  `env:NAME`, `credential:NAME` (from `$CREDENTIALS_DIRECTORY`, systemd `LoadCredential=`),
  or the systemd credential `store.password` when unset. A password inside the URL is
  refused, so the URL can be shown anywhere; the password never is.

Every start-up failure is a `ConfigError` naming `store.url` or `store.password` (exit 2).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlsplit

from dgdm.sync.errors import ConfigError, SyncError

if TYPE_CHECKING:
    from dgdm.sync.coordinator.config import CoordinatorConfig
    from dgdm.sync.coordinator.store import Store

DEFAULT_SQLITE_NAME = "coordinator.db"
_SECRET_PARAMS = {"password", "passfile"}


class StoreUnavailable(SyncError):
    """The store cannot be reached now; nothing of the call was committed, so a batch must
    not be receipted (the devices keep and resend it). Retrying later may succeed."""


@dataclass(frozen=True)
class StoreTarget:
    """Where a store lives: `path` for SQLite, else a libpq URL without a password."""

    path: Path | None = None
    conninfo: str | None = None

    @property
    def display(self) -> str:
        return str(self.path) if self.path is not None else str(self.conninfo)


def parse_store_url(url: str | None, data_dir: Path) -> StoreTarget:
    """A pure decision: the `[store] url` text (None: unset) to a store target."""
    if url is None or not url.strip():
        return StoreTarget(path=data_dir / DEFAULT_SQLITE_NAME)
    scheme, sep, rest = url.partition("://")
    if not sep:
        if url.startswith(("sqlite:", "postgresql:", "postgres:")):
            raise ConfigError("store.url", "write sqlite:///PATH or postgresql://user@host/db")
        return StoreTarget(path=Path(url))
    if scheme == "sqlite":
        return StoreTarget(path=_sqlite_path(rest))
    if scheme == "postgresql":
        return StoreTarget(conninfo=_check_postgres(url))
    raise ConfigError(
        "store.url",
        f"unsupported scheme {scheme!r}: use a path, sqlite:///PATH or postgresql://user@host/db",
    )


def _sqlite_path(rest: str) -> Path:
    # sqlite:///rel.db -> rest "/rel.db"; sqlite:////abs.db -> rest "//abs.db".
    if not rest.startswith("/"):
        raise ConfigError("store.url", "a SQLite URL has no host: sqlite:///PATH")
    path = rest[1:]
    if not path or path == ":memory:":
        raise ConfigError("store.url", "needs a database file (an in-memory store loses all)")
    return Path(path)


def _check_postgres(url: str) -> str:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        # The message does not repeat the URL: it may hold a password.
        raise ConfigError("store.url", "is not a valid postgresql:// URL") from None
    secret_params = {k for k, _ in parse_qsl(parts.query)} & _SECRET_PARAMS
    if parts.password is not None or secret_params:
        raise ConfigError(
            "store.url",
            "must not hold a password: set store.password (file:, env: or credential:)",
        )
    if not parts.username:
        raise ConfigError("store.url", "names no user: postgresql://user@host:port/db")
    return url


def resolve_password(value: str | None, env: Mapping[str, str] | None = None) -> str | None:
    """`store.password` to the password: `env:NAME`, `credential:NAME`, or the text the
    settings loader already read (a literal, a `file:` or the `store.password` credential),
    of which the first line counts."""
    env = os.environ if env is None else env
    if value is None:
        return None
    if value.startswith("env:"):
        name = value[4:]
        if name not in env:
            raise ConfigError("store.password", f"environment variable {name} is not set")
        value = env[name]
    elif value.startswith("credential:"):
        value = _read_credential(value[len("credential:") :], env)
    lines = value.splitlines()
    if not lines or not lines[0]:
        raise ConfigError("store.password", "is empty")
    return lines[0]


def _read_credential(name: str, env: Mapping[str, str]) -> str:
    directory = env.get("CREDENTIALS_DIRECTORY")
    if not directory:
        raise ConfigError("store.password", f"credential {name}: $CREDENTIALS_DIRECTORY is not set")
    if not name or "/" in name or name in (".", ".."):
        raise ConfigError("store.password", f"credential {name!r} is not a credential name")
    try:
        return (Path(directory) / name).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            "store.password", f"cannot read credential {name}: {exc.strerror}"
        ) from None


def open_store(config: CoordinatorConfig, *, env: Mapping[str, str] | None = None) -> Store:
    """The store `[store]` names, migrated and ready (blocking: call it off the loop)."""
    target = parse_store_url(config.store.url, config.coordinator.data_dir)
    if target.path is not None:
        return _open_sqlite(target.path)
    password = resolve_password(config.store.password, env)
    try:
        from dgdm.sync.coordinator.pg_store import PgStore
    except ImportError:
        raise ConfigError(
            "store.url", "PostgreSQL needs psycopg: pip install 'dgdm-edge[postgres]'"
        ) from None
    assert target.conninfo is not None
    return PgStore(target.conninfo, password, display=target.conninfo)


def _open_sqlite(path: Path) -> Store:
    from dgdm.sync.coordinator.store import SqliteStore

    try:
        return SqliteStore(path)
    except (OSError, sqlite3.Error) as exc:
        raise ConfigError("store.url", f"cannot open the SQLite store {path}: {exc}") from None
