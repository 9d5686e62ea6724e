"""The result load on one agent: `python -m tests.chaos.loader URL OUT RATE [TOKEN]`.

POSTs the karate graph to URL/diffuse?queue=1 about RATE times a second, one request at a
time, and appends one JSON line {"seq", "job_id", "t"} to OUT for every 200: what the agent
accepted and must deliver exactly once. Stdlib only, so that it starts fast inside the
agent's network namespace (`ip netns exec`), where the agent's loopback port is. Every 10 s,
and when stopped, it prints {"statuses": {...}}: the answers so far by status (or error).
"""

from __future__ import annotations

import json
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

KARATE = Path(__file__).resolve().parents[2] / "fixtures" / "karate.json"


def post(url: str, body: bytes, token: str) -> tuple[int, dict[str, object] | None]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, None


def main(argv: list[str]) -> int:
    url, out, rate = argv[0].rstrip("/") + "/diffuse?queue=1", Path(argv[1]), float(argv[2])
    token = argv[3] if len(argv) > 3 else ""
    body = KARATE.read_bytes()
    statuses: dict[str, int] = {}
    last_report = time.monotonic()

    def report_and_exit(*_: object) -> None:  # SIGTERM: the last line counts everything
        print(json.dumps({"statuses": statuses}), flush=True)
        sys.exit(0)

    signal.signal(signal.SIGTERM, report_and_exit)
    with out.open("a", encoding="utf-8") as sink:
        while True:
            started = time.monotonic()
            try:
                status, answer = post(url, body, token)
            except (OSError, ValueError) as exc:
                status, answer = 0, None
                statuses[type(exc).__name__] = statuses.get(type(exc).__name__, 0) + 1
            statuses[str(status)] = statuses.get(str(status), 0) + 1
            if status == 200 and answer is not None:
                line = {"seq": answer["outbox_seq"], "job_id": answer["job_id"], "t": time.time()}
                sink.write(json.dumps(line) + "\n")
                sink.flush()
            if time.monotonic() - last_report > 10:
                print(json.dumps({"statuses": statuses}), flush=True)
                last_report = time.monotonic()
            time.sleep(max(0.0, 1.0 / rate - (time.monotonic() - started)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
