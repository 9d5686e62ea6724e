"""The Ansible agent role's tags: its defaults render the inventory's `dgdm_tags` into the
command line `devices add --tag=...` / `devices tag ... --replace` take (checked with a
real `ansible-playbook` on localhost, no hosts changed), and what the real CLI then lists
is exactly the dict the role compares against, so a second run finds nothing to change."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from dgdm.sync.crypto import generate_keypair

from .test_sync_cli import _config, _dgdm

ROLE = Path(__file__).parents[2] / "ansible" / "roles" / "dgdm_agent"
PLAYBOOK = shutil.which("ansible-playbook")


def _render(tmp_path: Path, tags: dict[str, object]) -> tuple[list[str], dict[str, str]]:
    assert PLAYBOOK is not None
    play = tmp_path / "render.yml"
    out = tmp_path / "rendered.json"
    play.write_text(
        "- hosts: localhost\n  connection: local\n  gather_facts: false\n"
        f"  vars_files: [{ROLE / 'defaults' / 'main.yml'}]\n"
        "  tasks:\n    - ansible.builtin.copy:\n"
        f"        dest: {out}\n"
        '        content: \'{{ {"args": dgdm_agent_tag_args, "wanted": dgdm_agent_tags_wanted}'
        " | to_json }}'\n"
        "        mode: '0600'\n"
    )
    result = subprocess.run(
        [PLAYBOOK, "-i", "localhost,", str(play), "-e", json.dumps({"dgdm_tags": tags})],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"PATH": str(Path(PLAYBOOK).parent) + ":/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rendered = json.loads(out.read_text())
    return rendered["args"], rendered["wanted"]


@pytest.mark.skipif(PLAYBOOK is None, reason="ansible-core is not installed (extra [test])")
async def test_the_role_enrols_with_the_inventory_tags(tmp_path: Path) -> None:
    args, wanted = _render(tmp_path, {"site": "berlin", "rack": 3})
    assert args == ["site=berlin", "rack=3"]
    assert wanted == {"site": "berlin", "rack": "3"}
    config, _ = _config(tmp_path, "mqtt://127.0.0.1:1")
    _, _, public = generate_keypair(tmp_path / "dev", name="device")
    at = ("--config", str(config))
    tag_args = [f"--tag={a}" for a in args]  # as the enrol task passes them
    assert (await _dgdm("coordinator", "devices", "add", "edge-1", "--public-key", public,
                        *tag_args, *at))[0] == 0  # fmt: skip
    await _dgdm("coordinator", "devices", "tag", "edge-1", "drift=yes", *at)
    # The drift task's command line: exactly the inventory's tags again.
    code, _, err = await _dgdm("coordinator", "devices", "tag", "edge-1", *args, "--replace", *at)
    assert code == 0, err
    _, out, _ = await _dgdm("coordinator", "devices", "list", *at)
    (listed,) = [json.loads(line)["tags"] for line in out.splitlines()]
    assert listed == wanted  # the role's comparison: a second run changes nothing
