"""A private PostgreSQL cluster for tests (registered as a plugin by tests/conftest.py).

`PgCluster` runs Debian's binaries (`initdb`, `pg_ctl`: package `postgresql`, found on PATH
or in /usr/lib/postgresql/*/bin) on a free loopback port, never the machine's own server
on 5432: `initdb` in a temp dir, the unix socket inside it, `listen_addresses=127.0.0.1`,
password (SCRAM) authentication over TCP so that a wrong `store.password` is refused for
real. PostgreSQL refuses to run as root, so under root it runs as the `postgres` user (or
`nobody`) through `runuser`, in a temp dir outside pytest's root-only tmp tree.

fsync stays on: the store tests and the ingest comparison with SQLite (synchronous=FULL)
must measure durable commits, not page-cache writes.

Fixtures:
- `pg_cluster` (session): one cluster for the session; `pg_cluster.url(db)` and
  `.password` (of the superuser `dgdm_admin`).
- `pg_database` (function): a fresh database in it, so tests never see each other's rows.
- `fresh_pg` (function): a cluster of its own, for tests that `stop()` and `start()` it.

All skip with the reason when no PostgreSQL binaries are installed.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from dgdm.sync.pgcluster import SUPERUSER, PgCluster, find_bin_dir

__all__ = [
    "SUPERUSER",
    "PgCluster",
    "find_bin_dir",
]  # the cluster code lives in the package (dgdm bench fleet uses it)


def _cluster() -> PgCluster:
    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.skip("no PostgreSQL binaries (initdb, pg_ctl): apt-get install postgresql")
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install '.[test]')")
    return PgCluster(bin_dir).init().start()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    cluster = _cluster()
    yield cluster
    cluster.destroy()


@pytest.fixture
def pg_database(pg_cluster: PgCluster) -> str:
    """The name of a new, empty database in the session cluster."""
    return pg_cluster.create_database()


@pytest.fixture
def fresh_pg() -> Iterator[PgCluster]:
    cluster = _cluster()
    yield cluster
    cluster.destroy()
