"""A real run of site.yml against this machine: localhost as broker, coordinator and agent.

One playbook run per session (Ansible is slow to start each task), into a temporary root
prefix with service management, packages and accounts off; files are owned by root. The
broker role makes the fleet CA, the broker's certificate and a mosquitto config, which the
`fleet` fixture starts on a free loopback port; the agent role installs a wheel built from
this checkout into a release venv, makes the device key, enrols it at the coordinator
(installed by its role from the same wheel), gets a client certificate signed by that CA,
and templates agent.toml pointing at that broker over mutual TLS.

The wheel goes in with `pip --no-deps --no-index` (fast, no network): its dependencies come
from the environment running the tests through PYTHONPATH, because under CI's venv
`--system-site-packages` would expose the base interpreter's packages, not the ones
installed for the tests. Tests check that `dgdm` itself is imported from the release venv.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import site
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dgdm.sync.broker import free_port, mosquitto_path

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = REPO / "ansible"
DEVICE_ID = "edge-test-0001"
GROUPS = ("dgdm_broker", "dgdm_coordinator", "dgdm_agents")
# Device ids the tests connect to the broker with besides the agent's: the broker serves
# only listed identities (dgdm_broker_devices), whatever certificate a client holds.
TEST_DEVICES = (
    *("edge-acl-a", "edge-acl-b", "edge-persist", "edge-lost", "edge-kept"),
    *("edge-old", "edge-new", "edge-presence", "edge-share-src"),
    *(f"edge-share-{i}" for i in range(4)),
)


def tool(name: str) -> str | None:
    """A console script of the environment running the tests, else one on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


ANSIBLE_PLAYBOOK = tool("ansible-playbook")
ANSIBLE_LINT = tool("ansible-lint")


def ansible_env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        ANSIBLE_LOCAL_TEMP=str(tmp / "ansible-local"),
        ANSIBLE_REMOTE_TEMP=str(tmp / "ansible-remote"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
    )
    return env


def recap(result: subprocess.CompletedProcess[str]) -> dict[str, int]:
    """The PLAY RECAP counters for localhost (ok, changed, failed, ...)."""
    match = re.search(r"^localhost\s*:\s*(.+)$", result.stdout, re.MULTILINE)
    assert match, result.stdout[-4000:] + result.stderr[-2000:]
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", match.group(1))}


def _task_sections(result: subprocess.CompletedProcess[str]) -> list[tuple[str, str, str]]:
    """(kind, name, output) per TASK or RUNNING HANDLER header of the default callback."""
    parts = re.split(r"^(TASK|RUNNING HANDLER) \[(.+?)\] \**$", result.stdout, flags=re.MULTILINE)
    return list(zip(parts[1::3], parts[2::3], parts[3::3], strict=True))


def changed_tasks(result: subprocess.CompletedProcess[str]) -> list[str]:
    """'role : task' of each task that reported a change for localhost, in run order."""
    return [
        name
        for kind, name, output in _task_sections(result)
        if kind == "TASK" and re.search(r"^changed: \[localhost", output, re.MULTILINE)
    ]


def handlers_run(result: subprocess.CompletedProcess[str]) -> list[str]:
    """'role : handler' of each notified handler (service management off skips its action)."""
    return [name for kind, name, _ in _task_sections(result) if kind == "RUNNING HANDLER"]


