"""The Ansible roles in ansible/: lint, syntax, and a real run against localhost (conftest).

After the run, the installed `dgdm agent` is started from its release venv with the
templated config: it must answer /healthz and reach the role-configured broker over mutual
TLS. A second run of the playbook must change nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from .conftest import (
    ANSIBLE_DIR,
    ANSIBLE_LINT,
    ANSIBLE_PLAYBOOK,
    DEVICE_ID,
    REPO,
    Fleet,
    ansible_env,
    recap,
)


@pytest.mark.skipif(ANSIBLE_LINT is None, reason="ansible-lint is not installed (extra [test])")
def test_ansible_lint_production_profile_is_clean(tmp_path: Path) -> None:
    assert ANSIBLE_LINT is not None
    result = subprocess.run(
        [ANSIBLE_LINT, "--profile", "production", "--offline", "--nocolor"],
        cwd=ANSIBLE_DIR,
        env=ansible_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "Profile 'production' was required, and it passed" in output


@pytest.mark.skipif(ANSIBLE_PLAYBOOK is None, reason="ansible-core is not installed ([test])")
def test_site_playbook_syntax(tmp_path: Path) -> None:
    assert ANSIBLE_PLAYBOOK is not None
    result = subprocess.run(
        [ANSIBLE_PLAYBOOK, "--syntax-check", "site.yml"],
        cwd=ANSIBLE_DIR,
        env=ansible_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_role_installs_release_config_keys_and_unit(fleet: Fleet) -> None:
    (wheel_file,) = fleet.path("/opt/dgdm/wheels").glob("dgdm_edge-*.whl")
    version = wheel_file.name.split("-")[1]
    assert os.readlink(fleet.path("/opt/dgdm/current")) == f"releases/{version}"
    unit = fleet.path("/etc/systemd/system/dgdm-agent.service")
    assert unit.read_text() == (REPO / "systemd/dgdm-agent.service").read_text()
    assert fleet.path("/etc/dgdm/device.key").stat().st_mode & 0o777 == 0o600
    assert fleet.path("/etc/dgdm/agent.toml").stat().st_mode & 0o777 == 0o640
    assert fleet.path("/etc/dgdm/tls/client.key").stat().st_mode & 0o777 == 0o640
    fetched = fleet.base / "pubkeys" / f"{DEVICE_ID}.pub"
    assert fetched.read_text() == fleet.path("/etc/dgdm/device.pub").read_text()
    assert (fleet.pki / "certs" / f"{DEVICE_ID}.pem").exists()


@pytest.mark.slow
def test_installed_agent_is_healthy_and_reaches_the_broker(fleet: Fleet) -> None:
    python = fleet.path("/opt/dgdm/current/bin/python")
    where = subprocess.run(
        [str(python), "-c", "import dgdm.agent; print(dgdm.agent.__file__)"],
        env=fleet.env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(where).resolve().is_relative_to(fleet.path("/opt/dgdm/releases")), where
    dgdm = fleet.path("/opt/dgdm/current/bin/dgdm")
    log_path = fleet.base / "agent.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [str(dgdm), "agent", "--config", str(fleet.path("/etc/dgdm/agent.toml"))],
            env=fleet.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{fleet.agent_port}"
        assert _wait_for(lambda: _get_json(f"{url}/healthz"), proc, log_path)["status"] == "ok"
        status = _wait_for(
            lambda: _connected(_get_json(f"{url}/status")), proc, log_path, what="broker"
        )
        assert status["device_id"] == DEVICE_ID
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=20)
    assert code == 0, log_path.read_text()[-3000:]


@pytest.mark.slow
def test_second_run_changes_nothing(fleet: Fleet) -> None:
    result = fleet.play()
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert recap(result)["changed"] == 0, result.stdout[-6000:]


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        return json.loads(response.read())


def _connected(status: dict) -> dict:
    if not status["broker"]["connected"]:
        raise ConnectionError("agent not connected to the broker yet")
    return status


def _wait_for(probe, proc: subprocess.Popen[bytes], log: Path, what: str = "/healthz") -> dict:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"agent exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            return probe()
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.2)
    pytest.fail(f"{what} not ready within 30 s:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
def test_failed_health_gate_rolls_back_and_stops_the_play(fleet: Fleet, tmp_path: Path) -> None:
    """A new release whose agent never answers /healthz: back to the old release and config.

    Runs after the idempotence check (it leaves a second release and a config backup behind).
    """
    new_wheel = _wheel_with_version(tmp_path, "0.1.1")
    config = fleet.path("/etc/dgdm/agent.toml")
    config_before = config.read_text()
    agents_only = tmp_path / "agents.json"
    inventory = json.loads(fleet.inventory.read_text())
    del inventory["all"]["children"]["dgdm_broker"]
    agents_only.write_text(json.dumps(inventory))
    extra = json.loads(fleet.extra_vars.read_text())
    extra.update(
        dgdm_wheel=str(new_wheel),
        # Service management stays off, so nothing listens: the gate must fail.
        dgdm_agent_health_gate=True,
        dgdm_agent_health_retries=1,
        dgdm_agent_health_delay=1,
        dgdm_agent_log_level="debug",
    )
    extra_vars = tmp_path / "vars.json"
    extra_vars.write_text(json.dumps(extra))
    assert ANSIBLE_PLAYBOOK is not None
    result = subprocess.run(
        [ANSIBLE_PLAYBOOK, "-i", str(agents_only), "site.yml", "-e", f"@{extra_vars}"],
        cwd=ANSIBLE_DIR,
        env=fleet.env(),
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-6000:]
    assert "localhost failed its rollout (Wait for /healthz to answer 200" in output
    assert recap(result)["rescued"] == 1
    assert fleet.path("/opt/dgdm/releases/0.1.1/bin/dgdm").exists()
    assert os.readlink(fleet.path("/opt/dgdm/current")) == "releases/0.1.0"
    assert config.read_text() == config_before


def _wheel_with_version(tmp_path: Path, version: str) -> Path:
    """A wheel of this checkout that calls itself `version` (built from a copy)."""
    source = tmp_path / "src"
    keep = {"pyproject.toml", "README.md", "agent", "sync", "kernels"}
    for name in keep & {p.name for p in REPO.iterdir()}:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, source / name)
    pyproject = source / "pyproject.toml"
    text = pyproject.read_text()
    assert '\nversion = "' in text
    pyproject.write_text(re.sub(r'\nversion = "[^"]+"', f'\nversion = "{version}"', text, count=1))
    out = tmp_path / "dist"
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"),
            *("--disable-pip-version-check", str(source), "-w", str(out)),
        ],
        check=True,
        capture_output=True,
        timeout=180,
    )
    (found,) = out.glob(f"dgdm_edge-{version}-*.whl")
    return found
