"""A private PostgreSQL cluster on a free loopback port, for tests and `dgdm bench fleet`.

`PgCluster` runs Debian's binaries (`initdb`, `pg_ctl`: package `postgresql`, found on PATH
or in /usr/lib/postgresql/*/bin), never the machine's own server on 5432: `initdb` in a
temp dir, the unix socket inside it, `listen_addresses=127.0.0.1`, password (SCRAM)
authentication over TCP. PostgreSQL refuses to run as root, so under root it runs as the
`postgres` user (or `nobody`) through `runuser`, in a temp dir outside root-only trees.
fsync stays on: benchmarks must measure durable commits, as SQLite's synchronous=FULL.
Stopped by its postmaster's pid.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

SUPERUSER = "dgdm_admin"
_dbs = itertools.count(1)


def find_bin_dir() -> Path | None:
    """The directory of initdb/pg_ctl/postgres: PATH first, else the newest Debian major."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4])
    )
    return Path(candidates[-1]).parent if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _running(pid: int) -> bool:
    """Whether the process still runs. pg_ctl leaves the postmaster to PID 1, which may
    reap it late: a zombie has already closed its port and files, so it counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


class PgCluster:
    def __init__(self, bin_dir: Path, password: str | None = None) -> None:
        self.bin_dir = bin_dir
        # The superuser's password, new for every cluster unless given.
        self.password = password or secrets.token_urlsafe(16)
        self.host = "127.0.0.1"
        self.port = _free_port()
        self.root = Path(tempfile.mkdtemp(prefix="dgdm-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.pid: int | None = None
        self._user = self._run_as()

    @staticmethod
    def _run_as() -> str | None:
        if os.geteuid() != 0:
            return None
        for name in ("postgres", "nobody"):
            with contextlib.suppress(KeyError):
                return pwd.getpwnam(name).pw_name
        raise RuntimeError("no unprivileged user (postgres, nobody) to run PostgreSQL as")

    def _cmd(self, *argv: str) -> list[str]:
        prefix = ["runuser", "-u", self._user, "--"] if self._user else []
        return [*prefix, *argv]

    def init(self) -> PgCluster:
        pwfile = self.root / "pw"
        pwfile.write_text(self.password + "\n")
        if self._user:
            entry = pwd.getpwnam(self._user)
            for path in (self.root, pwfile):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        subprocess.run(
            self._cmd(
                str(self.bin_dir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                SUPERUSER,
                f"--pwfile={pwfile}",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--no-instructions",
                "--no-sync",  # the cluster is thrown away; its commits still fsync
                "-E",
                "UTF8",
            ),
            check=True,
            capture_output=True,
        )
        pwfile.unlink()
        return self

    def start(self) -> PgCluster:
        options = (
            f"-p {self.port} -c listen_addresses={self.host} -k {self.root} "
            "-c fsync=on -c max_connections=40 -c shared_buffers=32MB"
        )
        subprocess.run(
            self._cmd(
                str(self.bin_dir / "pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(self.log),
                "-o",
                options,
                "-w",
                "-t",
                "30",
                "start",
            ),
            check=True,
            capture_output=True,
        )
        self.pid = int((self.data / "postmaster.pid").read_text().split()[0])
        return self

    def stop(self, *, immediate: bool = False, timeout: float = 30.0) -> None:
        """Stop the postmaster by its pid and wait until it is gone: a fast shutdown
        (SIGINT: a clean checkpoint), or `immediate` (SIGQUIT: like a crash, no checkpoint,
        the next start recovers from the WAL)."""
        if self.pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGQUIT if immediate else signal.SIGINT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _running(self.pid):
                break
            time.sleep(0.05)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        self.pid = None

    def destroy(self) -> None:
        self.stop(immediate=True)  # its data is deleted next: no checkpoint worth waiting for
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres", user: str = SUPERUSER) -> str:
        return f"postgresql://{user}@{self.host}:{self.port}/{database}"

    def sql(self, statement: str, database: str = "postgres") -> None:
        """Run one statement as the superuser (autocommit: CREATE DATABASE needs it)."""
        import psycopg

        with psycopg.connect(
            host=self.host,
            port=self.port,
            user=SUPERUSER,
            password=self.password,
            dbname=database,
            autocommit=True,
        ) as conn:
            conn.execute(statement)

    def create_database(self, prefix: str = "t") -> str:
        name = f"{prefix}{next(_dbs)}_{os.getpid()}"
        self.sql(f'CREATE DATABASE "{name}"')
        return name
