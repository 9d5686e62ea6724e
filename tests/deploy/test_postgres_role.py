"""The dgdm_postgres role and the coordinator role's PostgreSQL store, for real.

Default: one play (`--diff -vvv`) runs the role's own check and config tasks and the
coordinator role's store tasks against localhost in a temporary root, then the rendered
pg_hba.conf, conf.d drop-in, unit drop-in, password file and coordinator.toml are read back:
hostssl + SCRAM lines only, TLS settings, the password only in its 0640 file and the
systemd credential, never in the output. Bad addresses stop the play naming the variable.

Slow: the rendered configuration and the fleet CA's server certificate (signed by the
role's own tasks) applied to a private cluster (tests/pg.py), the role's SQL run on it and
the schema migrated as the NOLOGIN owner; a coordinator store opened as dgdm_coordinator
over verify-full TLS reads and writes rows but cannot create a table, and plain TCP or a
wrong password is refused.
"""

from __future__ import annotations

import json
import os
import re
import site
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dgdm.sync.coordinator.migrations import MIGRATIONS
from tests.pg import PgCluster

from .conftest import ANSIBLE_DIR, ANSIBLE_PLAYBOOK, ansible_env

PASSWORD = "pg-secret-7c41a9e2d05b3f68"
STORE_URL = (
    "postgresql://dgdm_coordinator@db.example.net:5432/dgdm"
    "?sslmode=verify-full&sslrootcert=/etc/dgdm/pg-ca.pem"
)
ROLES = ANSIBLE_DIR / "roles"

