"""`dgdm coordinator jobs create|list|show|cancel` as real processes on a real SQLite store
(the CLI works on the store, as `devices` does): a job by tag, its listing and devices,
cancel, and bad input as exit 2 naming the field."""

from __future__ import annotations

import json
from pathlib import Path

from dgdm.sync.crypto import generate_keypair

from .test_sync_cli import _config, _dgdm


async def test_jobs_from_the_command_line(tmp_path: Path) -> None:
    config, _ = _config(tmp_path, "mqtt://127.0.0.1:1")
    _, _, public = generate_keypair(tmp_path / "dev", name="device")
    at = ("--config", str(config))
    for name, site in (("cam-1", "berlin"), ("cam-2", "berlin"), ("cam-3", "paris")):
        add = ("coordinator", "devices", "add", name, "--public-key", public, "--tag")
        assert (await _dgdm(*add, f"site={site}", *at))[0] == 0
    jobs = ("coordinator", "jobs")
    code, out, err = await _dgdm(
        *jobs, "create", "--tag", "site=berlin", "--cmd", "set_config",
        "--args", '{"telemetry": {"interval_s": 5}}', "--rate-per-s", "2", *at,
    )  # fmt: skip
    assert code == 0, err
    job = json.loads(out)
    assert (job["state"], job["total"], job["rate_per_s"]) == ("running", 2, 2.0)
    assert job["command"] == {"cmd": "set_config", "args": {"telemetry": {"interval_s": 5}}}
    code, out, _ = await _dgdm(*jobs, "create", "--id", "cam-3", "--cmd", "ping", *at)
    assert code == 0
    code, out, _ = await _dgdm(*jobs, "list", *at)
    assert [j["total"] for j in map(json.loads, out.splitlines())] == [1, 2]
    code, out, _ = await _dgdm(*jobs, "show", str(job["id"]), *at)
    shown = json.loads(out)
    assert [(d["device_id"], d["state"]) for d in shown["devices"]] == [
        ("cam-1", "queued"),
        ("cam-2", "queued"),
    ]
    code, out, _ = await _dgdm(*jobs, "cancel", str(job["id"]), *at)
    assert (code, json.loads(out)["counts"]["cancelled"]) == (0, 2)

    for argv, named in (
        (("create", "--tag", "site=tokyo", "--cmd", "ping"), "target"),
        (("create", "--id", "ghost", "--cmd", "ping"), "target.ids"),
        (("create", "--all", "--cmd", "reboot"), "command.cmd"),
        (("create", "--all", "--cmd", "ping", "--args", "{"), "--args"),
        (("create", "--all", "--cmd", "ping", "--rate-per-s", "0"), "rate_per_s"),
        (("create", "--all", "--cmd", "ping", "--ttl-ms", "0"), "ttl_ms"),
        (("create", "--tag", "Bad=x", "--cmd", "ping"), "tag 'Bad'"),
        (("show", "99"), "job_id"),
        (("cancel", "99"), "job_id"),
    ):
        code, _, err = await _dgdm(*jobs, *argv, *at)
        assert code == 2, (argv, err)
        assert named in err, err
        assert "Traceback" not in err
