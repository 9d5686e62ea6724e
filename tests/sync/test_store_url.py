"""`[store]` (SPEC §7.1): the URL and password forms, and start-up errors that name the key
and never show the password. The PostgreSQL cases run against a real private cluster."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from dgdm.sync.coordinator.config import (
    CoordinatorConfig,
    CoordinatorSection,
    StoreSection,
    load_config,
)
from dgdm.sync.coordinator.store import SqliteStore
from dgdm.sync.coordinator.stores import (
    StoreTarget,
    open_store,
    parse_store_url,
    resolve_password,
)
from dgdm.sync.errors import ConfigError

DATA = Path("/var/lib/dgdm-coordinator")
PG = "postgresql://dgdm@db.example:5432/dgdm"


@pytest.mark.parametrize(
    ("url", "target"),
    [
        (None, StoreTarget(path=DATA / "coordinator.db")),
        ("", StoreTarget(path=DATA / "coordinator.db")),
        ("/srv/c.db", StoreTarget(path=Path("/srv/c.db"))),
        ("rel/c.db", StoreTarget(path=Path("rel/c.db"))),
        (
            "sqlite:////var/lib/dgdm/coordinator.db",
            StoreTarget(path=Path("/var/lib/dgdm/coordinator.db")),
        ),
        ("sqlite:///relative/path.db", StoreTarget(path=Path("relative/path.db"))),
        (PG, StoreTarget(conninfo=PG)),
        (
            "postgresql://dgdm@db/dgdm?sslmode=verify-full",
            StoreTarget(conninfo="postgresql://dgdm@db/dgdm?sslmode=verify-full"),
        ),
    ],
)
def test_url_forms(url: str | None, target: StoreTarget) -> None:
    assert parse_store_url(url, DATA) == target


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("mysql://u@h/db", "unsupported scheme 'mysql'"),
        ("postgres://u@h/db", "unsupported scheme 'postgres'"),
        ("sqlite:c.db", "sqlite:///PATH"),
        ("sqlite://host/c.db", "no host"),
        ("sqlite:///", "needs a database file"),
        ("sqlite:///:memory:", "needs a database file"),
        ("postgresql://h:5432/db", "names no user"),
        ("postgresql://u@h:port/db", "not a valid postgresql:// URL"),
    ],
)
def test_bad_urls_name_store_url(url: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_store_url(url, DATA)
    assert info.value.key == "store.url"
    assert says in info.value.message


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://dgdm:hunter2-secret@db/dgdm",
        "postgresql://dgdm@db/dgdm?password=hunter2-secret",
        "postgresql://dgdm@db/dgdm?sslmode=require&passfile=/x/hunter2-secret",
    ],
)
def test_a_password_in_the_url_is_refused_without_repeating_it(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_store_url(url, DATA)
    assert info.value.key == "store.url"
    assert "store.password" in info.value.message
    assert "hunter2" not in str(info.value)


def test_password_forms(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "pg").write_text("from-credential\nsecond line\n")
    env = {"PGPW": "from-env", "CREDENTIALS_DIRECTORY": str(creds)}
    assert resolve_password(None, env) is None
    assert resolve_password("env:PGPW", env) == "from-env"
    assert resolve_password("credential:pg", env) == "from-credential"
    # file: is read by the settings loader (below); the first line counts.
    assert resolve_password("from-file\nmore", env) == "from-file"


@pytest.mark.parametrize(
    ("value", "env", "says"),
    [
        ("env:NOPE", {}, "environment variable NOPE is not set"),
        ("env:EMPTY", {"EMPTY": ""}, "is empty"),
        ("credential:pg", {}, "$CREDENTIALS_DIRECTORY is not set"),
        ("credential:../etc/passwd", {"CREDENTIALS_DIRECTORY": "/tmp"}, "not a credential name"),
        ("credential:missing", {"CREDENTIALS_DIRECTORY": "/nonexistent"}, "cannot read credential"),
    ],
)
def test_bad_passwords_name_store_password(value: str, env: dict[str, str], says: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_password(value, env)
    assert info.value.key == "store.password"
    assert says in info.value.message


def test_the_store_section_loads_with_file_password_and_env_override(tmp_path: Path) -> None:
    secret = tmp_path / "pg-password"
    secret.write_text("file-secret\n")
    toml = tmp_path / "coordinator.toml"
    toml.write_text(f'[store]\nurl = "{PG}"\npassword = "file:{secret}"\nretention_days = 7\n')
    config = load_config(toml, env={})
    assert config.store == StoreSection(url=PG, password="file-secret", retention_days=7)
    assert "file-secret" not in repr(config.store)  # type: ignore[comparison-overlap]
    other = load_config(toml, env={"DGDM__STORE__URL": "sqlite:///x.db"})
    assert other.store.url == "sqlite:///x.db"
    # No [store]: the SQLite default, as before.
    assert load_config(tmp_path / "coordinator.toml", env={}).store.retention_days == 7
    bare = tmp_path / "bare.toml"
    bare.write_text("")
    assert load_config(bare, env={}).store == StoreSection()
    bad = tmp_path / "bad.toml"
    bad.write_text("[store]\nretention_days = 0\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad, env={})
    assert info.value.key == "store.retention_days"


def _config(tmp_path: Path, url: str | None, password: str | None = None) -> CoordinatorConfig:
    return CoordinatorConfig(
        coordinator=CoordinatorSection(data_dir=tmp_path / "coord"),
        store=StoreSection(url=url, password=password),
    )


def test_sqlite_default_and_url_open_a_sqlite_store(tmp_path: Path) -> None:
    store = open_store(_config(tmp_path, None))
    try:
        assert isinstance(store, SqliteStore)
        assert store.path == tmp_path / "coord" / "coordinator.db"
    finally:
        store.close()
    store = open_store(_config(tmp_path, f"sqlite:///{tmp_path}/other.db"))
    try:
        assert isinstance(store, SqliteStore)
        assert store.path == tmp_path / "other.db"
    finally:
        store.close()


def test_an_unopenable_sqlite_path_names_store_url(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError) as info:
        open_store(_config(tmp_path, str(tmp_path / "file" / "c.db")))
    assert info.value.key == "store.url"


# -- against a real PostgreSQL ------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_postgres_start_up_errors_name_the_key_and_hide_the_password(
    tmp_path: Path, pg_cluster, pg_database: str
) -> None:
    secret = pg_cluster.password
    cases = [
        (f"postgresql://dgdm_admin@127.0.0.1:{_closed_port()}/x", secret, "store.url", "refused"),
        (pg_cluster.url("no_such_db"), secret, "store.url", 'database "no_such_db" does not exist'),
        (
            pg_cluster.url(pg_database),
            "wrong-" + secret,
            "store.password",
            "password authentication failed",
        ),
        (pg_cluster.url(pg_database), None, "store.password", "no password supplied"),
    ]
    for url, password, key, says in cases:
        with pytest.raises(ConfigError) as info:
            open_store(_config(tmp_path, url, password))
        text = str(info.value)
        assert (info.value.key, says in text) == (key, True), text
        assert "\n" not in text
        assert secret not in text
    store = open_store(
        _config(tmp_path, pg_cluster.url(pg_database), "env:PGPW"), env={"PGPW": secret}
    )
    try:
        assert store.public_keys() == {}
        assert secret not in repr(store)
    finally:
        store.close()