pytestmark = [
    pytest.mark.skipif(ANSIBLE_PLAYBOOK is None, reason="ansible-core is not installed ([test])"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the roles set root ownership: run as root (CI)"),
]

RENDER_PLAY = """
- name: The PostgreSQL role's checks and configuration
  hosts: dgdm_postgres
  gather_facts: false
  tasks:
    - name: Check
      ansible.builtin.include_role: {name: dgdm_postgres, tasks_from: check.yml}
    - name: Configure
      ansible.builtin.include_role: {name: dgdm_postgres, tasks_from: config.yml}

- name: The coordinator role's store
  hosts: dgdm_coordinator
  gather_facts: false
  tasks:
    - name: Store credentials
      ansible.builtin.include_role: {name: dgdm_coordinator, tasks_from: store.yml, public: true}
    - name: Coordinator configuration
      ansible.builtin.template:
        src: "{{ roles_dir }}/dgdm_coordinator/templates/coordinator.toml.j2"
        dest: "{{ dgdm_prefix }}/etc/dgdm/coordinator.toml"
        mode: "0640"
"""


def _play(
    base: Path,
    playbook: str,
    extra: dict[str, object],
    *args: str,
    env: dict[str, str] | None = None,
) -> str:
    """Run `playbook` with localhost in the postgres and coordinator groups; its output."""
    assert ANSIBLE_PLAYBOOK is not None
    local = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    groups = ("dgdm_postgres", "dgdm_coordinator")
    (base / "hosts.json").write_text(
        json.dumps({"all": {"children": {g: {"hosts": {"localhost": local}} for g in groups}}})
    )
    (base / "play.yml").write_text(playbook)
    (base / "vars.json").write_text(json.dumps({"roles_dir": str(ROLES), **extra}))
    run_env = ansible_env(base) | {"ANSIBLE_ROLES_PATH": str(ROLES)} | (env or {})
    result = subprocess.run(
        [
            *(ANSIBLE_PLAYBOOK, "-i", str(base / "hosts.json"), str(base / "play.yml")),
            *("-e", f"@{base / 'vars.json'}", *args),
        ],
        cwd=ANSIBLE_DIR,
        env=run_env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = result.stdout + result.stderr
    return output if result.returncode == 0 else f"FAILED rc={result.returncode}\n{output}"


def _vars(base: Path, **overrides: object) -> dict[str, object]:
    pki = base / "pki"
    pki.mkdir(exist_ok=True)
    (pki / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\nfleet CA\n")
    (pki / "postgres-coordinator.password").write_text(PASSWORD + "\n")
    # The coordinator role's main tasks make it before its store tasks.
    (base / "root/etc/dgdm").mkdir(parents=True, exist_ok=True)
    return {
        "dgdm_prefix": str(base / "root"),
        "dgdm_manage_service": False,
        "dgdm_manage_packages": False,
        "dgdm_pki_dir": str(pki),
        "dgdm_postgres_version": 15,
        "dgdm_postgres_user": "root",
        "dgdm_postgres_group": "root",
        "dgdm_postgres_listen_addresses": ["10.0.0.20"],
        "dgdm_postgres_client_ips": ["10.0.0.11", "10.0.0.12", "fd00::13"],
        "dgdm_coordinator_user": "root",
        "dgdm_coordinator_group": "root",
        "dgdm_coordinator_id": "coord-a",
        "dgdm_coordinator_store_url": STORE_URL,
        "dgdm_coordinator_broker_url": "mqtt://127.0.0.1:1883",
        "dgdm_coordinator_api_token": "t" * 43,
        **overrides,
    }


def _settings(text: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in text.splitlines() if "=" in line and line[0] != "#")
    return {key.strip(): value.strip() for key, value in pairs}


def test_rendered_hba_conf_and_credential(tmp_path: Path) -> None:
    output = _play(tmp_path, RENDER_PLAY, _vars(tmp_path), "--diff", "-vvv")
    assert not output.startswith("FAILED"), output[-6000:]
    root = tmp_path / "root"
    main = root / "etc/postgresql/15/main"

    hba = (main / "pg_hba.conf").read_text()
    rules = [line.split() for line in hba.splitlines() if line and not line.startswith("#")]
    assert rules == [
        ["local", "all", "root", "peer"],
        ["hostssl", "dgdm", "dgdm_coordinator", "10.0.0.11/32", "scram-sha-256"],
        ["hostssl", "dgdm", "dgdm_coordinator", "10.0.0.12/32", "scram-sha-256"],
        ["hostssl", "dgdm", "dgdm_coordinator", "fd00::13/128", "scram-sha-256"],
    ]
    assert (main / "pg_hba.conf").stat().st_mode & 0o777 == 0o640

    conf = _settings((main / "conf.d/dgdm.conf").read_text())
    assert conf["listen_addresses"] == "'10.0.0.20'"
    assert conf["ssl"] == "on"
    assert conf["ssl_min_protocol_version"] == "'TLSv1.2'"
    assert conf["password_encryption"] == "scram-sha-256"
    assert conf["ssl_cert_file"] == "'/etc/postgresql/15/main/dgdm-server.pem'"
    assert conf["ssl_key_file"] == "'/etc/postgresql/15/main/dgdm-server.key'"
    assert (conf["fsync"], conf["synchronous_commit"]) == ("on", "on")

    # The password: in its 0640 file and the unit's credential, not in the config.
    password_file = root / "etc/dgdm/pg-password"
    assert password_file.read_text() == PASSWORD + "\n"
    assert password_file.stat().st_mode & 0o777 == 0o640
    dropin = (root / "etc/systemd/system/dgdm-coordinator.service.d/store.conf").read_text()
    assert "\nLoadCredential=store.password:/etc/dgdm/pg-password\n" in dropin
    assert (root / "etc/dgdm/pg-ca.pem").exists()

    from dgdm.sync.coordinator.config import load_config
    from dgdm.sync.coordinator.stores import resolve_password

    toml = (root / "etc/dgdm/coordinator.toml").read_text()
    assert PASSWORD not in toml
    config = load_config(root / "etc/dgdm/coordinator.toml", env={})
    assert config.store.url == STORE_URL
    assert config.coordinator.id == "coord-a"
    # What systemd hands the service (LoadCredential= copies the file) is the password.
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "store.password").write_bytes(password_file.read_bytes())
    env = {"CREDENTIALS_DIRECTORY": str(credentials)}
    assert resolve_password(config.store.password, env) == PASSWORD

    # --diff was on (pg_hba's diff is shown), and the password never appears.
    assert "+hostssl  dgdm  dgdm_coordinator  10.0.0.11/32  scram-sha-256" in output
    assert PASSWORD not in output
    assert "the output has been hidden" in output


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"dgdm_postgres_client_ips": ["coord-a.example.net"]}, "dgdm_postgres_client_ips"),
        ({"dgdm_postgres_client_ips": ["10.0.0.0/8"]}, "dgdm_postgres_client_ips"),
        ({"dgdm_postgres_listen_addresses": ["*"]}, "dgdm_postgres_listen_addresses"),
    ],
    ids=["hostname", "network", "wildcard-listen"],
)
def test_bad_addresses_stop_the_play_naming_the_variable(
    tmp_path: Path, overrides: dict[str, object], named: str
) -> None:
    play = RENDER_PLAY.split("\n- name: The coordinator role's store", maxsplit=1)[0]
    output = _play(tmp_path, play, _vars(tmp_path, **overrides))
    assert output.startswith("FAILED"), output[-3000:]
    assert named in output
    assert not (tmp_path / "root/etc/postgresql/15/main/pg_hba.conf").exists()


