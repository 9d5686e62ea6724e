"""The dgdm_monitoring role, its alert rules and its Grafana dashboard, for real.

- `promtool check rules` and `promtool test rules` (rules_test.yml: each alert firing, and
  not firing just under its threshold or before its `for:` has passed).
- One stack per module: a private mosquitto, a coordinator process (SQLite, API token) and two
  agent processes (one with an HTTP token, one without) syncing through it; the role run
  against localhost into a temporary root (no apt, no systemctl; its `validate:` runs
  promtool on the rendered rules and config) with the three processes in its inventory; then
  Debian's Prometheus started on a free loopback port with the role's prometheus.yml and its
  own data directory, scraping every second.
- Through Prometheus' HTTP API: every target is up (the bearer tokens from the role's
  credentials files work), the rules load and evaluate, every dashboard panel's expression
  (with $device substituted) returns a series, and every metric an alert rule names was
  scraped.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from dgdm.sync.broker import Broker, free_port
from dgdm.sync.coordinator.store import SqliteStore
from dgdm.sync.crypto import generate_keypair
from tests.agent.conftest import KARATE, AgentProcess, launch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
ANSIBLE_DIR = REPO / "ansible"
ROLE = ANSIBLE_DIR / "roles" / "dgdm_monitoring"
RULES = ROLE / "files" / "dgdm-rules.yml"
DASHBOARD = ROLE / "files" / "dgdm-fleet-dashboard.json"
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
ANSIBLE_PLAYBOOK = shutil.which(
    "ansible-playbook", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
)
COORDINATOR_TOKEN = "coord-token-5f1e9a7c2b64d083"
AGENT_TOKEN = "agent-token-93c0d7a1e6f24b58"
DEVICES = ("edge-mon-1", "edge-mon-2")  # the first has an HTTP token
# Exported only where the hardware provides it: a PCIe Edge TPU's sysfs temperature.
HARDWARE_ONLY = {"dgdm_tpu_temperature_celsius"}
METRIC_NAME = re.compile(r"\b(dgdm_[a-z0-9_]+|up)\b")


def metric_names(expr: str) -> set[str]:
    """The metric names in a PromQL expression (label values in quotes left out)."""
    return set(METRIC_NAME.findall(re.sub(r'"[^"]*"', '""', expr)))


needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian prometheus)")


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=HERE, capture_output=True, text=True, timeout=60, check=False
    )


@needs_promtool
def test_promtool_checks_the_rules() -> None:
    result = _promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in result.stdout


@needs_promtool
def test_rule_unit_tests_pass_and_cover_every_alert_both_ways() -> None:
    result = _promtool("test", "rules", "rules_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    cases = [
        case
        for test in yaml.safe_load((HERE / "rules_test.yml").read_text())["tests"]
        for case in test["alert_rule_test"]
    ]
    firing = {c["alertname"] for c in cases if c.get("exp_alerts")}
    quiet = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    assert firing == quiet == set(_alerts())


def _alerts() -> dict[str, dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"]}


def test_every_alert_has_a_severity_summary_and_description_naming_where() -> None:
    for name, rule in _alerts().items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert {"summary", "description"} <= set(rule["annotations"]), name
        # Per-target alerts name the device or replica; fleet-wide ones (aggregated by job)
        # have neither label.
        if " by (job)" not in rule["expr"]:
            text = rule["annotations"]["summary"] + rule["annotations"]["description"]
            assert "$labels.device" in text or "$labels.replica" in text, name


def test_dashboard_panels_are_laid_out_and_use_the_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    cells = {
        (p["gridPos"]["x"] + dx, p["gridPos"]["y"] + dy)
        for p in panels
        for dx in range(p["gridPos"]["w"])
        for dy in range(p["gridPos"]["h"])
    }
    area = sum(p["gridPos"]["w"] * p["gridPos"]["h"] for p in panels)
    assert len(cells) == area  # no two panels overlap
    names = [v["name"] for v in dashboard["templating"]["list"]]
    assert names == ["datasource", "device"]


# -- the stack ------------------------------------------------------------------------------


@dataclass
class Stack:
    base: Path
    prefix: Path
    prometheus_url: str
    agents: list[AgentProcess]
    play_output: str

    def path(self, absolute: str) -> Path:
        return self.prefix / absolute.lstrip("/")

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.prometheus_url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as response:
            answer = json.loads(response.read())
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        return list(data["result"])


def _wait(what: str, check: Callable[[], Any], timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            found = check()
        except OSError:
            found = None
        if found:
            return found
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _request(url: str, token: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    req = urllib.request.Request(url, data=data, headers=headers)
    with urllib.request.urlopen(req, timeout=10) as response:
        return json.loads(response.read())


def _start_coordinator(
    base: Path, broker: Broker, port: int, devices: dict[str, str]
) -> tuple[subprocess.Popen[bytes], str]:
    """A coordinator process with `devices` enrolled; (process, its public key)."""
    key, _, public = generate_keypair(base / "keys", name="coordinator")
    data = base / "coord"
    store = SqliteStore(data / "coordinator.db")
    for device_id, device_public in devices.items():
        store.add_device(device_id, device_public)
    store.close()
    config = base / "coordinator.toml"
    config.write_text(
        f'[coordinator]\nid = "coord-mon"\ndata_dir = "{data}"\nprivate_key = "{key}"\n'
        f'[mqtt]\nbroker_url = "{broker.url}"\nmqtt_version = "{broker.mqtt_version}"\n'
        f'client_id = "coord-mon-{port}"\nshare_group = "mon{port}"\nsession_expiry_s = 0\n'
        f'[http]\nport = {port}\ntoken = "{COORDINATOR_TOKEN}"\n'
    )
    with (base / "coordinator.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dgdm.agent", "coordinator", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return proc, public


def _start_play(base: Path, inventory: dict[str, Any], extra: dict[str, Any]) -> Any:
    """The role against localhost (in the background: it takes a while on a busy machine)."""
    assert ANSIBLE_PLAYBOOK is not None
    (base / "hosts.json").write_text(json.dumps(inventory))
    (base / "vars.json").write_text(json.dumps(extra))
    (base / "play.yml").write_text(
        "- name: Monitoring\n  hosts: dgdm_monitoring\n  gather_facts: false\n"
        "  roles: [dgdm_monitoring]\n"
    )
    env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_LOCAL_TEMP=str(base / "ansible-tmp"))
    env["ANSIBLE_ROLES_PATH"] = str(ANSIBLE_DIR / "roles")
    return subprocess.Popen(
        [
            *(ANSIBLE_PLAYBOOK, "-i", str(base / "hosts.json"), str(base / "play.yml")),
            *("--diff", "-e", f"@{base / 'vars.json'}"),
        ],
        cwd=ANSIBLE_DIR,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _inventory(agents: dict[str, tuple[int, str | None]], coordinator_port: int) -> Any:
    """localhost runs the role; the agents and the coordinator are 127.0.0.1 at their ports."""
    local = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    agent_hosts = {
        device_id: {
            "dgdm_monitoring_address": "127.0.0.1",
            "dgdm_agent_http_port": port,
            "dgdm_agent_tpu": "none",
            **({"dgdm_agent_http_token": token} if token else {}),
        }
        for device_id, (port, token) in agents.items()
    }
    coordinator = {
        "dgdm_monitoring_address": "127.0.0.1",
        "dgdm_coordinator_http_port": coordinator_port,
        "dgdm_coordinator_id": "coord-mon",
    }
    return {
        "all": {
            "children": {
                "dgdm_monitoring": {"hosts": {"localhost": local}},
                "dgdm_agents": {"hosts": agent_hosts},
                "dgdm_coordinator": {"hosts": {"coord-mon": coordinator}},
            }
        }
    }


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, mqtt_broker: Broker) -> Iterator[Stack]:
    if PROMETHEUS is None or PROMTOOL is None:
        pytest.skip("prometheus is not installed (Debian package `prometheus`)")
    if ANSIBLE_PLAYBOOK is None:
        pytest.skip("ansible-core is not installed (extra [test])")
    base = tmp_path_factory.mktemp("monitoring")
    prefix = base / "root"
    ports = {"coordinator": free_port(), "prometheus": free_port()}
    tokens = {DEVICES[0]: AGENT_TOKEN, DEVICES[1]: None}
    agent_ports = {device_id: (free_port(), tokens[device_id]) for device_id in DEVICES}
    extra = {
        "dgdm_prefix": str(prefix),
        "dgdm_manage_service": False,
        "dgdm_manage_packages": False,
        "dgdm_monitoring_group": "root",
        "dgdm_monitoring_promtool": PROMTOOL,
        "dgdm_coordinator_http_token": COORDINATOR_TOKEN,
        "dgdm_monitoring_listen_address": f"127.0.0.1:{ports['prometheus']}",
        "dgdm_monitoring_scrape_interval": "1s",
        "dgdm_monitoring_scrape_timeout": "1s",
        "dgdm_monitoring_evaluation_interval": "1s",
    }
    play = _start_play(base, _inventory(agent_ports, ports["coordinator"]), extra)
    keys = {d: generate_keypair(base / "keys", name=d) for d in DEVICES}
    coordinator, coordinator_public = _start_coordinator(
        base, mqtt_broker, ports["coordinator"], {d: pub for d, (_, _, pub) in keys.items()}
    )
    agents: list[AgentProcess] = []
    prometheus: subprocess.Popen[bytes] | None = None
    try:
        for device_id, (key, _, _) in keys.items():
            port, token = agent_ports[device_id]
            work = base / device_id
            work.mkdir()
            sections = {
                "device": {"id": device_id, "private_key": str(key)},
                "http": {"port": port, **({"token": token} if token else {})},
                "sync": {
                    "broker_url": mqtt_broker.url,
                    "mqtt_version": mqtt_broker.mqtt_version,
                    "coordinator_public_key": coordinator_public,
                },
                "telemetry": {"interval_s": 0.2, "batch_s": 0.4},
                "kernels": {"backend": "numpy"},
            }
            agent = launch(work, sections, wait=False)
            agent.port = port  # launch() picked one too; the inventory already has this one
            agents.append(agent)
        for agent in agents:
            agent.wait_healthy()
        coordinator_url = f"http://127.0.0.1:{ports['coordinator']}"
        _wait("the coordinator", lambda: _request(f"{coordinator_url}/healthz", ""))
        _traffic(agents, coordinator_url, mqtt_broker)

        output, _ = play.communicate(timeout=180)
        assert play.returncode == 0, output[-6000:]
        with (base / "prometheus.log").open("wb") as log:
            prometheus = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={prefix}/etc/prometheus/prometheus.yml",
                    f"--storage.tsdb.path={base / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{ports['prometheus']}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        stack = Stack(base, prefix, f"http://127.0.0.1:{ports['prometheus']}", agents, output)
        # Two scrapes of every target, so rate() and increase() have points to work on.
        _wait(
            "two scrapes of every target",
            lambda: len(stack.query("count_over_time(up[1m]) >= 2")) == 2 + len(agents),
        )
        yield stack
    finally:
        if play.poll() is None:
            play.kill()
            play.communicate()
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(timeout=15)
        for agent in agents:
            agent.stop()
        coordinator.terminate()
        coordinator.wait(timeout=15)


def _traffic(agents: list[AgentProcess], coordinator_url: str, broker: Broker) -> None:
    """What makes the labelled series appear: results stored and receipted, a command with
    its reply, a refused request, and a refused status from a device never enrolled."""
    graph = json.loads(KARATE.read_text())
    for agent in agents:
        answer = agent.post_json("/diffuse?queue=1", graph)
        assert answer.status == 200, answer.body
        assert agent.post_json("/diffuse", {"nodes": "nope"}).status >= 400
    device = f"{coordinator_url}/devices/{DEVICES[0]}"
    _wait("the device online", lambda: _request(device, COORDINATOR_TOKEN)["online"])
    _request(f"{device}/commands", COORDINATOR_TOKEN, {"cmd": "ping"})
    for i, agent in enumerate(agents):
        needles = ["dgdm_last_sync_timestamp_seconds "]
        needles += ['dgdm_commands_total{cmd="ping"'] if i == 0 else []
        _wait(
            f"a receipt (and the command) at {agent.config_path.parent.name}",
            lambda a=agent, n=needles: all(x in a.get("/metrics").body.decode() for x in n),
        )
    subprocess.run(
        [
            *("mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-V", "mqttv311"),
            *("-t", "dgdm/v1/edge-never-enrolled/status", "-m", '{"state": "online"}'),
        ],
        check=True,
        timeout=10,
    )
    _wait(
        "the refused status counted",
        lambda: "dgdm_coordinator_rejects_total{" in _metrics(coordinator_url),
    )


def _metrics(coordinator_url: str) -> str:
    req = urllib.request.Request(
        f"{coordinator_url}/metrics", headers={"Authorization": f"Bearer {COORDINATOR_TOKEN}"}
    )
    with urllib.request.urlopen(req, timeout=10) as response:
        return response.read().decode()


# -- the role ---------------------------------------------------------------------------------


def test_role_installs_rules_config_tokens_and_dashboard(stack: Stack) -> None:
    conf = stack.path("/etc/prometheus")
    assert (conf / "dgdm-rules.yml").read_text() == RULES.read_text()
    for name, token in (
        ("dgdm-coordinator.token", COORDINATOR_TOKEN),
        ("dgdm-agent-0.token", AGENT_TOKEN),
    ):
        assert (conf / name).read_text() == f"{token}\n"
        assert (conf / name).stat().st_mode & 0o777 == 0o640
    assert not (conf / "dgdm-agent-1.token").exists()  # one token, one file
    for token in (COORDINATOR_TOKEN, AGENT_TOKEN):
        assert token not in stack.play_output
        assert token not in (conf / "prometheus.yml").read_text()
    config = yaml.safe_load((conf / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"prometheus", "dgdm_agent", "dgdm_agent_0", "dgdm_coordinator"}
    assert "authorization" not in jobs["dgdm_agent"]
    assert jobs["dgdm_agent_0"]["authorization"]["credentials_file"] == str(
        conf / "dgdm-agent-0.token"
    )
    assert config["rule_files"] == [str(conf / "dgdm-rules.yml")]
    assert (
        'ARGS="--web.listen-address=127.0.0.1:' in stack.path("/etc/default/prometheus").read_text()
    )
    dashboard = stack.path("/var/lib/grafana/dashboards/dgdm/dgdm-fleet.json")
    assert dashboard.read_text() == DASHBOARD.read_text()
    provisioning = yaml.safe_load(
        stack.path("/etc/grafana/provisioning/dashboards/dgdm.yaml").read_text()
    )
    assert provisioning["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards/dgdm"


# -- Prometheus on the role's configuration -------------------------------------------------


def test_every_target_is_scraped_with_its_labels(stack: Stack) -> None:
    targets = stack.api("targets")["activeTargets"]
    assert all(t["health"] == "up" for t in targets), [
        (t["scrapeUrl"], t["lastError"]) for t in targets
    ]
    labels = sorted(
        (t["labels"]["job"], t["labels"].get("device") or t["labels"].get("replica", ""))
        for t in targets
    )
    assert labels == [
        ("dgdm_agent", DEVICES[0]),
        ("dgdm_agent", DEVICES[1]),
        ("dgdm_coordinator", "coord-mon"),
        ("prometheus", ""),
    ]


def test_rules_load_and_evaluate_without_errors(stack: Stack) -> None:
    groups = _wait("the rules evaluated", lambda: _evaluated(stack))
    rules = {rule["name"]: rule for group in groups for rule in group["rules"]}
    assert set(rules) == set(_alerts())
    assert {name: rule["health"] for name, rule in rules.items() if rule["health"] != "ok"} == {}
    # A healthy stack: nothing fires, nothing is pending.
    assert {
        name: rule["state"] for name, rule in rules.items() if rule["state"] != "inactive"
    } == {}


def _evaluated(stack: Stack) -> list[dict[str, Any]] | None:
    groups = stack.api("rules")["groups"]
    # A rule never evaluated has lastEvaluation 0001-01-01T00:00:00Z.
    done = all(
        rule.get("lastEvaluation", "").startswith("2") for g in groups for rule in g["rules"]
    )
    return list(groups) if groups and done else None


def _panel_targets() -> list[tuple[str, str]]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [
        (panel["title"], target["expr"]) for panel in panels for target in panel.get("targets", [])
    ]


def test_every_dashboard_expression_returns_data(stack: Stack) -> None:
    empty = []
    for title, expr in _panel_targets():
        names = metric_names(expr)
        if names & HARDWARE_ONLY:
            continue
        if not stack.query(expr.replace("$device", DEVICES[0])):
            empty.append((title, expr))
    assert empty == []
    # The device variable's query lists both scraped agents.
    variable = json.loads(DASHBOARD.read_text())["templating"]["list"][1]
    selector = re.fullmatch(r"label_values\((.+), device\)", variable["definition"])
    assert selector, variable
    devices = {series["metric"]["device"] for series in stack.query(selector.group(1))}
    assert devices == set(DEVICES)


def test_every_metric_a_rule_or_panel_names_is_exported(stack: Stack) -> None:
    exported = set(stack.api("label/__name__/values"))
    named = {n for rule in _alerts().values() for n in metric_names(rule["expr"])}
    named |= {n for _, expr in _panel_targets() for n in metric_names(expr)}
    missing = named - exported
    assert missing == HARDWARE_ONLY
    # The hardware-only name is one the agent exports where it has a temperature.
    assert "dgdm_tpu_temperature_celsius" in (REPO / "agent" / "metrics.py").read_text()


def test_the_gauges_the_rules_need_carry_the_services_values(stack: Stack) -> None:
    def values(expr: str) -> dict[str, float]:
        return {
            s["metric"].get("device") or s["metric"].get("replica", ""): float(s["value"][1])
            for s in stack.query(expr)
        }

    default_cap = 256 * 1024 * 1024  # sync.max_outbox_bytes
    assert values("dgdm_outbox_max_bytes") == dict.fromkeys(DEVICES, default_cap)
    assert values("dgdm_tpu_temperature_limit_celsius") == dict.fromkeys(DEVICES, 85.0)
    assert values("dgdm_devices_enrolled") == {"coord-mon": 2.0}
    assert values("dgdm_devices_online") == {"coord-mon": 2.0}
    assert values("dgdm_coordinator_store_up") == {"coord-mon": 1.0}
    assert values("dgdm_coordinator_mqtt_connected") == {"coord-mon": 1.0}
    assert values("dgdm_coordinator_ingest_batches_total")["coord-mon"] >= 1