class Fleet:
    """localhost as broker, coordinator and agent host, in a root prefix under `base`."""

    def __init__(self, base: Path, wheel: Path) -> None:
        self.base = base
        self.prefix = base / "root"
        self.pki = base / "pki"
        self.agent_port = free_port()
        self.broker_port = free_port()
        self.broker_url = f"mqtts://127.0.0.1:{self.broker_port}"
        self.coordinator_port = free_port()
        self.broker: subprocess.Popen[bytes] | None = None
        self.vars = self._vars(wheel)

    def _vars(self, wheel: Path) -> dict[str, object]:
        return {
            "dgdm_prefix": str(self.prefix),
            "dgdm_manage_service": False,
            "dgdm_manage_accounts": False,
            "dgdm_manage_packages": False,
            "dgdm_pki_dir": str(self.pki),
            "dgdm_wheel": str(wheel),
            "dgdm_python": sys.executable,
            "dgdm_pip_args": ["--no-deps", "--no-index"],
            "dgdm_broker_url": self.broker_url,
            # As in the example group_vars: written by the coordinator play, read by agents.
            "dgdm_coordinator_public_key": "{{ lookup('ansible.builtin.file', dgdm_pki_dir"
            " + '/coordinator.b64') }}",
            # mosquitto drops to this user, and the pytest tmp dir is root-only.
            "dgdm_broker_user": "root",
            "dgdm_broker_port": self.broker_port,
            "dgdm_broker_bind": "127.0.0.1",
            "dgdm_broker_server_name": "localhost",
            "dgdm_broker_server_ips": ["127.0.0.1"],
            "dgdm_broker_devices": [DEVICE_ID, *TEST_DEVICES],
            "dgdm_coordinator_user": "root",
            "dgdm_coordinator_group": "root",
            "dgdm_coordinator_http_port": self.coordinator_port,
            "dgdm_agent_user": "root",
            "dgdm_agent_group": "root",
            # As on a Coral USB host (nothing is installed without packages): the udev
            # rules and the unit drop-in.
            "dgdm_agent_tpu": "usb",
            "dgdm_agent_device_id": DEVICE_ID,
            "dgdm_tags": {"site": "lab", "rack": 3},
            "dgdm_agent_http_port": self.agent_port,
            "dgdm_agent_pubkey_dir": str(self.base / "pubkeys"),
        }

    def env(self) -> dict[str, str]:
        """Dependencies from the test environment, after the release venv's own packages."""
        env = ansible_env(self.base)
        env["PYTHONPATH"] = os.pathsep.join(site.getsitepackages())
        env.pop("VIRTUAL_ENV", None)
        return env

    def play(
        self,
        playbook: str | Path = "site.yml",
        groups: tuple[str, ...] = GROUPS,
        *,
        args: tuple[str, ...] = (),
        path_first: Path | None = None,
        **overrides: object,
    ) -> subprocess.CompletedProcess[str]:
        """`playbook` with localhost in `groups` only, and the fleet's vars plus `overrides`.

        `args` go to ansible-playbook; `path_first` is put before PATH (a box's own tools).
        """
        assert ANSIBLE_PLAYBOOK is not None
        local = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
        inventory = self.base / "hosts.json"
        inventory.write_text(
            json.dumps({"all": {"children": {g: {"hosts": {"localhost": local}} for g in groups}}})
        )
        extra_vars = self.base / "vars.json"
        extra_vars.write_text(json.dumps(self.vars | overrides))
        env = self.env()
        if path_first is not None:
            env["PATH"] = f"{path_first}{os.pathsep}{env.get('PATH', '')}"
        return subprocess.run(
            [ANSIBLE_PLAYBOOK, "-i", str(inventory), str(playbook), "-e", f"@{extra_vars}", *args],
            cwd=ANSIBLE_DIR,
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
            check=False,
        )

    def path(self, absolute: str) -> Path:
        return self.prefix / absolute.lstrip("/")

    def start_broker(self) -> None:
        """The system's mosquitto with the config the role rendered."""
        conf = self.path("/etc/mosquitto/mosquitto.conf")
        with (self.base / "mosquitto.log").open("ab") as log:
            self.broker = subprocess.Popen(
                [str(mosquitto_path()), "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.broker.poll() is not None:
                pytest.fail((self.base / "mosquitto.log").read_text()[-3000:])
            try:
                socket.create_connection(("127.0.0.1", self.broker_port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        pytest.fail("mosquitto did not listen within 10 s")

    def stop_broker(self, sig: int = signal.SIGTERM) -> None:
        if self.broker is not None and self.broker.poll() is None:
            self.broker.send_signal(sig)
            self.broker.wait(timeout=10)
        self.broker = None


def build_wheel(source: Path, out: Path) -> Path:
    """`pip wheel --no-deps` of `source`, offline with the installed setuptools when it can.

    A venv's bundled setuptools may be too old to build without isolation (no bdist_wheel);
    then pip builds in an isolated environment, which fetches setuptools from the index.
    """
    base = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "--disable-pip-version-check"]
    for isolation in (["--no-build-isolation"], []):
        result = subprocess.run(
            [*base, *isolation, str(source), "-w", str(out)],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if result.returncode == 0:
            break
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (found,) = out.glob("dgdm_edge-*.whl")
    return found


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The dgdm-edge wheel of this checkout."""
    return build_wheel(REPO, tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="session")
def fleet(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> Iterator[Fleet]:
    if ANSIBLE_PLAYBOOK is None:
        pytest.skip("ansible-core is not installed (extra [test])")
    if os.geteuid() != 0:
        pytest.skip("the roles set root ownership and modes: run as root (CI does)")
    if mosquitto_path() is None:
        pytest.skip("mosquitto is not installed (Debian package `mosquitto`)")
    fleet = Fleet(tmp_path_factory.mktemp("fleet"), wheel)
    result = fleet.play()
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    counts = recap(result)
    assert counts["failed"] == 0
    assert counts["changed"] > 0
    fleet.start_broker()
    yield fleet
    fleet.stop_broker()
