"""`http.processes` = 2 on a real agent: the agent and a serving process share the port
(SO_REUSEPORT). Connections are told apart by the process that holds their server end
(psutil), so every check below runs on connections of both processes: infer answers equal
to the agent's own, a PUT / PATCH / DELETE on one seen at once on the other, a request to
queue committed in the agent's outbox, everything else passed on, the token, the counts
in the agent's /metrics, a killed serving process started again, and the stop."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import numpy as np
import psutil
import pytest

from dgdm.sync.crypto import generate_keypair

from .test_oip import RING, ring

Agent = Any  # conftest.AgentProcess
SETS = 2


def serving_pids(agent: Agent, timeout_s: float = 30.0) -> list[int]:
    """The serving processes, once the agent's /status counts them listening."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            status = json.loads(_get(agent, "/status"))
        except ConnectionError:  # a connection queued on a process just killed is reset
            time.sleep(0.1)
            continue
        if status["http"]["serving"] == status["http"]["processes"]:
            return [p.pid for p in psutil.Process(agent.proc.pid).children() if _serving(p)]
        time.sleep(0.1)
    raise AssertionError(f"serving processes not listening: {agent.log_tail()}")


def _serving(process: psutil.Process) -> bool:
    try:
        return "dgdm.agent.serving" in " ".join(process.cmdline())
    except psutil.Error:  # gone, or killed and not reaped by the agent yet (a zombie)
        return False


def _get(agent: Agent, path: str) -> bytes:
    response = agent.get(path)
    assert response.status == 200, response.body
    return bytes(response.body)


class Connections:
    """Keep-alive connections, grouped by the pid that serves each."""

    def __init__(self, agent: Agent, pids: list[int], wanted: int = 4) -> None:
        self.agent = agent
        self.by_pid: dict[int, list[http.client.HTTPConnection]] = defaultdict(list)
        owners = [agent.proc.pid, *pids]
        for _ in range(400):
            conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=30)
            self.call(conn, "GET", "/v2/health/live")
            pid = _owner(owners, agent.port, conn.sock.getsockname()[1])
            self.by_pid[pid].append(conn)
            if all(len(self.by_pid[p]) >= wanted for p in owners):
                return
        raise AssertionError(
            f"connections not spread: { {p: len(c) for p, c in self.by_pid.items()} }"
        )

    def each(self) -> Iterator[tuple[int, http.client.HTTPConnection]]:
        for pid, conns in self.by_pid.items():
            for conn in conns:
                yield pid, conn

    def call(
        self,
        conn: http.client.HTTPConnection,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        all_headers = dict(headers or {})
        if self.agent.token and "Authorization" not in all_headers:
            all_headers["Authorization"] = f"Bearer {self.agent.token}"
        conn.request(method, path, body=body, headers=all_headers)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()

    def close(self) -> None:
        for _, conn in self.each():
            conn.close()


def _owner(pids: list[int], port: int, client_port: int) -> int:
    for pid in pids:
        for c in psutil.Process(pid).net_connections("tcp"):
            if c.laddr and c.laddr.port == port and c.raddr and c.raddr.port == client_port:
                return pid
    raise AssertionError(f"no process holds the connection from port {client_port}")


def binary_infer(x: np.ndarray, **parameters: Any) -> tuple[bytes, dict[str, str]]:
    tensor = {"name": "x", "datatype": "FP32", "shape": list(x.shape)}
    tensor["parameters"] = {"binary_data_size": x.nbytes}
    params = {"binary_data_output": True, **parameters}
    header = json.dumps({"inputs": [tensor], "parameters": params}).encode()
    return header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header))}


def answer_z(headers: dict[str, str], body: bytes, shape: tuple[int, ...]) -> np.ndarray:
    length = int(headers["Inference-Header-Content-Length"])
    return np.frombuffer(body[length:], dtype=np.float32).reshape(shape)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Agent, list[int]]]:
    from .conftest import launch

    tmp = tmp_path_factory.mktemp("serving")
    _, _, coord_pub = generate_keypair(tmp / "keys", name="coordinator")
    device_key, _, _ = generate_keypair(tmp / "keys", name="device")
    agent = launch(
        tmp,
        {
            "device": {"private_key": str(device_key)},
            "http": {"processes": 2, "token": "serving-token"},
            "sync": {"coordinator_public_key": coord_pub},
            "kernels": {"backend": "numpy"},
        },
    )
    yield agent, serving_pids(agent)
    agent.stop()


@pytest.fixture(scope="module")
def conns(pair: tuple[Agent, list[int]]) -> Iterator[Connections]:
    agent, pids = pair
    connections = Connections(agent, pids)
    yield connections
    connections.close()


