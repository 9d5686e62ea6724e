"""No secret in a playbook's output, even with --diff -vvv (conftest `fleet`, run for real).

The configs that hold the HTTP API tokens are templated again (removed first, so that the
run has a whole-file diff to show; put back afterwards), with a token for the agent from the
inventory and the coordinator's own generated one; the output is searched for both.
"""

from __future__ import annotations

import pytest

from .conftest import Fleet

# A whole play again, with --diff -vvv (~25 s): CI runs it after the default suite.
pytestmark = [pytest.mark.slow, pytest.mark.deploy_full]

AGENT_TOKEN = "agent-secret-4f1d8b2c9e7a6035"


def test_no_token_in_diff_or_verbose_output(fleet: Fleet) -> None:
    configs = [fleet.path("/etc/dgdm/agent.toml"), fleet.path("/etc/dgdm/coordinator.toml")]
    # Without a secret: its diff shows that --diff is on.
    unit = fleet.path("/etc/systemd/system/dgdm-coordinator.service")
    saved = {path: path.read_bytes() for path in [*configs, unit]}
    for path in saved:
        path.unlink()
    try:
        result = fleet.play(
            groups=("dgdm_coordinator", "dgdm_agents"),
            args=("--diff", "-vvv"),
            dgdm_agent_http_token=AGENT_TOKEN,
        )
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-6000:]
        # The run wrote the tokens, and showed the diff of a file without one.
        coordinator_token = (fleet.pki / "coordinator-http.token").read_text().strip()
        assert len(coordinator_token) >= 43
        assert f'token = "{coordinator_token}"' in configs[1].read_text()
        assert f'token = "{AGENT_TOKEN}"' in configs[0].read_text()
        assert "\n+Description=dgdm-edge coordinator" in output, output[-6000:]
        assert AGENT_TOKEN not in output
        assert coordinator_token not in output
        assert "the output has been hidden" in output
    finally:
        for path, content in saved.items():
            path.write_bytes(content)
