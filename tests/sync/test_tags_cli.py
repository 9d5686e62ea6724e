"""`dgdm coordinator devices add --tag`, `devices tag|untag` and `devices list` as real
processes on a real SQLite store: tags set, replaced and removed, and bad tags exit 2
naming the tag (never a traceback)."""

from __future__ import annotations

import json
from pathlib import Path

from dgdm.sync.crypto import generate_keypair

from .test_sync_cli import _config, _dgdm


async def _listed(config: Path) -> dict[str, dict[str, str]]:
    code, out, _ = await _dgdm("coordinator", "devices", "list", "--config", str(config))
    assert code == 0
    return {r["device_id"]: r["tags"] for r in map(json.loads, out.splitlines())}


async def test_tags_from_the_command_line(tmp_path: Path) -> None:
    config, _ = _config(tmp_path, "mqtt://127.0.0.1:1")
    _, _, public = generate_keypair(tmp_path / "dev", name="device")
    devices = ("coordinator", "devices")
    at = ("--config", str(config))
    code, out, err = await _dgdm(
        *devices, "add", "cam-1", "--public-key", public, "--tag", "site=berlin",
        "--tag", "hw=usb", *at,
    )  # fmt: skip
    assert code == 0, err
    assert "tagged hw=usb site=berlin" in out
    assert (await _listed(config)) == {"cam-1": {"site": "berlin", "hw": "usb"}}
    code, out, _ = await _dgdm(*devices, "tag", "cam-1", "site=paris", "rack=3", *at)
    assert (code, out.strip()) == (0, "cam-1: hw=usb rack=3 site=paris")
    code, out, _ = await _dgdm(*devices, "untag", "cam-1", "hw", "rack", *at)
    assert (code, out.strip()) == (0, "cam-1: site=paris")
    code, out, _ = await _dgdm(*devices, "tag", "cam-1", "only=this", "--replace", *at)
    assert (await _listed(config)) == {"cam-1": {"only": "this"}}
    # A second enrolment without --tag keeps the tags (Ansible re-runs it).
    assert (await _dgdm(*devices, "add", "cam-1", "--public-key", public, *at))[0] == 0
    assert (await _listed(config)) == {"cam-1": {"only": "this"}}

    for argv, named in (
        (("tag", "cam-1", "Site=x"), "tag 'Site'"),
        (("tag", "cam-1", "site"), "tag 'site'"),
        (("tag", "cam-1", "k=" + "v" * 65), "tag 'k'"),
        (("tag", "cam-1", *(f"k{i}=v" for i in range(16))), "at most 16"),
        (("tag", "cam-1"), "KEY=VALUE"),
        (("tag", "nope", "a=b"), "'nope' is not enrolled"),
        (("untag", "cam-1", "X"), "tag 'X'"),
        (("add", "cam-2", "--public-key", public, "--tag", "bad"), "tag 'bad'"),
    ):
        code, _, err = await _dgdm(*devices, *argv, *at)
        assert code == 2, (argv, err)
        assert named in err, err
        assert "Traceback" not in err
    assert (await _listed(config)) == {"cam-1": {"only": "this"}}
