"""`set_config` from the coordinator: which settings it may change, how values are checked,
that a command is taken whole or not at all, and that what it set outlives a restart and a
SIGHUP (an in-process agent on a real data dir; the command path through a real broker and
coordinator is in tests/agent/test_coordinator.py's job test)."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dgdm.agent import remote, remote_config
from dgdm.agent.config import RELOADABLE, load_config
from dgdm.agent.runtime import Agent
from dgdm.sync.errors import ConfigError


def _config(tmp_path: Path, **extra: str) -> Any:
    env = {
        "DGDM__DEVICE__DATA_DIR": str(tmp_path),
        "DGDM__HTTP__PORT": "0",
        "DGDM__KERNELS__BACKEND": "numpy",
        **extra,
    }
    return load_config(None, env=env)


@pytest.mark.parametrize(
    ("args", "flat"),
    [
        ({"telemetry": {"interval_s": 5}}, {"telemetry.interval_s": 5}),
        (
            {"telemetry.interval_s": 5, "log.level": "debug"},
            {"telemetry.interval_s": 5, "log.level": "debug"},
        ),
        ({"telemetry": {"interval_s": None}}, {"telemetry.interval_s": None}),
    ],
)
def test_parse_takes_nested_or_dotted_keys(args: Any, flat: dict[str, Any]) -> None:
    assert remote_config.parse(args) == flat


@pytest.mark.parametrize(
    ("args", "key", "words"),
    [
        ({}, "args", "object of settings"),
        ([1], "args", "object of settings"),
        ({"sync": {"broker_url": "mqtt://x"}}, "sync.broker_url", "not reloadable"),
        ({"telemetry": {"nope": 1}}, "telemetry.nope", "not reloadable"),
        ({"device.id": "other"}, "device.id", "not reloadable"),
    ],
)
def test_parse_refuses_what_cannot_be_set_remotely(args: Any, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as refused:
        remote_config.parse(args)
    assert refused.value.key == key
    assert words in refused.value.message


@pytest.mark.parametrize(
    ("overlay", "key"),
    [
        ({"telemetry.interval_s": -1}, "telemetry.interval_s"),  # below its minimum
        ({"telemetry.interval_s": "often"}, "telemetry.interval_s"),
        ({"log.level": "loud"}, "log.level"),
        ({"http.token": "s3cret"}, "http.token"),  # reloadable from the file, never remotely
        ({"telemetry.interval_s": 120}, "telemetry.batch_s"),  # batch_s (60) < interval_s
    ],
)
def test_apply_checks_each_value_and_the_rules_across_keys(
    tmp_path: Path, overlay: dict[str, Any], key: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        remote_config.apply(_config(tmp_path), overlay)
    assert refused.value.key == key
    assert "s3cret" not in str(refused.value)


def test_apply_sets_the_values_over_the_file(tmp_path: Path) -> None:
    base = _config(tmp_path)
    config = remote_config.apply(base, {"telemetry.interval_s": 2, "telemetry.batch_s": 20})
    assert (config.telemetry.interval_s, config.telemetry.batch_s) == (2.0, 20.0)
    assert config.sync == base.sync


@given(
    saved=st.dictionaries(st.sampled_from(sorted(RELOADABLE)), st.integers(1, 9), max_size=5),
    change=st.dictionaries(
        st.sampled_from(sorted(RELOADABLE)), st.none() | st.integers(1, 9), max_size=5
    ),
)
def test_merged_keeps_the_rest_and_null_gives_a_key_back(saved, change) -> None:
    out = remote_config.merged(saved, change)
    for key, value in change.items():
        assert out.get(key) == value  # None: absent
    for key, value in saved.items():
        if key not in change:
            assert out[key] == value


@pytest.mark.parametrize("text", ["{", "[]", '{"sync.broker_url": "mqtt://x"}'])
def test_a_saved_file_that_is_not_ours_stops_the_start_naming_it(tmp_path: Path, text) -> None:
    path = tmp_path / remote_config.OVERLAY_NAME
    path.write_text(text)
    with pytest.raises(ConfigError) as refused:
        remote_config.load(path)
    assert refused.value.key == str(path)


async def test_set_config_applies_saves_and_outlives_a_restart(tmp_path: Path) -> None:
    agent = Agent(_config(tmp_path), None, env={})
    await agent.start()
    try:
        reply = await remote.on_command(
            agent, 7, {"cmd": "set_config", "args": {"telemetry": {"interval_s": 2.5}}}
        )
        assert reply["ok"], reply
        assert reply["data"]["applied"] == {"telemetry.interval_s": 2.5}
        assert agent.config.telemetry.interval_s == 2.5
        # A bad command changes nothing: not the running config, not the saved file.
        path = tmp_path / remote_config.OVERLAY_NAME
        before = path.read_bytes()
        bad = await remote.on_command(
            agent, 8, {"cmd": "set_config", "args": {"telemetry": {"interval_s": 1, "batch_s": -3}}}
        )
        assert not bad["ok"]
        assert "telemetry.batch_s" in bad["error"]
        assert agent.config.telemetry.interval_s == 2.5
        assert path.read_bytes() == before
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert json.loads(before) == {"telemetry.interval_s": 2.5}
    finally:
        await agent.stop()

    again = Agent(_config(tmp_path), None, env={})
    await again.start()
    try:
        assert again.config.telemetry.interval_s == 2.5  # saved, applied over the file
        reply = await remote.on_command(
            again, 9, {"cmd": "set_config", "args": {"telemetry.interval_s": None}}
        )
        assert reply["ok"], reply
        assert again.config.telemetry.interval_s == 10.0  # the file's (default) value again
    finally:
        await again.stop()


async def test_a_sighup_reload_keeps_what_the_coordinator_set(tmp_path: Path) -> None:
    config_file = tmp_path / "agent.toml"
    config_file.write_text(
        f'[device]\ndata_dir = "{tmp_path}"\n[http]\nport = 0\n[kernels]\nbackend = "numpy"\n'
        '[log]\nlevel = "info"\n'
    )
    agent = Agent(load_config(config_file, env={}), config_file, env={})
    await agent.start()
    try:
        reply = await agent.set_config({"telemetry": {"interval_s": 3}})
        assert reply["changed"] == ["telemetry.interval_s"]
        config_file.write_text(config_file.read_text().replace('"info"', '"debug"'))
        await agent.reload()
        assert agent.config.log.level == "debug"  # the file's change
        assert agent.config.telemetry.interval_s == 3.0  # and the coordinator's setting
    finally:
        await agent.stop()
