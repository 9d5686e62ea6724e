"""What the benches, the test rigs and the private broker (`sync/broker.py`) need to run
services as child processes: the text of a config file, and a stop that cannot hang."""

from __future__ import annotations

import json
import signal
import subprocess
from typing import Any


def toml_text(sections: dict[str, dict[str, Any]]) -> str:
    """A TOML file of flat sections; every value is written as JSON, which is TOML for the
    strings, numbers, booleans and lists of them that a config holds."""
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def wait_or_kill(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Waits up to `timeout_s` for `proc` to exit, then SIGKILLs it."""
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def terminate(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGTERM, and SIGKILL if it has not exited in `timeout_s`; one already gone is left."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        wait_or_kill(proc, timeout_s)
