"""Agent processes for tests: `python -m dgdm.agent agent --config F` on a free loopback port.

`start_agent(tmp_path, **sections)` writes a TOML config (sections as dicts), starts the
real service with stdout captured to a file, waits for /healthz and returns a handle with
small HTTP helpers (urllib: the tests talk to it as any client would). Every process is
stopped (SIGTERM, then SIGKILL) at the end of the test that started it.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from dgdm.sync.broker import free_port
from dgdm.sync.child_procs import terminate

REPO = Path(__file__).resolve().parents[2]
KARATE = REPO / "fixtures" / "karate.json"


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class AgentProcess:
    proc: subprocess.Popen[bytes]
    port: int
    config_path: Path
    data_dir: Path
    log_path: Path
    token: str | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        content_type: str | None = "application/json",
        headers: dict[str, str] | None = None,
        timeout: float = 30.0,
    ) -> Response:
        all_headers = dict(headers or {})
        if body is not None and content_type:
            all_headers["Content-Type"] = content_type
        if self.token and "Authorization" not in all_headers:
            all_headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=all_headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return Response(resp.status, dict(resp.headers), resp.read())
        except urllib.error.HTTPError as exc:
            with exc:
                return Response(exc.code, dict(exc.headers), exc.read())

    def get(self, path: str, **kw: Any) -> Response:
        return self.request("GET", path, **kw)

    def post_json(self, path: str, obj: Any, **kw: Any) -> Response:
        return self.request("POST", path, json.dumps(obj).encode(), **kw)

    def logs(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(encoding="utf-8", errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def wait_healthy(self, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited {self.proc.returncode}: {self.log_tail()}")
            with contextlib.suppress(OSError):
                if self.get("/healthz", timeout=2).status == 200:
                    return
            time.sleep(0.05)
        raise AssertionError(f"agent not healthy in {timeout_s} s: {self.log_tail()}")

    def log_tail(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-3000:]

    def stop(self, timeout_s: float = 15.0) -> int:
        terminate(self.proc, timeout_s)
        return self.proc.returncode


def agent_command(config: Path) -> list[str]:
    return [sys.executable, "-m", "dgdm.agent", "agent", "--config", str(config)]


def launch(
    tmp_path: Path,
    sections: dict[str, dict[str, Any]],
    env: dict[str, str] | None = None,
    wait: bool = True,
    prefix: list[str] | None = None,
) -> AgentProcess:
    """`prefix` runs the agent under another command (e.g. prlimit)."""
    port = free_port()
    data_dir = tmp_path / "data"
    sections = {
        "device": {"id": "edge-test", "data_dir": str(data_dir), **sections.get("device", {})},
        "http": {"port": port, **sections.get("http", {})},
        **{k: v for k, v in sections.items() if k not in ("device", "http")},
    }
    config = write_config(tmp_path / "agent.toml", sections)
    log_path = tmp_path / "agent.log"
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*(prefix or []), *agent_command(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
        )
    agent = AgentProcess(
        proc, port, config, data_dir, log_path, sections["http"].get("token"), env or {}
    )
    if wait:
        agent.wait_healthy()
    return agent


@pytest.fixture
def start_agent(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    started: list[AgentProcess] = []
    counter = iter(range(1000))

    def start(
        sections: dict[str, dict[str, Any]] | None = None,
        env: dict[str, str] | None = None,
        wait: bool = True,
    ) -> AgentProcess:
        workdir = tmp_path / f"agent{next(counter)}"
        workdir.mkdir()
        agent = launch(workdir, sections or {}, env, wait)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.stop()


@pytest.fixture(scope="module")
def shared_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    """One plain agent (no sync) for read-mostly tests."""
    agent = launch(tmp_path_factory.mktemp("shared-agent"), {"kernels": {"backend": "numpy"}})
    yield agent
    agent.stop()


@pytest.fixture
def karate() -> dict[str, Any]:
    """The embedded 34-node Zachary karate club graph with 3 features per node."""
    return json.loads(KARATE.read_text(encoding="utf-8"))
