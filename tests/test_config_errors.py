"""Every key of both config schemas, given a bad value, stops start-up (SPEC §7): exit 2 and
one line naming `section.key`, no traceback, no secret.

The table is built from the schemas' dataclass fields, so a new key is covered by itself:
each gets a value of the wrong type and, from its type and metadata, values out of range,
outside its choices or not matching its pattern; each key whose value is parsed later (a
path, key, URL) must also have malformed values in MALFORMED, or `test_table_covers` fails.
Most cases run the real CLI `main()` in-process on a real config file (the service's
`serve` replaced by a marker, so a bad value that got through shows as exit 99 instead of
running a service); a few representative ones run `python -m dgdm.agent` as a process.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import subprocess
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from dgdm.agent.cli import main
from dgdm.agent.config import AgentConfig
from dgdm.agent.config import load_config as load_agent
from dgdm.agent.config import validate as validate_agent
from dgdm.sync.broker import make_tls_files
from dgdm.sync.coordinator.config import CoordinatorConfig
from dgdm.sync.coordinator.config import load_config as load_coordinator
from dgdm.sync.coordinator.config import validate as validate_coordinator
from dgdm.sync.crypto import generate_keypair

STARTED = 99  # what main() returns when a config got past validation to the service
SECRET = "hunter2-not-to-be-shown"
UNSET_ENV = "DGDM_TEST_CONFIG_ERRORS_UNSET"

Value = Any  # a TOML value, or a function of the Files giving one


@dataclasses.dataclass(frozen=True)
class Files:
    """Real files the base configs name, and bad ones to name instead."""

    root: Path
    device_key: Path
    coord_key: Path
    coord_public: str
    ca: Path
    cert: Path
    key: Path
    other_key: Path  # a valid key of another certificate
    text: Path  # a regular file holding no PEM at all
    open_key: Path  # a valid X25519 key that group and others may read
    ed25519_key: Path  # a valid PKCS#8 key of the wrong type
    open_tls_key: Path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    root = tmp_path_factory.mktemp("config-errors")
    device_key, _, _ = generate_keypair(root / "keys", name="device")
    coord_key, _, coord_public = generate_keypair(root / "keys", name="coordinator")
    tls = make_tls_files(root / "tls")
    text = root / "notes.txt"
    text.write_text("no PEM here\n")
    open_key, _, _ = generate_keypair(root / "keys", name="open")
    open_key.chmod(0o644)
    ed = root / "keys" / "ed25519.key"
    ed.write_bytes(
        ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    ed.chmod(0o600)
    open_tls_key = root / "tls" / "open-client.key"
    open_tls_key.write_bytes(tls.client_key.read_bytes())
    open_tls_key.chmod(0o644)
    return Files(
        root=root,
        device_key=device_key,
        coord_key=coord_key,
        coord_public=coord_public,
        ca=tls.ca_file,
        cert=tls.client_cert,
        key=tls.client_key,
        other_key=tls.server_key,
        text=text,
        open_key=open_key,
        ed25519_key=ed,
        open_tls_key=open_tls_key,
    )


def agent_base(f: Files) -> dict[str, dict[str, Value]]:
    """A config using every feature whose values are parsed later, so each is checked."""
    return {
        "device": {"data_dir": str(f.root / "agent"), "private_key": str(f.device_key)},
        "sync": {
            "broker_url": "mqtts://127.0.0.1:1",
            "coordinator_public_key": f.coord_public,
            "ca_file": str(f.ca),
            "cert_file": str(f.cert),
            "key_file": str(f.key),
        },
        "kernels": {"cache_dir": str(f.root / "cache")},
        "spool": {"dir": str(f.root / "spool")},
    }


def coordinator_base(f: Files) -> dict[str, dict[str, Value]]:
    return {
        "coordinator": {"data_dir": str(f.root / "coord"), "private_key": str(f.coord_key)},
        "mqtt": {
            "broker_url": "mqtts://127.0.0.1:1",
            "ca_file": str(f.ca),
            "cert_file": str(f.cert),
            "key_file": str(f.key),
        },
        "store": {"url": f"sqlite:///{f.root / 'store' / 'coordinator.db'}"},
    }


def _under_file(f: Files) -> str:
    return str(f.text / "sub")


def _missing(f: Files) -> str:
    return str(f.root / "missing.pem")


PG = {"store.url": "postgresql://dgdm@127.0.0.1:1/dgdm"}
_BROKER_URLS = [
    ("no host", "mqtts://:8883"),
    ("port out of range", "mqtts://broker:99999"),
    ("port 0", "mqtts://broker:0"),
    ("broken IPv6", "mqtts://[::1:8883"),
]
_CA_FILES = [
    ("missing", _missing),
    ("not PEM", lambda f: str(f.text)),
    ("a key", lambda f: str(f.key)),
]
_CERT_FILES = [
    ("missing", _missing),
    ("not PEM", lambda f: str(f.text)),
    ("a key", lambda f: str(f.key)),
]
_KEY_FILES = [
    ("missing", _missing),
    ("not PEM", lambda f: str(f.text)),
    ("mode 0644", lambda f: str(f.open_tls_key)),
    ("another certificate's key", lambda f: str(f.other_key)),
]
_PRIVATE_KEYS = [
    ("missing", _missing),
    ("not PEM", lambda f: str(f.text)),
    ("mode 0644", lambda f: str(f.open_key)),
    ("Ed25519, not X25519", lambda f: str(f.ed25519_key)),
]
_DIRS = [("under a regular file", _under_file), ("a regular file", lambda f: str(f.text))]

# key -> [(label, bad value, other keys set with it)]: values that type and range checks
# let through but that the running program would fail to parse or use.
MALFORMED: dict[str, dict[str, list[tuple[str, Value, dict[str, str]]]]] = {
    "agent": {
        "device.data_dir": [(label, v, {}) for label, v in _DIRS],
        "device.private_key": [(label, v, {}) for label, v in _PRIVATE_KEYS],
        "http.bind": [("not a host", "not a host!", {})],
        "http.allowed_hosts": [("not a host", ["ok.example", "bad host!"], {})],
        "sync.broker_url": [(label, v, {}) for label, v in _BROKER_URLS],
        "sync.coordinator_public_key": [
            ("not base64", "not base64 !!", {}),
            ("31 bytes", base64.b64encode(bytes(31)).decode(), {}),
            ("bad PEM", "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----", {}),
        ],
        "sync.ca_file": [(label, v, {}) for label, v in _CA_FILES],
        "sync.cert_file": [(label, v, {}) for label, v in _CERT_FILES],
        "sync.key_file": [(label, v, {}) for label, v in _KEY_FILES],
        "kernels.cache_dir": [(label, v, {}) for label, v in _DIRS],
        "spool.dir": [(label, v, {}) for label, v in _DIRS],
    },
    "coordinator": {
        "coordinator.data_dir": [(label, v, {}) for label, v in _DIRS],
        "coordinator.private_key": [(label, v, {}) for label, v in _PRIVATE_KEYS],
        "http.bind": [("not a host", "not a host!", {})],
        "http.max_inflight_body_bytes": [("below one ordinary body", 1000, {})],
        "mqtt.broker_url": [(label, v, {}) for label, v in _BROKER_URLS],
        "mqtt.ca_file": [(label, v, {}) for label, v in _CA_FILES],
        "mqtt.cert_file": [(label, v, {}) for label, v in _CERT_FILES],
        "mqtt.key_file": [(label, v, {}) for label, v in _KEY_FILES],
        "store.url": [
            ("unsupported scheme", "mysql://dgdm@db/dgdm", {}),
            ("password inside", f"postgresql://dgdm:{SECRET}@127.0.0.1/dgdm", {}),
            ("no user", "postgresql://127.0.0.1/dgdm", {}),
            ("SQLite under a regular file", lambda f: f"sqlite:///{f.text}/c.db", {}),
        ],
        "store.password": [
            ("unset env reference", f"env:{UNSET_ENV}", PG),
            ("credential without $CREDENTIALS_DIRECTORY", "credential:pg", PG),
            ("missing file", lambda f: f"file:{_missing(f)}", PG),
        ],
    },
}

SCHEMAS: dict[str, type] = {"agent": AgentConfig, "coordinator": CoordinatorConfig}


def schema_keys(schema: type) -> list[tuple[str, dataclasses.Field[Any], Any]]:
    out = []
    for section in dataclasses.fields(schema):
        cls = typing.get_type_hints(schema)[section.name]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            out.append((f"{section.name}.{f.name}", f, hints[f.name]))
    return out


def generic_bad(f: dataclasses.Field[Any], hint: Any) -> list[tuple[str, Value]]:
    """Values every key of this type and metadata must refuse."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = args[0]
    meta = f.metadata
    if typing.get_origin(hint) is typing.Literal:
        return [("wrong type", 5), ("not a choice", "no-such-choice")]
    if typing.get_origin(hint) is tuple:
        return [("not a list", "a,b"), ("wrong item type", [5])]
    bad: list[tuple[str, Value]] = []
    if hint is bool:
        bad.append(("wrong type", "yes"))
    elif hint in (int, float):
        bad.append(("wrong type", "10"))
        if hint is int:
            bad.append(("not an integer", 1.5))
        if meta.get("minimum") is not None:
            bad.append(("below minimum", hint(meta["minimum"]) - 1))
        if meta.get("maximum") is not None:
            bad.append(("above maximum", hint(meta["maximum"]) + 1))
    else:  # str and Path
        bad.append(("wrong type", 5))
        if meta.get("pattern"):
            bad.append(("not matching its pattern", "not valid !!"))
    if meta.get("choices"):
        bad.append(("not a choice", "no-such-choice"))
    return bad