def test_example_inventory_has_replicas_with_their_own_ids(tmp_path: Path) -> None:
    inventory = tmp_path / "inventory.json"
    assert ANSIBLE_PLAYBOOK is not None
    listed = subprocess.run(
        [
            *(str(Path(ANSIBLE_PLAYBOOK).with_name("ansible-inventory")), "--list", "--export"),
            *("-i", "inventory/example/hosts.yml", "--output", str(inventory)),
        ],
        cwd=ANSIBLE_DIR,
        env=ansible_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert listed.returncode == 0, listed.stderr
    data = json.loads(inventory.read_text())
    hosts = data["dgdm_coordinator"]["hosts"]
    assert len(hosts) >= 2
    ids = [data["_meta"]["hostvars"][h]["dgdm_coordinator_id"] for h in hosts]
    assert len(set(ids)) == len(ids)
    assert data["dgdm_postgres"]["hosts"] == ["db.example.net"]
    site = (ANSIBLE_DIR / "site.yml").read_text()
    assert site.index("hosts: dgdm_postgres") < site.index("hosts: dgdm_coordinator")
    assert re.search(
        r"sslmode=verify-full&sslrootcert=",
        (ANSIBLE_DIR / "inventory/example/group_vars/dgdm_coordinator.yml").read_text(),
    )


SERVER_PLAY = """
- name: The fleet CA, and the PostgreSQL role's configuration and server certificate
  hosts: dgdm_postgres
  gather_facts: false
  tasks:
    - name: Fleet CA
      ansible.builtin.include_role: {name: dgdm_fleet_ca}
    - name: Check
      ansible.builtin.include_role: {name: dgdm_postgres, tasks_from: check.yml}
    - name: Configure
      ansible.builtin.include_role: {name: dgdm_postgres, tasks_from: config.yml}
    - name: Server certificate
      ansible.builtin.include_role: {name: dgdm_postgres, tasks_from: server_cert.yml}
"""

ROLES_PLAY = """
- name: The PostgreSQL role's roles, database, grants and password
  hosts: dgdm_postgres
  gather_facts: false
  tasks:
    - name: Roles
      ansible.builtin.include_role: {name: dgdm_postgres, tasks_from: roles.yml}
"""


def _recap_changed(output: str) -> int:
    match = re.search(r"^localhost\s*:.*\bchanged=(\d+)", output, re.MULTILINE)
    assert match, output[-4000:]
    return int(match.group(1))


@pytest.mark.slow
def test_role_on_a_real_cluster_least_privilege_over_tls(
    fresh_pg: PgCluster, tmp_path: Path
) -> None:
    """The role's config, certificate, SQL and migration on a private cluster; then a store
    opened as dgdm_coordinator with verify-full TLS reads and writes but creates nothing."""
    psycopg = pytest.importorskip("psycopg")
    from dgdm.sync.coordinator.pg_store import PgStore

    cluster = fresh_pg
    if cluster._user != "postgres":
        pytest.skip("peer authentication as the OS user postgres needs that user")
    main = cluster.root / "main"
    pki = tmp_path / "pki"
    base_vars: dict[str, object] = {
        "dgdm_prefix": "",
        "dgdm_manage_service": False,
        "dgdm_manage_packages": False,
        "dgdm_pki_dir": str(pki),
        "dgdm_postgres_version": 15,
        "dgdm_postgres_config_dir": str(main),
        "dgdm_postgres_listen_addresses": ["127.0.0.1"],
        "dgdm_postgres_port": cluster.port,
        "dgdm_postgres_client_ips": ["127.0.0.1"],
        "dgdm_postgres_server_name": "localhost",
        "dgdm_postgres_server_ips": ["127.0.0.1"],
        "dgdm_postgres_psql": str(cluster.bin_dir / "psql"),
        "dgdm_postgres_socket_dir": str(cluster.root),
        "dgdm_postgres_python": "/usr/bin/python3",
    }
    output = _play(tmp_path, SERVER_PLAY, base_vars)
    assert not output.startswith("FAILED"), output[-6000:]
    key = main / "dgdm-server.key"
    assert key.stat().st_mode & 0o777 == 0o600
    assert key.owner() == "postgres"

    # The superuser the role's psql uses (peer, OS user postgres), then the role's files.
    cluster.sql("CREATE ROLE postgres SUPERUSER LOGIN")
    with (cluster.data / "postgresql.conf").open("a") as conf:
        conf.write(f"include_dir = '{main}/conf.d'\nhba_file = '{main}/pg_hba.conf'\n")
    cluster.stop()
    cluster.start()

    # Modules run as postgres: a Python and a temp dir it can read.
    remote_tmp = cluster.root / "ansible-tmp"
    roles_vars = base_vars | {"ansible_python_interpreter": "/usr/bin/python3"}
    env_extra = {"ANSIBLE_BECOME_METHOD": "su", "ANSIBLE_REMOTE_TEMP": str(remote_tmp)}
    first = _play(tmp_path, ROLES_PLAY, roles_vars, env=env_extra)
    assert not first.startswith("FAILED"), first[-6000:]
    assert _recap_changed(first) >= 2  # the grants, and the password
    again = _play(tmp_path, ROLES_PLAY, roles_vars, env=env_extra)
    assert not again.startswith("FAILED"), again[-6000:]
    assert _recap_changed(again) == 0, again[-6000:]
    password = (pki / "postgres-coordinator.password").read_text().strip()
    assert password not in first + again

    # The role's own migration script, as postgres on the socket, SET ROLE to the owner.
    # (The test environment's packages through site, as the release venv has them.)
    tasks = yaml.safe_load((ROLES / "dgdm_postgres/tasks/migrate.yml").read_text())
    script = tasks[1]["ansible.builtin.command"]["argv"][2]
    boot = f"import site; site.addsitedir({site.getsitepackages()[0]!r})\n"
    argv = ["runuser", "-u", "postgres", "--", "/usr/bin/python3", "-c", boot + script]
    argv += [str(cluster.root), str(cluster.port), "dgdm", "dgdm_owner"]
    versions = []
    for _ in range(2):
        run = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        if "ModuleNotFoundError" in run.stderr:
            pytest.skip(f"/usr/bin/python3 cannot load the test environment: {run.stderr[-300:]}")
        assert run.returncode == 0, run.stderr[-3000:]
        versions.append(tuple(map(int, run.stdout.split())))
    latest = MIGRATIONS[-1].version
    # Migrated once (changed), then found up to date (the role's changed_when: unchanged).
    assert versions == [(0, latest), (latest, latest)]

    url = f"postgresql://dgdm_coordinator@127.0.0.1:{cluster.port}/dgdm"
    tls = f"sslmode=verify-full&sslrootcert={pki / 'ca.pem'}"
    store = PgStore(f"{url}?{tls}", password)
    try:
        store.add_device("edge-pg-1", "a" * 44)
        assert [d["device_id"] for d in store.devices()] == ["edge-pg-1"]
    finally:
        store.close()
    with psycopg.connect(f"{url}?{tls}", password=password, autocommit=True) as conn:
        assert conn.info.pgconn.ssl_in_use
        owner = conn.execute("SELECT tableowner FROM pg_tables WHERE tablename = 'devices'")
        assert owner.fetchone() == ("dgdm_owner",)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("CREATE TABLE intruder (x int)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DROP TABLE devices")
    with pytest.raises(psycopg.OperationalError, match="no encryption"):
        psycopg.connect(f"{url}?sslmode=disable", password=password).close()
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(f"{url}?{tls}", password=password + "x").close()
