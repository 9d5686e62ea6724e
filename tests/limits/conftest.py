"""Agent and coordinator processes for the limits suite, optionally under `prlimit`: the
agent launcher of tests/agent/conftest.py (loaded by path: conftest modules are not
importable), and `dgdm coordinator` with a token, on the session's mosquitto."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dgdm.sync.broker import Broker, free_port
from dgdm.sync.child_procs import terminate
from dgdm.sync.crypto import generate_keypair

_spec = importlib.util.spec_from_file_location(
    "dgdm_tests_agent_launcher", Path(__file__).parents[1] / "agent" / "conftest.py"
)
assert _spec is not None
assert _spec.loader is not None
launcher = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = launcher  # its dataclasses look their module up there
_spec.loader.exec_module(launcher)


@pytest.fixture
def start_agent(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    started: list[Any] = []

    def start(sections: dict[str, Any] | None = None, prefix: list[str] | None = None) -> Any:
        workdir = tmp_path / f"agent{len(started)}"
        workdir.mkdir()
        # DGDM_LIMITS_ENV="KEY=VALUE ..." adds settings, e.g. to show a limit switched off.
        env = dict(kv.split("=", 1) for kv in os.environ.get("DGDM_LIMITS_ENV", "").split())
        agent = launcher.launch(workdir, sections or {}, env, prefix=prefix)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.stop()


COORDINATOR_TOKEN = "limits-token"


class CoordinatorProcess:
    """A real `dgdm coordinator` on a free loopback port with `COORDINATOR_TOKEN`."""

    def __init__(self, workdir: Path, config: Path, port: int, prefix: list[str]) -> None:
        self.workdir = workdir
        self.config = config
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.token = COORDINATOR_TOKEN
        self.log_path = workdir / "coordinator.log"
        argv = [*prefix, *dgdm_command("coordinator", "--config", str(config))]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=_env({"PYTHONUNBUFFERED": "1"})
            )

    def get(self, path: str, *, token: bool = True, timeout: float = 30.0) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"} if token else {}
        req = urllib.request.Request(self.url + path, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return launcher.Response(resp.status, dict(resp.headers), resp.read())
        except urllib.error.HTTPError as exc:
            with exc:
                return launcher.Response(exc.code, dict(exc.headers), exc.read())

    def wait_healthy(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"coordinator exited: {self.log_tail()}")
            with contextlib.suppress(OSError):
                if self.get("/healthz", timeout=2).status == 200:
                    return
            time.sleep(0.1)
        raise AssertionError(f"coordinator not healthy in {timeout_s} s: {self.log_tail()}")

    def log_tail(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-3000:]

    def stop(self) -> None:
        terminate(self.proc, 20)


def dgdm_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "dgdm.agent", *args]


def _env(extra: dict[str, str]) -> dict[str, str]:
    # DGDM_LIMITS_ENV="KEY=VALUE ..." adds settings, e.g. to show a limit switched off.
    limits_env = dict(kv.split("=", 1) for kv in os.environ.get("DGDM_LIMITS_ENV", "").split())
    return {**os.environ, **extra, **limits_env}


@pytest.fixture
def start_coordinator(
    tmp_path: Path, mqtt_broker: Broker
) -> Iterator[Callable[..., CoordinatorProcess]]:
    """`start(devices={id: public_key}, prefix=[...], http={...})`: a coordinator with those
    devices enrolled, healthy (store and broker answer)."""
    started: list[CoordinatorProcess] = []

    def start(
        devices: dict[str, str] | None = None,
        prefix: list[str] | None = None,
        http: dict[str, Any] | None = None,
    ) -> CoordinatorProcess:
        workdir = tmp_path / f"coordinator{len(started)}"
        workdir.mkdir()
        key, _, _ = generate_keypair(workdir / "keys", name="coordinator")
        port = free_port()
        config = launcher.write_config(
            workdir / "coordinator.toml",
            {
                "coordinator": {"data_dir": str(workdir / "data"), "private_key": str(key)},
                "mqtt": {"broker_url": mqtt_broker.url, "client_id": f"limits-{port}"},
                "http": {"port": port, "token": COORDINATOR_TOKEN, **(http or {})},
            },
        )
        for device, public_key in (devices or {}).items():
            add = ["coordinator", "devices", "add", device, "--public-key", public_key]
            subprocess.run(
                dgdm_command(*add, "--config", str(config)),
                check=True,
                capture_output=True,
                env=_env({}),
            )
        coordinator = CoordinatorProcess(workdir, config, port, prefix or [])
        started.append(coordinator)
        coordinator.wait_healthy()
        return coordinator

    yield start
    for coordinator in started:
        coordinator.stop()