def cases() -> list[Any]:
    out = []
    for program, schema in SCHEMAS.items():
        for key, f, hint in schema_keys(schema):
            for label, value in generic_bad(f, hint):
                out.append(pytest.param(program, key, value, {}, id=f"{program}-{key}-{label}"))
            for label, value, extra in MALFORMED[program].get(key, []):
                out.append(pytest.param(program, key, value, extra, id=f"{program}-{key}-{label}"))
    return out


def write_config(path: Path, program: str, f: Files, changes: dict[str, Value]) -> Path:
    tables = (agent_base if program == "agent" else coordinator_base)(f)
    for key, value in changes.items():
        section, name = key.split(".")
        tables.setdefault(section, {})[name] = value(f) if callable(value) else value
    path.write_text(
        "".join(
            f"[{section}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in table.items())
            for section, table in tables.items()
        ),
        encoding="utf-8",
    )
    return path


def _toml(value: Value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)  # a TOML basic string is a JSON string


@pytest.fixture
def no_service(monkeypatch: pytest.MonkeyPatch) -> None:
    """A config that passes validation reaches `serve`: then main() returns STARTED."""
    from dgdm.agent import runtime
    from dgdm.sync.coordinator import runner

    async def started(*args: object, **kwargs: object) -> int:
        return STARTED

    monkeypatch.setattr(runtime, "serve", started)
    monkeypatch.setattr(runner, "serve", started)
    monkeypatch.delenv(UNSET_ENV, raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    for name in list(os.environ):
        if name.startswith("DGDM__"):
            monkeypatch.delenv(name)


def assert_refused(program: str, key: str, code: int, err: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, f"{key}: exit {code} ({'started' if code == STARTED else err.strip()})"
    assert len(lines) == 1, err
    assert lines[-1].startswith(f"dgdm {program}: config {key}"), lines[-1]
    assert lines[-1][len(f"dgdm {program}: config {key}") :][:1] in (":", "["), lines[-1]
    assert "Traceback" not in err
    assert SECRET not in err


def test_base_configs_pass_validation(files: Files, tmp_path: Path) -> None:
    """The table means something only if the unchanged configs are accepted."""
    validate_agent(load_agent(write_config(tmp_path / "a.toml", "agent", files, {}), env={}))
    coordinator = load_coordinator(write_config(tmp_path / "c.toml", "coordinator", files, {}))
    validate_coordinator(coordinator, env={})


def test_a_tls_key_its_group_may_read_is_accepted(files: Files, tmp_path: Path) -> None:
    """The deployment's TLS key is root:dgdm 0640 (ansible role dgdm_tls_client)."""
    key = tmp_path / "client.key"
    key.write_bytes(files.key.read_bytes())
    key.chmod(0o640)
    config = write_config(tmp_path / "a.toml", "agent", files, {"sync.key_file": str(key)})
    validate_agent(load_agent(config, env={}))


def test_table_covers_every_parsed_key() -> None:
    """A key whose value is a path, or is read as a key or URL, needs malformed values."""
    for program, schema in SCHEMAS.items():
        keys = {key for key, _, _ in schema_keys(schema)}
        assert set(MALFORMED[program]) <= keys, "MALFORMED names a key the schema lacks"
        for key, _, hint in schema_keys(schema):
            if Path in (hint, *typing.get_args(hint)) or key.endswith(("_url", "_key", ".bind")):
                assert key in MALFORMED[program], f"{program} {key}: no malformed values"


@pytest.mark.parametrize(("program", "key", "value", "extra"), cases())
def test_bad_value_exits_2_naming_the_key(
    program: str,
    key: str,
    value: Value,
    extra: dict[str, str],
    files: Files,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_service: None,
) -> None:
    config = write_config(tmp_path / f"{program}.toml", program, files, {**extra, key: value})
    code = main([program, "--config", str(config)])
    assert_refused(program, key, code, capsys.readouterr().err)


# The issue's own example and one of each kind of file check, as real processes.
PROCESS_CASES = [
    ("agent", "sync.coordinator_public_key", "not base64 !!", {}),
    ("agent", "device.private_key", lambda f: str(f.open_key), {}),
    ("agent", "sync.broker_url", "mqtts://broker:99999", {}),
    ("coordinator", "store.url", f"postgresql://dgdm:{SECRET}@127.0.0.1/dgdm", {}),
    ("coordinator", "mqtt.key_file", lambda f: str(f.other_key), {}),
]


@pytest.mark.parametrize(
    ("program", "key", "value", "extra"),
    PROCESS_CASES,
    ids=[f"{c[0]}-{c[1]}" for c in PROCESS_CASES],
)
def test_real_process_exits_2_naming_the_key(
    program: str,
    key: str,
    value: Callable[[Files], str] | str,
    extra: dict[str, str],
    files: Files,
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path / f"{program}.toml", program, files, {**extra, key: value})
    env = {k: v for k, v in os.environ.items() if not k.startswith("DGDM__")}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "dgdm.agent", program, "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{program} with a bad {key} did not stop within 30 s")
    assert_refused(program, key, done.returncode, done.stderr)


def test_devices_commands_check_the_store_they_open(
    files: Files, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_service: None
) -> None:
    config = write_config(
        tmp_path / "c.toml", "coordinator", files, {"store.url": f"sqlite:///{files.text}/c.db"}
    )
    code = main(["coordinator", "devices", "list", "--config", str(config)])
    assert_refused("coordinator", "store.url", code, capsys.readouterr().err)
