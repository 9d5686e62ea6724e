"""Agent processes for the limits suite: the launcher of tests/agent/conftest.py (loaded by
path: conftest modules are not importable), optionally under `prlimit`."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

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
