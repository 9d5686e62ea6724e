"""The Ansible roles in ansible/: lint, syntax, and a real run against localhost (conftest).

After the run, the installed `dgdm agent` is started from its release venv with the
templated config: it must answer /healthz and reach the role-configured broker over mutual
TLS. A second run of the playbook must change nothing.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from dgdm.sync.crypto import load_public_key, raw_public

from .conftest import (
    ANSIBLE_DIR,
    ANSIBLE_LINT,
    ANSIBLE_PLAYBOOK,
    DEVICE_ID,
    REPO,
    Fleet,
    ansible_env,
    build_wheel,
    recap,
)
from .test_broker_role import NOT_AUTHORIZED, SHARE, Client


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
    dropin = "dgdm-agent.service.d/coral-usb.conf"
    assert (
        fleet.path(f"/etc/systemd/system/{dropin}").read_text()
        == (REPO / "systemd" / dropin).read_text()
    )
    rules = fleet.path("/etc/udev/rules.d/65-dgdm-coral.rules").read_text()
    assert 'ATTRS{idProduct}=="089a", MODE="0660", GROUP="plugdev"' in rules
    assert fleet.path("/etc/dgdm/device.key").stat().st_mode & 0o777 == 0o600
    assert fleet.path("/etc/dgdm/agent.toml").stat().st_mode & 0o777 == 0o640
    assert fleet.path("/etc/dgdm/tls/client.key").stat().st_mode & 0o777 == 0o640
    fetched = fleet.base / "pubkeys" / f"{DEVICE_ID}.pub"
    assert fetched.read_text() == fleet.path("/etc/dgdm/device.pub").read_text()
    assert (fleet.pki / "clients" / f"{DEVICE_ID}.pem").exists()


@pytest.mark.slow
def test_device_is_enrolled_with_its_own_key(fleet: Fleet) -> None:
    listed = subprocess.run(
        [
            *(str(fleet.path("/opt/dgdm/current/bin/dgdm")), "coordinator", "devices", "list"),
            *("--config", str(fleet.path("/etc/dgdm/coordinator.toml"))),
        ],
        env=fleet.env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    devices = {d["device_id"]: d["public_key"] for d in map(json.loads, listed.splitlines())}
    device_pub = load_public_key(fleet.path("/etc/dgdm/device.pub").read_text())
    assert devices == {DEVICE_ID: base64.b64encode(raw_public(device_pub)).decode()}
    tags = {d["device_id"]: d["tags"] for d in map(json.loads, listed.splitlines())}
    assert tags == {DEVICE_ID: {"site": "lab", "rack": "3"}}  # the inventory's dgdm_tags


@pytest.mark.slow
def test_installed_agent_is_healthy_and_online_at_the_coordinator(fleet: Fleet) -> None:
    """The deployed configs work together: agent -> broker (mTLS, ACL) -> coordinator."""
    python = fleet.path("/opt/dgdm/current/bin/python")
    where = subprocess.run(
        [str(python), "-c", "import dgdm.agent; print(dgdm.agent.__file__)"],
        env=fleet.env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(where).resolve().is_relative_to(fleet.path("/opt/dgdm/releases")), where
    coordinator = _start(fleet, "coordinator", "/etc/dgdm/coordinator.toml")
    agent = _start(fleet, "agent", "/etc/dgdm/agent.toml")
    try:
        url = f"http://127.0.0.1:{fleet.agent_port}"
        assert _wait_for(lambda: _get_json(f"{url}/healthz"), agent)["status"] == "ok"
        status = _wait_for(lambda: _connected(_get_json(f"{url}/status")), agent, "broker")
        assert status["device_id"] == DEVICE_ID
        device_url = f"http://127.0.0.1:{fleet.coordinator_port}/devices/{DEVICE_ID}"
        # The token the role made for the coordinator's API (it needs one, loopback or not).
        token = (fleet.pki / "coordinator-http.token").read_text().strip()
        _wait_for(lambda: _online(_get_json(device_url, token)), coordinator, "coordinator")
        with pytest.raises(urllib.error.HTTPError) as refused:
            _get_json(device_url)
        refused.value.close()  # it holds the connection
        assert refused.value.code == 401
    finally:
        codes = {
            name: _stop(proc) for name, proc in (("agent", agent), ("coordinator", coordinator))
        }
    assert codes == {"agent": 0, "coordinator": 0}, _logs(fleet)


@pytest.mark.slow
def test_the_coordinator_stores_every_result_while_devices_try_its_share_group(
    fleet: Fleet,
) -> None:
    """The deployed coordinator and agent, and four hostile devices asking for its `$share`.

    Before the role's dynamic security, mosquitto granted them the share group and dropped
    their shares (the coordinator got 4 of 20 results; the rest only after a minute's
    receipt timeout). Now they are refused and the coordinator stores all 20 at once.
    """
    hostile = [Client(fleet, f"edge-share-{i}") for i in range(4)]
    for client in hostile:
        client.connect()
    coordinator = _start(fleet, "coordinator", "/etc/dgdm/coordinator.toml")
    agent = _start(fleet, "agent", "/etc/dgdm/agent.toml")
    try:
        assert [client.subscribe(SHARE) for client in hostile] == [NOT_AUTHORIZED] * 4
        url = f"http://127.0.0.1:{fleet.agent_port}"
        _wait_for(lambda: _connected(_get_json(f"{url}/status")), agent, "broker")
        token = (fleet.pki / "coordinator-http.token").read_text().strip()
        device_url = f"http://127.0.0.1:{fleet.coordinator_port}/devices/{DEVICE_ID}"
        _wait_for(lambda: _online(_get_json(device_url, token)), coordinator, "coordinator")
        graph = json.dumps(json.loads((REPO / "fixtures" / "karate.json").read_text())).encode()
        jobs = {_post_json(f"{url}/diffuse?queue=1", graph)["job_id"] for _ in range(20)}

        def stored() -> dict:
            results = _get_json(f"{device_url}/results?limit=1000", token)["results"]
            if not jobs <= {row["body"]["job_id"] for row in results}:
                raise ConnectionError("not every result stored yet")
            return results

        # Well within the agent's 60 s receipt timeout: no result waited for a resend.
        results = _wait_for(stored, coordinator, "20 results", timeout=20)
        assert len([r for r in results if r["body"]["job_id"] in jobs]) == 20
        assert all(client.messages.empty() for client in hostile)
    finally:
        codes = {
            name: _stop(proc) for name, proc in (("agent", agent), ("coordinator", coordinator))
        }
        for client in hostile:
            client.close()
    assert codes == {"agent": 0, "coordinator": 0}, _logs(fleet)


@pytest.mark.slow
@pytest.mark.deploy_full  # a whole second play (~35 s): CI runs it after the default suite
def test_second_run_changes_nothing(fleet: Fleet) -> None:
    result = fleet.play()
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert recap(result)["changed"] == 0, result.stdout[-6000:]


@pytest.mark.slow
def test_failed_health_gate_rolls_back_and_stops_the_play(fleet: Fleet, tmp_path: Path) -> None:
    """A new release whose agent never answers /healthz: back to the old release and config.

    Runs after the idempotence check (it leaves a second release and a config backup behind).
    """
    new_wheel = _wheel_with_version(tmp_path, "0.1.1")
    config = fleet.path("/etc/dgdm/agent.toml")
    config_before = config.read_text()
    result = fleet.play(
        groups=("dgdm_agents",),
        dgdm_wheel=str(new_wheel),
        # Service management stays off, so nothing listens: the gate must fail.
        dgdm_agent_health_gate=True,
        dgdm_agent_health_retries=1,
        dgdm_agent_health_delay=1,
        dgdm_agent_log_level="debug",
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-6000:]
    assert "localhost failed its rollout (Wait for /healthz to answer 200" in output
    assert recap(result)["rescued"] == 1
    assert fleet.path("/opt/dgdm/releases/0.1.1/bin/dgdm").exists()
    assert os.readlink(fleet.path("/opt/dgdm/current")) == "releases/0.1.0"
    assert config.read_text() == config_before


def _get_json(url: str, token: str | None = None) -> dict:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(
        urllib.request.Request(url, headers=headers), timeout=5
    ) as response:
        assert response.status == 200
        return json.loads(response.read())


def _post_json(url: str, body: bytes) -> dict:
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=15) as response:
        assert response.status in (200, 202)
        return json.loads(response.read())


def _connected(status: dict) -> dict:
    if not status["broker"]["connected"]:
        raise ConnectionError("agent not connected to the broker yet")
    return status


def _online(device: dict) -> dict:
    if not device.get("online"):
        raise ConnectionError("device not online at the coordinator yet")
    return device


def _start(fleet: Fleet, command: str, config: str) -> subprocess.Popen[bytes]:
    """`dgdm COMMAND` from the installed release with its templated config."""
    with (fleet.base / f"{command}.log").open("w") as log:
        proc = subprocess.Popen(
            [
                str(fleet.path("/opt/dgdm/current/bin/dgdm")),
                command,
                "--config",
                fleet.path(config),
            ],
            env=fleet.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    proc.log = fleet.base / f"{command}.log"  # type: ignore[attr-defined]
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> int | None:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


def _logs(fleet: Fleet) -> str:
    return "\n".join(
        f"--- {name}.log\n" + (fleet.base / f"{name}.log").read_text()[-3000:]
        for name in ("agent", "coordinator")
    )


def _wait_for(
    probe, proc: subprocess.Popen[bytes], what: str = "/healthz", timeout: float = 30
) -> dict:
    log = proc.log  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{log.name}: exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            return probe()
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.2)
    pytest.fail(f"{what} not ready within {timeout} s:\n{log.read_text()[-3000:]}")


def _wheel_with_version(tmp_path: Path, version: str) -> Path:
    """A wheel of this checkout that calls itself `version` (built from a copy)."""
    source = tmp_path / "src"
    keep = {"pyproject.toml", "README.md", "agent", "sync", "kernels", "common"}
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
    return build_wheel(source, tmp_path / "dist")