def test_both_processes_answer_infer_alike(pair: Any, conns: Connections) -> None:
    agent, _ = pair
    body = json.dumps(ring("same")).encode()
    assert agent.request("PUT", "/graphs/same", body).status == 200
    x = np.random.default_rng(3).random((SETS, RING, 4), dtype=np.float32)
    expected = [
        np.array(agent.post_json("/graphs/same/diffuse", {"x": xs.tolist()}).json()["embedding"])
        for xs in x
    ]
    request, headers = binary_infer(x)
    for pid, conn in conns.each():
        status, answer_headers, answer = conns.call(
            conn, "POST", "/v2/models/same/infer", request, headers
        )
        assert status == 200, (pid, answer)
        z = answer_z(answer_headers, answer, x.shape)
        for b in range(SETS):
            np.testing.assert_allclose(z[b], expected[b], rtol=1e-5, atol=1e-6)


def test_a_change_on_one_is_seen_at_once_on_the_other(pair: Any, conns: Connections) -> None:
    x = np.ones((RING, 2), dtype=np.float32)
    request, headers = binary_infer(x)
    pids = list(conns.by_pid)
    for writer in pids:  # the change through each process, the infer through the other
        reader = next(p for p in pids if p != writer)
        put = conns.call(conns.by_pid[writer][0], "PUT", "/graphs/moving",
                         json.dumps(ring("moving")).encode(),
                         {"Content-Type": "application/json"})  # fmt: skip
        assert put[0] == 200, put[2]
        old = json.loads(put[2])["key"]
        for conn in conns.by_pid[reader]:
            assert conns.call(conn, "POST", "/v2/models/moving/infer", request, headers)[0] == 200
        patch = {"add": [[0, RING // 2]]}
        patched = conns.call(conns.by_pid[writer][0], "PATCH", "/graphs/moving",
                             json.dumps(patch).encode(),
                             {"Content-Type": "application/json"})  # fmt: skip
        assert patched[0] == 200, patched[2]
        new = json.loads(patched[2])["key"]
        for conn in conns.by_pid[reader]:
            at_old = conns.call(conn, "POST", f"/v2/models/moving/versions/{old}/infer",
                                request, headers)  # fmt: skip
            assert at_old[0] == 404, at_old[2]
            at_new = conns.call(conn, "POST", f"/v2/models/moving/versions/{new}/infer",
                                request, headers)  # fmt: skip
            assert at_new[0] == 200, at_new[2]
            metadata = conns.call(conn, "GET", "/v2/models/moving")
            assert json.loads(metadata[2])["versions"] == [new]
        gone = conns.call(conns.by_pid[writer][0], "DELETE", "/graphs/moving")
        assert gone[0] == 200, gone[2]
        for conn in conns.by_pid[reader]:
            refused = conns.call(conn, "POST", "/v2/models/moving/infer", request, headers)
            assert refused[0] == 404
            assert set(json.loads(refused[2])) == {"error"}


def test_what_a_serving_process_does_not_answer_is_the_agents(
    pair: Any, conns: Connections
) -> None:
    agent, _ = pair
    for pid, conn in conns.each():
        status, headers, body = conns.call(conn, "GET", "/metrics")
        assert status == 200, (pid, body)
        assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
        status, _, body = conns.call(conn, "GET", "/status")
        assert json.loads(body)["http"] == {"processes": 2, "serving": 2}
        status, _, body = conns.call(conn, "GET", "/v2/health/ready", headers={"Authorization": ""})
        assert (status, json.loads(body)) == (200, {"ready": True})
        status, headers, _ = conns.call(conn, "GET", "/v2/models/none/infer")
        assert status == 405
        assert "POST" in headers["Allow"]
        status, _, body = conns.call(
            conn, "POST", "/diffuse", b"{", {"Content-Type": "application/json"}
        )
        assert status == 400
        assert json.loads(body)["error"] == "bad_json"
    assert agent.get("/status").status == 200


def test_the_token_holds_on_every_process(pair: Any, conns: Connections) -> None:
    x = np.ones((RING, 1), dtype=np.float32)
    request, headers = binary_infer(x)
    body = json.dumps(ring("guarded")).encode()
    assert pair[0].request("PUT", "/graphs/guarded", body).status == 200
    for pid, conn in conns.each():
        for auth in ("", "Bearer wrong"):
            status, _, answer = conns.call(conn, "POST", "/v2/models/guarded/infer", request,
                                           {**headers, "Authorization": auth})  # fmt: skip
            assert (status, json.loads(answer)) == (
                401, {"error": "a valid bearer token is required"}), pid  # fmt: skip
            status, _, _ = conns.call(conn, "GET", "/status", headers={"Authorization": auth})
            assert status == 401
        rebound = conns.call(conn, "GET", "/v2", headers={"Host": "evil.example"})
        assert rebound[0] == 421


def test_queue_goes_to_the_agents_outbox(pair: Any, conns: Connections) -> None:
    agent, _ = pair
    assert agent.request("PUT", "/graphs/queued", json.dumps(ring("queued")).encode()).status == 200
    before = json.loads(_get(agent, "/outbox"))["kinds"].get("result", {}).get("messages", 0)
    x = np.random.default_rng(5).random((SETS, RING, 2), dtype=np.float32)
    request, headers = binary_infer(x, queue=True)
    seqs: list[int] = []
    for pid, conn in conns.each():
        status, answer_headers, answer = conns.call(
            conn, "POST", "/v2/models/queued/infer", request, headers
        )
        assert status == 200, (pid, answer)
        header = json.loads(answer[: int(answer_headers["Inference-Header-Content-Length"])])
        seqs += header["parameters"]["outbox_seq"]
    count = sum(len(c) for c in conns.by_pid.values())
    assert len(set(seqs)) == SETS * count
    after = json.loads(_get(agent, "/outbox"))["kinds"]["result"]["messages"]
    assert after - before == SETS * count


def test_every_diffusion_is_counted_in_the_agents_metrics(pair: Any, conns: Connections) -> None:
    agent, _ = pair
    assert (
        agent.request("PUT", "/graphs/counted", json.dumps(ring("counted")).encode()).status == 200
    )
    time.sleep(1.5)  # what the tests before did is reported by now (once a second)
    before = _oip_diffusions(agent)
    x = np.ones((RING, 3), dtype=np.float32)
    request, headers = binary_infer(x)
    sent = 0
    for _, conn in conns.each():
        for _ in range(5):
            assert conns.call(conn, "POST", "/v2/models/counted/infer", request, headers)[0] == 200
            sent += 1
    deadline = time.monotonic() + 10
    while _oip_diffusions(agent) - before < sent and time.monotonic() < deadline:
        time.sleep(0.2)  # a serving process reports once a second
    assert _oip_diffusions(agent) - before == sent


def _oip_diffusions(agent: Agent) -> float:
    text = _get(agent, "/metrics").decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("dgdm_diffusions_total{") and 'source="oip"' in line
    )


def test_a_killed_serving_process_is_started_again_and_the_stop_ends_all(
    tmp_path: Any,
) -> None:
    from .conftest import launch

    agent = launch(tmp_path, {"http": {"processes": 3}, "kernels": {"backend": "numpy"}})
    try:
        first = serving_pids(agent)
        assert len(first) == 2
        os.kill(first[0], signal.SIGKILL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            now = serving_pids(agent)
            if len(now) == 2 and first[0] not in now:
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"not started again: {agent.log_tail()}")
        assert first[1] in now
        assert any(e.get("msg") == "serving process exited: starting another"
                   for e in agent.logs())  # fmt: skip
    finally:
        assert agent.stop() == 0
    for pid in now:
        with contextlib.suppress(psutil.NoSuchProcess):  # gone: as it should be
            assert psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


@pytest.mark.parametrize(
    ("http", "kernels", "key"),
    [
        ({"processes": 0}, {}, "http.processes"),
        ({"processes": 65}, {}, "http.processes"),
        ({"processes": 2}, {"backend": "edgetpu"}, "http.processes"),
    ],
)
def test_a_bad_processes_setting_stops_start_up(
    tmp_path: Any, http: dict[str, Any], kernels: dict[str, Any], key: str
) -> None:
    from .conftest import launch

    agent = launch(tmp_path, {"http": http, "kernels": kernels}, wait=False)
    assert agent.proc.wait(timeout=30) == 2
    assert key in agent.log_tail()


def test_a_new_token_holds_on_every_process_after_sighup(tmp_path: Any) -> None:
    from .conftest import launch

    agent = launch(
        tmp_path, {"http": {"processes": 2, "token": "old"}, "kernels": {"backend": "numpy"}}
    )
    try:
        connections = Connections(agent, serving_pids(agent), wanted=2)
        text = agent.config_path.read_text(encoding="utf-8").replace('"old"', '"new"')
        agent.config_path.write_text(text, encoding="utf-8")
        agent.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        pending = {conn: pid for pid, conn in connections.each()}
        while pending and time.monotonic() < deadline:
            for conn in list(pending):
                new = connections.call(conn, "GET", "/v2", headers={"Authorization": "Bearer new"})
                old = connections.call(conn, "GET", "/v2", headers={"Authorization": "Bearer old"})
                if (new[0], old[0]) == (200, 401):
                    del pending[conn]
            time.sleep(0.05)
        assert not pending, f"still on the old token: {sorted(set(pending.values()))}"
        connections.close()
    finally:
        agent.stop()


def test_tritonclient_works_unchanged_against_both(pair: Any) -> None:
    import tritonclient.http as triton

    from .test_oip import infer_input

    agent, _ = pair
    assert agent.request("PUT", "/graphs/triton", json.dumps(ring("triton")).encode()).status == 200
    x = np.random.default_rng(11).random((RING, 3), dtype=np.float32)
    answers = []
    for i in range(24):  # a new client, so a new connection, each time: both processes answer
        # A dict of its own each time: infer() adds Inference-Header-Content-Length to it.
        headers = {"Authorization": f"Bearer {agent.token}"}
        client = triton.InferenceServerClient(f"127.0.0.1:{agent.port}")
        assert client.is_server_ready(headers=headers)
        assert client.get_model_metadata("triton", headers=headers)["name"] == "triton"
        result = client.infer("triton", [infer_input(x, i % 2 == 0)], headers=headers)
        answers.append(result.as_numpy("z"))
        client.close()
    for z in answers[1:]:
        np.testing.assert_allclose(z, answers[0], rtol=1e-6)
