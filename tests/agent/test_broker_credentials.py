"""A broker URL never carries credentials: `user:pass@` in `sync.broker_url` (agent) or
`mqtt.broker_url` (coordinator) stops start-up with exit 2 and one line naming the key,
and the password is not echoed (it would land in the journal, /status and bug reports).
Credentials go in `username` / `password` (or a systemd credential file)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SECRET = "hunter2-secret"
URLS = [
    f"mqtts://device:{SECRET}@broker.example:8883",
    f"mqtt://:{SECRET}@127.0.0.1:1883",
    f"mqtts://{SECRET}@broker.example",
]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=False,
    )


def assert_refused(done: subprocess.CompletedProcess[str], key: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert key in lines[0]
    assert "username" in lines[0]
    assert SECRET not in done.stderr + done.stdout


@pytest.mark.parametrize("url", URLS)
def test_agent_refuses_credentials_in_broker_url(tmp_path: Path, url: str) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        f"[device]\ndata_dir = '{tmp_path / 'data'}'\nprivate_key = '{tmp_path / 'key'}'\n"
        f"[sync]\nbroker_url = '{url}'\ncoordinator_public_key = 'x'\n",
        encoding="utf-8",
    )
    assert_refused(run("dgdm.agent", "agent", "--config", str(config)), "sync.broker_url")


def test_agent_refuses_credentials_from_the_environment(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(f"[device]\ndata_dir = '{tmp_path / 'data'}'\n", encoding="utf-8")
    env = {"DGDM__SYNC__BROKER_URL": URLS[0], "DGDM__SYNC__COORDINATOR_PUBLIC_KEY": "x"}
    assert_refused(run("dgdm.agent", "agent", "--config", str(config), env=env), "sync.broker_url")


@pytest.mark.parametrize("url", URLS)
def test_coordinator_refuses_credentials_in_broker_url(tmp_path: Path, url: str) -> None:
    config = tmp_path / "coordinator.toml"
    config.write_text(
        f"[coordinator]\ndata_dir = '{tmp_path / 'data'}'\n[mqtt]\nbroker_url = '{url}'\n",
        encoding="utf-8",
    )
    assert_refused(run("dgdm.agent", "coordinator", "--config", str(config)), "mqtt.broker_url")
