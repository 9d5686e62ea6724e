"""The typed settings loader shared by the agent and the coordinator (SPEC §7)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dgdm.sync.errors import ConfigError
from dgdm.sync.settings import load_settings, setting, summary


@dataclasses.dataclass(frozen=True)
class Device:
    id: str = setting("edge-0001", pattern=r"[A-Za-z0-9._-]{1,64}")
    data_dir: Path = Path("/var/lib/dgdm")


@dataclasses.dataclass(frozen=True)
class Http:
    port: int = setting(8080, minimum=0, maximum=65535)
    token: str | None = setting(None, secret=True)
    ratio: float = setting(0.5, minimum=0.0, maximum=1.0)
    verbose: bool = False
    mode: Literal["fast", "safe"] = "fast"
    peers: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Schema:
    device: Device = Device()
    http: Http = Http()


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_defaults_without_a_file(tmp_path: Path) -> None:
    assert load_settings(Schema, tmp_path / "missing.toml", env={}) == Schema()


def test_file_then_environment_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, '[device]\nid = "box-7"\n[http]\nport = 9000\nverbose = true\n')
    env = {"DGDM__HTTP__PORT": "9100", "DGDM__HTTP__PEERS": "a, b", "DGDM__HTTP__RATIO": "0.25"}
    got = load_settings(Schema, path, env=env)
    assert got.device.id == "box-7"
    assert got.http == Http(port=9100, verbose=True, peers=("a", "b"), ratio=0.25)


@pytest.mark.parametrize(
    ("text", "env", "key"),
    [
        ("[http]\nport = 70000\n", {}, "http.port"),
        ('[http]\nport = "80"\n', {}, "http.port"),
        ("[http]\nportt = 1\n", {}, "http.portt"),
        ("[htp]\n", {}, "htp"),
        ('[device]\nid = "has space"\n', {}, "device.id"),
        ("", {"DGDM__HTTP__MODE": "turbo"}, "http.mode"),
        ("", {"DGDM__HTTP__VERBOSE": "maybe"}, "http.verbose"),
        ("", {"DGDM__NOPE__X": "1"}, "DGDM__NOPE__X"),
        ("[http\n", {}, "file"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, text: str, env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(Schema, write(tmp_path, text), env=env)
    assert err.value.key == key
    assert key in str(err.value)


def test_required_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(Schema, tmp_path / "nope.toml", env={}, require_file=True)


def test_secrets_from_files_and_credentials(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("s3cret\n")
    got = load_settings(Schema, write(tmp_path, f'[http]\ntoken = "file:{secret}"\n'), env={})
    assert got.http.token == "s3cret"

    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "http.token").write_text("from-systemd")
    got = load_settings(Schema, write(tmp_path, ""), env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert got.http.token == "from-systemd"
    assert summary(got)["http"]["token"] == "***"
    assert "from-systemd" not in repr(summary(got))


@given(
    st.dictionaries(
        st.sampled_from(["PORT", "RATIO", "VERBOSE", "MODE", "PEERS", "TOKEN"]),
        st.text(max_size=12),
    )
)
def test_any_environment_gives_settings_or_a_config_error(env: dict[str, str]) -> None:
    prefixed = {f"DGDM__HTTP__{k}": v for k, v in env.items()}
    try:
        got = load_settings(Schema, None, env=prefixed)
    except ConfigError as exc:
        assert exc.key.startswith("http.")
    else:
        assert 0 <= got.http.port <= 65535
        assert 0.0 <= got.http.ratio <= 1.0
