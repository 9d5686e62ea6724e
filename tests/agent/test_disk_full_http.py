"""A full disk under the agent's data_dir (a real 6 MiB tmpfs): `POST /diffuse?queue=1`
answers a JSON refusal (507 + Retry-After), never a plain-text 500, and every result it
accepted before stays in the outbox. Once space returns, queuing works again."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dgdm.sync.crypto import generate_keypair

Agent = Any  # conftest.AgentProcess


@pytest.fixture
def small_disk(tmp_path: Path, mount_tmpfs: Callable[[Path, str], Path]) -> Path:
    """Requested before `start_agent`, so the agent stops before the umount."""
    return mount_tmpfs(tmp_path / "small-disk", "6m")


def fill_up(path: Path) -> None:
    """Write to `path` until the file system refuses (ENOSPC)."""
    with path.open("ab") as handle:
        try:
            while True:
                handle.write(bytes(64 * 1024))
                handle.flush()
        except OSError:
            pass


def result_count(agent: Agent) -> int:
    outbox = agent.get("/outbox").json()
    return int(outbox["kinds"].get("result", {}).get("messages", 0))


def test_queue_on_a_full_disk_answers_json_and_keeps_what_it_accepted(
    small_disk: Path, start_agent: Callable[..., Agent], tmp_path: Path, karate: dict[str, Any]
) -> None:
    _, _, coord_pub = generate_keypair(tmp_path / "keys", name="coordinator")
    device_key, _, _ = generate_keypair(tmp_path / "keys", name="device")
    data_dir = small_disk / "data"
    agent = start_agent(
        {
            "device": {"data_dir": str(data_dir), "private_key": str(device_key)},
            "sync": {"coordinator_public_key": coord_pub},
            "alerts": {"disk_min_free_bytes": 0},
            "kernels": {"backend": "numpy"},
        }
    )
    body = json.dumps(karate).encode()
    accepted = 0
    for _ in range(5):
        answer = agent.request("POST", "/diffuse?queue=1", body)
        assert answer.status == 200, answer.body
        accepted += 1

    filler = data_dir / "filler"
    fill_up(filler)
    statuses: dict[int, int] = {}
    refusals = []
    deadline = time.monotonic() + 20.0
    # Keep eating what the outbox frees (its ballast) until it refuses, then some more.
    while len(refusals) < 50 and time.monotonic() < deadline:
        fill_up(filler)
        answer = agent.request("POST", "/diffuse?queue=1", body)
        statuses[answer.status] = statuses.get(answer.status, 0) + 1
        assert answer.headers.get("Content-Type", "").startswith("application/json"), (
            answer.status,
            answer.body[:200],
        )
        if answer.status == 200:
            accepted += 1
            continue
        refusals.append(answer)
    assert refusals, f"the disk never filled: {statuses}"
    assert set(statuses) <= {200, 507}, statuses
    for answer in refusals:
        error = answer.json()
        assert error["error"] == "storage_full", error
        assert "disk" in error["message"]
        assert int(answer.headers["Retry-After"]) >= 1
    assert agent.get("/healthz").status == 503  # the store check says so too
    assert result_count(agent) == accepted  # nothing accepted was lost

    filler.unlink()
    deadline = time.monotonic() + 20.0
    while True:
        answer = agent.request("POST", "/diffuse?queue=1", body)
        if answer.status == 200:
            accepted += 1
            break
        assert answer.status == 507, answer.body
        assert time.monotonic() < deadline, "queuing never came back after space returned"
        time.sleep(0.2)
    assert result_count(agent) == accepted
    assert agent.proc.poll() is None
