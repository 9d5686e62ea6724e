"""`dgdm keys generate` through its argparse registration."""

from __future__ import annotations

import argparse
import base64
import stat

import pytest

from dgdm.sync import crypto, keys_cli
from dgdm.sync.errors import ConfigError, KeyFileError


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dgdm")
    keys_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_generate_prints_public_key_and_writes_files(tmp_path, capsys) -> None:
    assert _run(["keys", "generate", "--out", str(tmp_path), "--name", "edge-0001"]) == 0
    out = capsys.readouterr().out.strip()
    private_path = tmp_path / "edge-0001.key"
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    assert base64.b64decode(out) == crypto.raw_public(crypto.load_private_key(private_path))
    assert crypto.raw_public(
        crypto.load_public_key(tmp_path / "edge-0001.pub")
    ) == base64.b64decode(out)


def test_generate_refuses_overwrite_without_force(tmp_path, capsys) -> None:
    _run(["keys", "generate", "--out", str(tmp_path)])
    first = capsys.readouterr().out.strip()
    with pytest.raises(KeyFileError, match="--force"):
        _run(["keys", "generate", "--out", str(tmp_path)])
    assert _run(["keys", "generate", "--out", str(tmp_path), "--force"]) == 0
    assert capsys.readouterr().out.strip() != first


@pytest.mark.parametrize("name", ["../evil", "a/b", "", ".hidden"])
def test_generate_rejects_names_that_are_paths(tmp_path, name) -> None:
    with pytest.raises(ConfigError, match="--name"):
        _run(["keys", "generate", "--out", str(tmp_path), "--name", name])
    assert not list(tmp_path.iterdir())


def test_generate_requires_out(capsys) -> None:
    with pytest.raises(SystemExit):
        _run(["keys", "generate"])
    assert "--out" in capsys.readouterr().err
