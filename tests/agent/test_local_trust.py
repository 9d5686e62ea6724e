"""The local trust model of the agent's HTTP endpoint, against the real process.

- DNS rebinding: a page in a browser on the box that makes `evil.example` resolve to
  127.0.0.1 reaches the loopback port, but its requests carry `Host: evil.example`. Only a
  loopback name or address, the bind address or a configured `http.allowed_hosts` name is
  answered; anything else gets 421 with a JSON error, before any body is read.
- A token on loopback: with `http.token` set, every path but /healthz needs it there too.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

Agent = Any  # conftest.AgentProcess


@pytest.mark.parametrize(
    "host",
    [
        "evil.example",
        "evil.example:{port}",
        "127.0.0.1.evil.example:{port}",
        "localhost.evil.example",
        "10.1.2.3:{port}",
        "",
    ],
)
def test_a_foreign_host_header_is_refused(shared_agent: Agent, host: str) -> None:
    host = host.format(port=shared_agent.port)
    for method, path, body in (
        ("GET", "/status", None),
        ("GET", "/healthz", None),
        ("POST", "/diffuse", b"{}"),
    ):
        answer = shared_agent.request(method, path, body, headers={"Host": host})
        assert answer.status == 421, (host, path, answer.status, answer.body)
        error = answer.json()
        assert error["error"] == "bad_host"
        assert "http.allowed_hosts" in error["message"]


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1:{port}",
        "127.0.0.1",
        "localhost:{port}",
        "LOCALHOST.:{port}",
        "[::1]:{port}",
        "box.localhost:{port}",
        "127.0.0.2:{port}",
    ],
)
def test_a_loopback_host_header_is_answered(shared_agent: Agent, host: str) -> None:
    answer = shared_agent.get("/status", headers={"Host": host.format(port=shared_agent.port)})
    assert answer.status == 200, answer.body


def test_allowed_hosts_adds_names(start_agent: Callable[..., Agent]) -> None:
    agent = start_agent(
        {"http": {"allowed_hosts": ["edge-box.lan"]}, "kernels": {"backend": "numpy"}}
    )
    assert agent.get("/status", headers={"Host": f"edge-box.lan:{agent.port}"}).status == 200
    assert agent.get("/status", headers={"Host": "Edge-Box.LAN"}).status == 200
    assert agent.get("/status", headers={"Host": "other-box.lan"}).status == 421


def test_a_token_on_loopback_is_required_except_for_healthz(
    start_agent: Callable[..., Agent], karate: dict[str, Any]
) -> None:
    agent = start_agent({"http": {"token": "s3cret-token"}, "kernels": {"backend": "numpy"}})
    wrong = {"Authorization": "Bearer nope"}
    for path in ("/status", "/metrics", "/graphs", "/outbox"):
        assert agent.get(path, headers={"Authorization": ""}).status == 401, path
        assert agent.get(path, headers=wrong).status == 401, path
        assert agent.get(path).status == 200, path  # the helper sends the token
    body = json.dumps(karate).encode()
    refused = agent.request("POST", "/diffuse", body, headers=wrong)
    assert refused.status == 401
    assert refused.json()["error"] == "unauthorized"
    assert agent.request("POST", "/diffuse", body).status == 200
    assert agent.get("/healthz", headers={"Authorization": ""}).status == 200
